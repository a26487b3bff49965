"""``tunlock lock apply --confirm-within S`` and ``tunlock lock confirm``: a lock change that puts
the previous state back unless it is confirmed in time.

An administrator who changes the lock over SSH cannot know that the new lock lets them back in
until they try. So the change is made in three steps:

1. the previous state is saved (the table as ``nft list table`` prints it, or "none") in a small
   state file, ``/run/tunlock/confirm/<table>-<netns>.json``;
2. a **reverter** starts, in a process that outlives the applying session: a transient systemd
   service (``systemd-run``) where systemd runs this namespace, else a process in a session of
   its own that ignores SIGHUP, its standard streams on /dev/null. It registers its PID in the
   state file; only then is the new lock applied;
3. the reverter waits S seconds. ``tunlock lock confirm`` (from a new SSH session, which proves
   the new lock lets the administrator in) marks the state confirmed and wakes it: it leaves.
   Otherwise it puts the previous state back (the old table in one transaction, or no table).

The state file is read and changed under an exclusive ``flock``, so a confirmation that comes at
the deadline is either in time (the reverter sees it and leaves) or told that it is too late
(the reverter has already put the old state back): never both.

Run as ``python -m supervisor.lock.confirm STATE_FILE SECONDS``: the reverter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from supervisor.errors import TunlockError
from supervisor.lock import nft
from supervisor.net.dns import DEFAULT_STATE_DIR

CONFIRM_DIR = DEFAULT_STATE_DIR / "confirm"
REVERTER_MODULE = "supervisor.lock.confirm"
# How long the applying command waits for its reverter to register before it gives up (and
# applies nothing).
REVERTER_START_S = 15.0
SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(3)'s test

Status = Literal["pending", "confirmed", "reverted", "failed"]


class ConfirmError(TunlockError):
    """A confirmation could not be set up or given."""


@dataclass
class Pending:
    """What the state file holds."""

    table: str
    previous: str | None  # the table as nft listed it, or None: there was no lock
    seconds: float
    deadline: float  # wall clock, for the messages
    status: Status = "pending"
    reverter_pid: int = 0
    error: str = ""  # why the previous state could not be put back ("failed")


def _netns_id() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def state_path(table: str, directory: Path = CONFIRM_DIR) -> Path:
    """One file per table and network namespace (labs and containers run side by side)."""
    return directory / f"{table}-{_netns_id()}.json"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[tuple[Pending | None, list[Pending | None]]]:
    """The state file's content under an exclusive lock; set ``out[0]`` to write it back
    (None removes the file)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        text = handle.read()
        current = Pending(**json.loads(text)) if text.strip() else None
        out: list[Pending | None] = [current]
        try:
            yield current, out
        finally:  # what the block decided, also when it raises after deciding
            if out[0] is None:
                path.unlink(missing_ok=True)
            elif out[0] != current:
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(asdict(out[0])))
                handle.flush()


def _is_reverter(pid: int) -> bool:
    try:
        return REVERTER_MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def begin(table: str, seconds: float, path: Path | None = None) -> Pending:
    """Save the previous state and start the reverter; return once it has registered.

    Raises ConfirmError when a confirmation is already pending or the reverter does not start.
    """
    path = path or state_path(table)
    with locked(path) as (current, out):
        if current is not None and current.status == "pending" and _is_reverter(current.reverter_pid):
            raise ConfirmError(
                "a lock change already waits for `tunlock lock confirm` (until "
                f"{time.strftime('%H:%M:%S', time.localtime(current.deadline))}): confirm it or let "
                "it revert first"
            )
        pending = Pending(
            table=table, previous=nft.saved(table), seconds=seconds, deadline=time.time() + seconds
        )
        out[0] = pending
    _start_reverter(path, seconds)
    # Polled, not piped: a transient systemd service has no pipe back to this process.
    deadline = time.monotonic() + REVERTER_START_S
    while time.monotonic() < deadline:
        with locked(path) as (current, _):
            if current is not None and current.reverter_pid:
                return current
        time.sleep(0.01)
    with locked(path) as (_, out):
        out[0] = None
    raise ConfirmError("the process that would put the previous lock back did not start: nothing was applied")


def cancel(path: Path) -> None:
    """The new lock could not be applied: nothing to revert; the reverter leaves."""
    with locked(path) as (current, out):
        out[0] = None
    if current is not None and current.reverter_pid and _is_reverter(current.reverter_pid):
        os.kill(current.reverter_pid, signal.SIGUSR1)


def _own_namespace_is_systemds() -> bool:
    try:
        return os.stat("/proc/1/ns/net").st_ino == _netns_id()
    except OSError:
        return False


def _start_reverter(path: Path, seconds: float) -> None:
    """Start the reverter outside this session."""
    argv = [sys.executable, "-m", REVERTER_MODULE, str(path), str(seconds)]
    systemd_run = shutil.which("systemd-run")
    if SYSTEMD_RUNNING.is_dir() and systemd_run and _own_namespace_is_systemds():
        # A service of its own: logind's KillUserProcesses, which ends everything of a closed
        # session (a new session id included), cannot reach it.
        unit = f"tunlock-confirm-{path.stem}"
        done = subprocess.run(
            [systemd_run, "--unit", unit, "--collect", "--quiet", "--service-type=exec", *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise ConfirmError(f"systemd-run could not start the reverter: {done.stderr.strip()}")
        return
    subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # no controlling terminal: the session's hang-up does not reach it
        close_fds=True,
    )


def confirm(table: str, path: Path | None = None) -> Pending:
    """Keep the new lock: mark the state confirmed and wake the reverter. Raises ConfirmError
    when nothing waits, or when the previous lock was already put back."""
    path = path or state_path(table)
    if not path.exists():
        raise ConfirmError("no lock change waits for confirmation")
    with locked(path) as (current, out):
        if current is None:
            out[0] = None
            raise ConfirmError("no lock change waits for confirmation")
        if current.status == "reverted":
            out[0] = None
            raise ConfirmError(
                "too late: the previous lock was put back at "
                f"{time.strftime('%H:%M:%S', time.localtime(current.deadline))}"
            )
        if current.status == "failed":
            out[0] = None
            raise ConfirmError(
                f"the previous lock could not be put back ({current.error}): the lock applied then "
                "is still in force, and nothing waits any more"
            )
        confirmed = Pending(**{**asdict(current), "status": "confirmed"})
        out[0] = confirmed
    if current.reverter_pid and _is_reverter(current.reverter_pid):
        os.kill(current.reverter_pid, signal.SIGUSR1)
    return confirmed


def revert_after(path: Path, seconds: float) -> int:
    """The reverter: register, wait ``seconds`` or a wake-up, put the previous state back unless
    confirmed. SIGTERM ends the wait early (reverting: the previous state is the known one)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    deadline = time.monotonic() + seconds
    with locked(path) as (current, out):
        if current is None or current.status != "pending":
            return 0
        out[0] = Pending(**{**asdict(current), "reverter_pid": os.getpid()})
    while True:
        remaining = deadline - time.monotonic()
        woken = signal.sigtimedwait({signal.SIGUSR1, signal.SIGTERM}, remaining) if remaining > 0 else None
        with locked(path) as (current, out):
            if current is None or current.status == "confirmed":
                out[0] = None
                return 0
            if woken is not None and woken.si_signo == signal.SIGUSR1:
                continue  # a wake-up without a confirmation: keep waiting
            try:
                nft.restore(current.table, current.previous)
            except TunlockError as err:  # no one to tell but the next `lock confirm`
                out[0] = Pending(**{**asdict(current), "status": "failed", "error": str(err)})
                return 1
            out[0] = Pending(**{**asdict(current), "status": "reverted", "deadline": time.time()})
            return 0


if __name__ == "__main__":
    sys.exit(revert_after(Path(sys.argv[1]), float(sys.argv[2])))
