"""The lockout guard and ``--confirm-within`` over real SSH sessions: sshd in the lab's client,
the administrator on the internet host, tunlock run as they would run it, over SSH.

What is asserted is what the administrator sees: the refusal and its exit status, whether the
lock is in place, whether a new session gets in, and the lock put back (or kept) after the
deadline, also when the session that applied it is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import LabUnderTest, tunlock_in_client
from tests.lab.ssh_admin import LabSshd

pytestmark = pytest.mark.lab(servers=1, per_test=True)


@pytest.fixture
def sshd(lab: LabUnderTest) -> Iterator[LabSshd]:
    server = LabSshd(lab.lab)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def confirm_state(lab: LabUnderTest) -> Iterator[Path]:
    """The confirmation's state file of the lab's client (removed after the test, whatever
    happened; a reverted change leaves it for `lock confirm` to say it is too late)."""
    netns = os.stat(Path("/run/netns") / lab.lab.ns("client")).st_ino
    path = Path(f"/run/tunlock/confirm/tunlock-{netns}.json")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def tunlock_over_ssh(
    lab: LabUnderTest, sshd: LabSshd, *args: str, env: str = ""
) -> subprocess.CompletedProcess:
    """The CLI run by the administrator in an SSH session (sshd sets SSH_CONNECTION)."""
    command = f"env TUNLOCK_LAB_ONLY=1 {env} {sys.executable} -m supervisor.cli {' '.join(args)}"
    return sshd.run_from("inet", command, "--config", str(lab.lab.config_path))


def tables(lab: LabUnderTest) -> str:
    return lab.lab.run("client", "nft", "list", "tables")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` (bounded); the seconds it took."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - began


def reverter_pid(state: Path) -> int:
    return int(json.loads(state.read_text())["reverter_pid"])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_guard_refuses_from_a_session_the_lock_would_cut(lab: LabUnderTest, sshd: LabSshd) -> None:
    refused = tunlock_over_ssh(lab, sshd, "lock", "apply")
    assert refused.returncode == 5, (refused.stdout, refused.stderr)
    assert "lock apply refused" in refused.stderr and "lock.admin_tcp" in refused.stderr
    assert "tunlock" not in tables(lab), "nothing was applied"
    run = tunlock_over_ssh(lab, sshd, "run")
    assert run.returncode == 5 and "lock.admin_tcp" in run.stderr

    allowed = tunlock_over_ssh(lab, sshd, "lock", "apply", env="TUNLOCK_LOCK_ADMIN_TCP=22")
    assert allowed.returncode == 0 and "lock installed" in allowed.stdout, allowed.stderr
    assert "table inet tunlock" in tables(lab)
    again = sshd.run_from("inet", "echo", "still in")
    assert again.returncode == 0 and again.stdout.strip() == "still in"
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))


def test_confirm_within_puts_the_previous_state_back_when_the_applying_session_died(
    lab: LabUnderTest, sshd: LabSshd
) -> None:
    assert "tunlock" not in tables(lab)
    # The session applies a lock that cuts it (--force past the guard) and waits; the shell
    # prints its PID, its session's id (sshd makes every session a session of its own).
    command = (
        f"echo $$; env TUNLOCK_LAB_ONLY=1 {sys.executable} -m supervisor.cli lock apply --force "
        f"--confirm-within 3 --config {lab.lab.config_path}; exec sleep 600"
    )
    applying = subprocess.Popen(
        ["ip", "netns", "exec", lab.lab.ns("inet"), *sshd.ssh_argv(command)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert applying.stdout is not None
        session_id = int(applying.stdout.readline())
        wait_until(lambda: "table inet tunlock" in tables(lab), 15, "lock applied")
        applied_at = time.monotonic()
        # The administrator's session dies: every process of it, and the ssh client.
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session_id:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        applying.kill()
        took = wait_until(lambda: "tunlock" not in tables(lab), 30, "the previous state (no lock) back")
        print(
            f"not confirmed: no lock again {time.monotonic() - applied_at:.2f} s after the apply "
            f"({took:.2f} s after the session died)"
        )
    finally:
        applying.kill()
        applying.wait(5)
    back = sshd.run_from("inet", "echo", "in again")
    assert back.returncode == 0 and back.stdout.strip() == "in again"
    late = tunlock_over_ssh(lab, sshd, "lock", "confirm")
    assert late.returncode == 1 and "too late" in late.stderr, late.stderr


def test_confirm_within_keeps_the_lock_confirmed_from_a_second_session(
    lab: LabUnderTest, sshd: LabSshd, confirm_state: Path
) -> None:
    admin = "TUNLOCK_LOCK_ADMIN_TCP=22"
    first = tunlock_over_ssh(lab, sshd, "lock", "apply", env=admin)
    assert first.returncode == 0, first.stderr
    before = lab.lab.run("client", "nft", "list", "table", "inet", "tunlock")
    changed = f"{admin} TUNLOCK_LOCK_INBOUND_TCP=8080"
    applied = tunlock_over_ssh(lab, sshd, "lock", "apply", "--confirm-within", "30", env=changed)
    assert applied.returncode == 0 and "unless `tunlock lock confirm" in applied.stdout, applied.stderr
    reverter = reverter_pid(confirm_state)
    assert alive(reverter)
    confirmed = tunlock_over_ssh(lab, sshd, "lock", "confirm")  # a new session: it got in
    assert confirmed.returncode == 0 and "lock confirmed" in confirmed.stdout, confirmed.stderr
    wait_until(lambda: not alive(reverter), 10, "the reverter leaving")
    after = lab.lab.run("client", "nft", "list", "table", "inet", "tunlock")
    assert after != before and "8080" in after, "the confirmed lock stays"
    status = tunlock_over_ssh(lab, sshd, "lock", "status", env=changed)
    assert "matches the config" in status.stdout, status.stdout

    # Not confirmed this time: the previous lock (not none) comes back, the same as before.
    again = tunlock_over_ssh(lab, sshd, "lock", "apply", "--confirm-within", "2", env=admin)
    assert again.returncode == 0, again.stderr
    wait_until(
        lambda: "8080" in lab.lab.run("client", "nft", "list", "table", "inet", "tunlock"), 20, "revert"
    )
    status = tunlock_over_ssh(lab, sshd, "lock", "status", env=changed)
    assert "matches the config" in status.stdout, status.stdout
    late = tunlock_over_ssh(lab, sshd, "lock", "confirm")
    assert late.returncode == 1 and "too late" in late.stderr
    assert not confirm_state.exists()
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
