"""The administrator's SSH on a booted host (`lock.admin_tcp = [22]`), and `systemd install` from a
virtual environment under /root: Debian 12 with its own openssh-server, booted by systemd-nspawn
in the lab's client namespace, the administrator on the lab's internet host.

Asserted: what the administrator sees (a session from the internet host, at boot with the boot
lock alone and across the daemon's start, restart and stop; a unit that starts), and what the ISP
sees (an observer told of the session: 0 packets besides its replies).
"""

from __future__ import annotations

import subprocess

import pytest

from supervisor.lab.probes import Observer, describe
from supervisor.lab.topology import CLIENT_V4, INTERNET_V4
from tests.lab.conftest import LabUnderTest
from tests.lab.ssh_admin import AdminSession, SshAdmin
from tests.systemd.machine import PYTHON, SRC, VENV, BootedSystem

pytestmark = pytest.mark.systemd


def open_ssh(lab: LabUnderTest, system: BootedSystem) -> SshAdmin:
    """`admin_tcp = [22]` in the host's config and its boot lock (install run again, offline), and
    the administrator's key in root's authorized_keys: the host's own sshd starts at boot."""
    config = system.merged / "etc/tunlock/tunlock.toml"
    config.write_text(config.read_text().replace("[lock]\n", "[lock]\nadmin_tcp = [22]\n"))
    installed = system.offline(PYTHON, "-m", "supervisor.cli", "systemd", "install")
    assert installed.returncode == 0, installed.stderr
    assert "0x746c0022" in (system.merged / "etc/tunlock/lock.nft").read_text(), "the boot lock carries it"
    admin = SshAdmin(lab.lab, lab.lab.dir / "admin-ssh")
    system.write("/root/.ssh/authorized_keys", admin.public_key, 0o600)
    (system.merged / "root/.ssh").chmod(0o700)
    return admin


def admin_observer(lab: LabUnderTest) -> Observer:
    return Observer.start(lab.lab, admin=(f"{CLIENT_V4}:22>{INTERNET_V4}",), name="observer-admin")


def assert_only_the_session(observer: Observer, mark: int) -> None:
    leaks = observer.leaks(since=mark)
    assert not leaks, f"the ISP saw {len(leaks)} packets besides the session's:\n{describe(leaks)}"
    assert observer.admin_packets(since=mark), "the session's replies were never seen"


def test_ssh_reaches_the_booted_host_from_boot_on_and_across_the_daemon(
    lab: LabUnderTest, system: BootedSystem
) -> None:
    admin = open_ssh(lab, system)
    observer = admin_observer(lab)

    # The boot lock alone (the daemon masked): SSH gets in.
    mark = observer.mark()
    system.boot("systemd.mask=tunlock.service")
    assert system.sh("nft", "list", "table", "inet", "tunlock").returncode == 0, "the boot lock holds"
    alone = admin.run_from("inet", "systemctl", "is-active", "tunlock-lock.service")
    assert alone.returncode == 0 and alone.stdout.strip() == "active", alone.stderr
    lab.probes.every_kind()
    assert_only_the_session(observer, mark)
    system.poweroff()

    # A normal boot: a session from the start, across the daemon's connect, restart and stop.
    mark = observer.mark()
    system.boot()
    session = AdminSession(admin)
    try:
        gaps = {}
        since = session.mark()
        system.wait_for(
            "connected",
            lambda: system.show("tunlock.service", "StatusText")["StatusText"].startswith("connected"),
        )
        session.wait_for_echo()
        gaps["boot and connect"] = session.longest_gap(since)
        for action in ("restart", "stop"):
            since = session.mark()
            system.systemctl(action, "tunlock.service")
            session.wait_for_echo()
            gaps[action] = session.longest_gap(since)
        lab.probes.every_kind()
        assert session.alive
        print(
            "session over the booted host, longest gap: "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in gaps.items())
        )
    finally:
        session.close()
    assert_only_the_session(observer, mark)


def test_systemd_install_from_a_venv_under_root_gives_a_unit_that_starts(
    lab: LabUnderTest, system: BootedSystem
) -> None:
    """tunlock installed in a venv under /root (as `python3 -m venv /root/tunlock` and a pip
    install would: here the venv finds the test root's dependencies and the source by .pth files)."""
    system.boot()
    system.wait_for(
        "connected",
        lambda: system.show("tunlock.service", "StatusText")["StatusText"].startswith("connected"),
    )
    system.sh("python3", "-m", "venv", "--without-pip", "/root/tunlock")
    system.sh(
        "sh",
        "-c",
        f"printf '%s\\n' {VENV}/lib/python3.11/site-packages {SRC} "
        "> /root/tunlock/lib/python3.11/site-packages/tunlock.pth",
    )
    installed = system.sh(
        "/root/tunlock/bin/python", "-m", "supervisor.cli", "systemd", "install", check=False
    )
    assert installed.returncode == 0, installed.stderr
    assert "checked: `tunlock check` runs under the sandbox" in installed.stdout
    unit = system.sh("cat", "/etc/systemd/system/tunlock.service").stdout
    assert "ExecStart=/root/tunlock/bin/python -m supervisor.cli run" in unit
    assert "ProtectHome=tmpfs" in unit and "BindReadOnlyPaths=/root/tunlock" in unit
    system.systemctl("daemon-reload")
    system.systemctl("restart", "tunlock.service")
    system.wait_for(
        "connected under the new unit",
        lambda: system.show("tunlock.service", "StatusText")["StatusText"].startswith("connected"),
    )
    main_pid = system.show("tunlock.service", "MainPID")["MainPID"]
    assert "/root/tunlock/bin/python" in system.sh("cat", f"/proc/{main_pid}/cmdline").stdout.replace(
        "\0", " "
    )
    print(f"\n{installed.stdout}")


def test_systemd_install_refuses_with_the_reason_when_the_unit_could_not_start(
    lab: LabUnderTest, system: BootedSystem
) -> None:
    """A venv whose package is found through a path under /root that install cannot know of (a
    .pth file naming /root/src): the trial under the unit's sandbox fails, and nothing changes."""
    system.boot()
    before = system.sh("cat", "/etc/systemd/system/tunlock.service").stdout
    system.sh("ln", "-s", SRC, "/root/src")
    system.sh("python3", "-m", "venv", "--without-pip", "/opt/elsewhere")
    system.sh(
        "sh",
        "-c",
        f"printf '%s\\n' {VENV}/lib/python3.11/site-packages /root/src "
        "> /opt/elsewhere/lib/python3.11/site-packages/tunlock.pth",
    )
    refused = system.sh(
        "/opt/elsewhere/bin/python", "-m", "supervisor.cli", "systemd", "install", check=False
    )
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert "tunlock.service would not start" in refused.stderr and "Nothing was installed" in refused.stderr
    assert "No module named" in refused.stderr or "supervisor" in refused.stderr, refused.stderr
    assert system.sh("cat", "/etc/systemd/system/tunlock.service").stdout == before
    print(f"\n{refused.stderr}")


def test_confirm_within_reverts_from_a_transient_service_when_the_session_is_gone(
    lab: LabUnderTest, system: BootedSystem
) -> None:
    """Where systemd runs, the reverter is a transient service (tunlock-confirm-*), outside the
    applying session: the administrator applies a lock that cuts them off, their session dies,
    and the boot lock (which lets them in) comes back by itself."""
    admin = open_ssh(lab, system)
    system.boot("systemd.mask=tunlock.service")  # the boot lock alone: the daemon would own the lock
    cutting = (
        f"env TUNLOCK_LOCK_ADMIN_TCP= {PYTHON} -m supervisor.cli lock apply --force --confirm-within 5 "
        "--config /etc/tunlock/tunlock.toml; exec sleep 600"
    )
    applying = subprocess.Popen(
        ["ip", "netns", "exec", lab.lab.ns("inet"), *admin.ssh_argv(cutting)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        unit = system.wait_for(
            "the reverter as a transient service",
            lambda: (
                system.sh(
                    "systemctl", "list-units", "--no-legend", "--state=active", "tunlock-confirm-*"
                ).stdout
            ),
            timeout=30,
        )
        system.wait_for(
            "the new lock applied (no admin path)",
            lambda: "0x746c0022" not in system.sh("nft", "list", "table", "inet", "tunlock").stdout,
            timeout=30,
        )
    finally:
        applying.kill()  # the administrator's session is gone
        applying.wait(5)
    print(f"\nreverter: {unit.strip()}")
    system.wait_for(
        "the boot lock back",
        lambda: "0x746c0022" in system.sh("nft", "list", "table", "inet", "tunlock").stdout,
        timeout=30,
    )
    back = admin.run_from("inet", "echo", "in again")
    assert back.returncode == 0 and back.stdout.strip() == "in again", back.stderr
