"""The guard's watch on ``nft monitor`` outlives the child (issue #11, item 3c), without root.

A fake ``nft`` stands in for the real one (a test without root cannot subscribe to nftables
events), and the table check is counted rather than run: what is under test is the guard's
handling of its child, which the lab's daemon tests then prove with the real ``nft``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import pytest

from supervisor.lock import guard as guard_module
from supervisor.lock import nft
from supervisor.lock.guard import LockGuard
from supervisor.lock.policy import LockPolicy

pytestmark = pytest.mark.anyio


class CountingGuard(LockGuard):
    """A guard whose table check only counts (there is no table without root)."""

    def __init__(self) -> None:
        super().__init__(LockPolicy.__new__(LockPolicy))
        self.checks = 0

    async def check(self) -> str | None:
        self.checks += 1
        return None


def fake_nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """An ``nft`` that records each start's pid in ``starts`` and then runs ``body``."""
    starts = tmp_path / "starts"
    script = tmp_path / "nft"
    script.write_text(f"#!/bin/sh\necho $$ >> {starts}\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setattr(nft, "NFT", str(script))
    monkeypatch.setattr(guard_module, "WATCH_RESTART_INITIAL_S", 0.01, raising=False)
    return starts


def started(starts: Path) -> list[int]:
    return [int(pid) for pid in starts.read_text().split()] if starts.exists() else []


async def wait_until(condition, what: str) -> None:
    with anyio.move_on_after(10) as waited:
        while not condition():
            await anyio.sleep(0.01)
    assert not waited.cancelled_caught, f"no {what}"


@pytest.mark.parametrize("body", ["exit 0", "exit 1", "kill -9 $$", "echo 'add table inet x'"])
async def test_a_monitor_that_ends_is_started_again_and_the_table_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    starts = fake_nft(tmp_path, monkeypatch, body)
    guard = CountingGuard()
    async with anyio.create_task_group() as tg:
        await tg.start(guard.run)
        await wait_until(lambda: len(started(starts)) >= 4, "four starts")
        tg.cancel_scope.cancel()
    assert guard.watch_restarts >= 3
    assert guard.checks >= 3, "every new monitor begins with a check: changes in between were unseen"


async def test_a_monitor_killed_from_outside_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sleeper that dies of SIGINT even when started from a shell that ignores it (a background
    # job of a non-interactive shell inherits SIGINT ignored, and sh cannot undo that). It says
    # when its handler is in place: a signal sent before that would find SIGINT still ignored.
    ready = tmp_path / "ready"
    code = (
        "import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        f"open({str(ready)!r}, 'a').write(str(os.getpid()) + chr(10)); time.sleep(60)"
    )
    sleeper = f'exec {sys.executable} -c "{code}"'
    starts = fake_nft(tmp_path, monkeypatch, sleeper)
    guard = CountingGuard()
    async with anyio.create_task_group() as tg:
        await tg.start(guard.run)
        for signum in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            await wait_until(lambda: started(starts), "a start")
            current = started(starts)[-1]
            await wait_until(lambda pid=current: pid in started(ready), "the sleeper's handler")
            os.kill(current, signum)
            await wait_until(lambda gone=current: started(starts)[-1] != gone, "a new monitor")
        tg.cancel_scope.cancel()
    last = started(starts)[-1]
    await wait_until(lambda: not Path(f"/proc/{last}").exists() or _zombie(last), "the last one ended")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


async def test_the_backoff_grows_while_the_monitor_keeps_dying_at_once() -> None:
    delays = [guard_module.next_restart_delay(None, lived_s=0.0)]
    for _ in range(12):
        delays.append(guard_module.next_restart_delay(delays[-1], lived_s=0.0))
    assert delays == sorted(delays) and delays[-1] == guard_module.WATCH_RESTART_MAX_S
    assert guard_module.next_restart_delay(delays[-1], lived_s=60.0) == guard_module.WATCH_RESTART_INITIAL_S
