"""Namespace mode's pure parts, as a user meets them: `tunlock check` on the name, the units
and the drop-in `tunlock systemd join` writes, `tunlock exec` without a namespace, the status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.lock.state import LockState
from supervisor.runtime import Status
from supervisor.status import StatusReport
from supervisor.systemd import units

from .test_systemd_units import parse

REPO = Path(__file__).resolve().parents[2]


def tunlock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


@pytest.mark.parametrize("name", ["../etc", "a/b", "-n", ".hidden", "", "x" * 65, "seed box", "a$b"])
def test_check_refuses_a_name_that_is_not_a_namespace_name(write_config, name: str) -> None:
    path = write_config(f'[tunnel]\nnamespace = "{name}"\n')
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}:2: tunnel.namespace: a namespace name is 1 to 64" in result.stderr


@pytest.mark.parametrize("name", ["seed", "qbit.seed_1", "tunlock", "_x-1"])
def test_check_takes_a_namespace_name_and_says_what_it_means(write_config, name: str) -> None:
    path = write_config(f'[tunnel]\nnamespace = "{name}"\n')
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"namespace mode: only /run/netns/{name} goes through the tunnel" in result.stdout


def test_status_names_the_namespace_or_null() -> None:
    from supervisor.control.cli import describe

    whole_host = StatusReport.build(Status(), LockState()).as_json()
    assert whole_host["namespace"] is None
    assert "namespace" not in describe(whole_host)
    seed = StatusReport.build(Status(namespace="seed"), LockState(), namespace="seed").as_json()
    assert seed["namespace"] == "seed"
    assert "namespace: seed (only it goes through the tunnel)" in describe(seed)


def test_join_writes_a_drop_in_that_keeps_the_unit_inside_and_bound_to_tunlock(write_config) -> None:
    path = write_config('[tunnel]\nnamespace = "seed"\n')
    result = tunlock("systemd", "join", "qbittorrent-nox@seed", "--config", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    first, _, text = result.stdout.partition("\n")
    assert first == "# /etc/systemd/system/qbittorrent-nox@seed.service.d/tunlock-namespace.conf"
    dropin = parse(text)
    assert dropin["Unit"]["BindsTo"] == "tunlock.service"
    assert dropin["Unit"]["After"] == "tunlock.service"
    assert dropin["Service"]["NetworkNamespacePath"] == "/run/netns/seed"
    assert dropin["Service"]["BindReadOnlyPaths"] == "/etc/netns/seed/resolv.conf:/etc/resolv.conf"


@pytest.mark.parametrize("unit", ["../x", "a/b.service", "bad unit", "x.mount.d/y"])
def test_join_refuses_what_is_not_a_unit_name(write_config, unit: str) -> None:
    path = write_config('[tunnel]\nnamespace = "seed"\n')
    result = tunlock("systemd", "join", unit, "--config", str(path), "--dry-run")
    assert result.returncode == 2
    assert "not a unit name" in result.stderr


def test_join_and_exec_need_a_namespace(write_config) -> None:
    path = write_config("")
    joined = tunlock("systemd", "join", "transmission-daemon", "--config", str(path), "--dry-run")
    ran = tunlock("exec", "--config", str(path), "--", "true")
    for result in (joined, ran):
        assert result.returncode == 2
        assert "tunnel.namespace is not set" in result.stderr


def test_namespace_mode_installs_no_boot_lock_and_may_enter_the_namespace(write_config) -> None:
    config = load_config(write_config('[tunnel]\nnamespace = "seed"\n'))
    files = units.render_all(config, "/opt/venv/bin/python", "table inet tunlock {}\n")
    assert [path.name for path, _ in files.files()] == [units.DAEMON_UNIT_NAME]
    assert files.unit_names() == [units.DAEMON_UNIT_NAME]
    unit = parse(files.daemon_unit_text)
    assert "Requires" not in unit["Unit"]
    assert units.LOCK_UNIT_NAME not in unit["Unit"]["After"]
    service = unit["Service"]
    assert service["ExecStartPre"].startswith(
        "+/usr/bin/nsenter --mount=/proc/1/ns/mnt -- /bin/sh -c "
        "'test -e /run/netns/seed || ip netns add seed;"
    )
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"].split()
    assert service["RestrictNamespaces"] == "net"
    assert service["ReadWritePaths"] == "-/etc/netns/seed"


def test_whole_host_mode_keeps_its_boot_lock(write_config) -> None:
    config = load_config(write_config(""))
    files = units.render_all(config, "/opt/venv/bin/python", "table inet tunlock {}\n")
    assert files.unit_names() == [units.LOCK_UNIT_NAME, units.DAEMON_UNIT_NAME]
    service = parse(files.daemon_unit_text)["Service"]
    assert service["RestrictNamespaces"] == "yes"
    assert "CAP_SYS_ADMIN" not in service["CapabilityBoundingSet"]


def test_the_web_ui_ports_are_let_in_from_the_hosts_end_of_the_pair_only(write_config) -> None:
    from supervisor.lock.configured import policy_from_config

    config = load_config(write_config('[tunnel]\nnamespace = "seed"\n[namespace]\nui_tcp = [9091, 8080]\n'))
    policy = policy_from_config(config)
    assert policy.admin_tcp == (8080, 9091)
    assert [str(n) for n in policy.admin_sources] == ["169.254.251.1/32"]
    whole_host = policy_from_config(load_config(write_config("[lock]\nadmin_tcp = [22]\n")))
    assert whole_host.admin_tcp == (22,) and whole_host.admin_sources == ()


def test_web_ui_ports_without_a_namespace_are_warned_about_and_open_nothing(write_config) -> None:
    from supervisor.lock.configured import policy_from_config

    path = write_config("[namespace]\nui_tcp = [8080]\n")
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 0
    assert f"{path}:2: warning: namespace.ui_tcp is set but tunnel.namespace is not" in result.stderr
    assert policy_from_config(load_config(path)).admin_tcp == ()


def test_the_pair_needs_a_slash_30(write_config) -> None:
    path = write_config('[tunnel]\nnamespace = "seed"\n[namespace]\nui_subnet = "10.0.0.0/24"\n')
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert "namespace.ui_subnet: a /30" in result.stderr


def test_lab_only_mode_creates_or_enters_no_namespace_the_lab_did_not_name(monkeypatch) -> None:
    from supervisor.errors import SafetyError
    from supervisor.net import netns

    monkeypatch.setenv("TUNLOCK_LAB_ONLY", "1")
    with pytest.raises(SafetyError, match="'seed' is not a lab namespace"):
        netns.ensure_namespace("seed")
    assert not netns.namespace_path("seed").exists()
    # A lab's name, asked from a namespace that is not the lab's (this test's): refused too.
    with pytest.raises(SafetyError, match="host side must be a lab namespace"):
        netns.ensure_namespace("tlab0000000-app")
    assert not netns.namespace_path("tlab0000000-app").exists()
