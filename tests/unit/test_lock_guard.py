"""The lock guard without root: an in-memory nftables, and a stand-in for ``nft monitor``.

The guard's logic (remember what it installed, compare after every change, restore and report)
is what these tests drive; nft itself cannot run without root, so ``supervisor.lock.nft`` is
replaced by a table held in memory, and ``nft monitor`` by a script that prints whatever the
test writes into a FIFO, one line per change. The real nft is exercised by the lab tests.
"""

from __future__ import annotations

import os
from ipaddress import ip_address
from pathlib import Path

import anyio
import pytest

from supervisor.lock import guard as guard_module
from supervisor.lock import nft
from supervisor.lock.guard import LockGuard
from supervisor.lock.policy import LockPolicy
from supervisor.servers import Endpoint

GUARD_S = 10.0  # only stops a broken test from hanging
POLICY = LockPolicy(table="tunlock_test", tunnel_interface="tun-test", fwmark=0x5154)
ENDPOINT = Endpoint(ip_address("198.51.100.7"), 51820)


class FakeNft:
    """One table, rendered as text from the policy; counters per name."""

    def __init__(self) -> None:
        self.installed: str | None = None
        self.applied: list[LockPolicy] = []
        self.swaps: list[tuple[frozenset[Endpoint], frozenset[Endpoint]]] = []

    def render(self, policy: LockPolicy) -> str:
        return f"table {policy.table} endpoints {sorted(map(str, policy.endpoints))}"

    def apply(self, policy: LockPolicy) -> None:
        self.applied.append(policy)
        self.installed = self.render(policy)

    def swap_endpoints(self, policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> None:
        self.swaps.append((old, new))
        self.installed = self.render(policy)

    def listing(self, table: str) -> str:
        if self.installed is None:
            raise nft.LockError(f"no table {table}")
        return self.installed

    def reading(self, table: str) -> tuple[str, dict[str, int]]:
        return self.listing(table), {"refused_out": 12}


@pytest.fixture
def fake_nft(monkeypatch: pytest.MonkeyPatch) -> FakeNft:
    fake = FakeNft()
    for name in ("apply", "swap_endpoints", "listing", "reading"):
        monkeypatch.setattr(guard_module.nft, name, getattr(fake, name))
    return fake


@pytest.fixture
def monitor_fifo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A FIFO whose lines the stand-in ``nft monitor`` prints; it ends when the writer closes."""
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    script = tmp_path / "nft"
    script.write_text(f'#!/bin/sh\n[ "$1" = monitor ] || exit 2\nexec cat "{fifo}"\n')
    script.chmod(0o755)
    monkeypatch.setattr(guard_module.nft, "NFT", str(script))
    return fifo


def test_apply_swap_and_state_follow_what_the_guard_installed(fake_nft: FakeNft) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        assert await guard.state() == (False, False, {})  # nothing installed yet
        await guard.apply()
        assert await guard.state() == (True, True, {"refused_out": 12})
        wider = POLICY.with_endpoints([ENDPOINT])
        await guard.swap_endpoints(wider)
        assert fake_nft.swaps == [(frozenset(), frozenset({ENDPOINT}))]
        assert await guard.state() == (True, True, {"refused_out": 12})
        assert await guard.check() is None  # unchanged: nothing to restore
        fake_nft.installed = "table tunlock_test with a rule someone added"
        assert await guard.state() == (True, False, {"refused_out": 12})  # reading never restores
        assert guard.restores == 0

    anyio.run(main)


def test_check_restores_a_changed_or_deleted_table_and_reports_it(fake_nft: FakeNft) -> None:
    reports: list[str] = []

    async def on_tamper(reason: str) -> None:
        reports.append(reason)

    async def main() -> None:
        guard = LockGuard(POLICY, on_tamper)
        await guard.apply(POLICY.with_endpoints([ENDPOINT]))
        expected = fake_nft.installed
        fake_nft.installed = "table tunlock_test accept everything"
        assert await guard.check() == "the lock table was changed"
        assert fake_nft.installed == expected
        fake_nft.installed = None
        assert await guard.check() == "the lock table was deleted"
        assert fake_nft.installed == expected
        assert guard.restores == 2
        # Restored from the last policy the guard was given, endpoints included.
        assert fake_nft.applied[-1].endpoints == {ENDPOINT}

    anyio.run(main)
    assert reports == ["the lock table was changed", "the lock table was deleted"]


def test_run_checks_once_on_start_and_after_every_monitor_line(fake_nft: FakeNft, monitor_fifo: Path) -> None:
    reports: list[str] = []
    restored = anyio.Event()

    async def on_tamper(reason: str) -> None:
        reports.append(reason)
        restored.set()

    def write_lines(*lines: str) -> None:
        with open(monitor_fifo, "w") as fifo:  # blocks until the stand-in opened it
            for line in lines:
                fifo.write(line + "\n")
                fifo.flush()

    async def main() -> None:
        nonlocal restored
        guard = LockGuard(POLICY, on_tamper)
        await guard.apply()
        fake_nft.installed = "changed while the daemon was starting"
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.run)
                # The check on start found the change made before the monitor was up.
                assert reports == ["the lock table was changed"]
                restored = anyio.Event()
                fake_nft.installed = None
                await anyio.to_thread.run_sync(write_lines, "delete table inet tunlock_test", "")
                await restored.wait()
        # The stand-in ended when the FIFO closed; the guard's run returned with it.

    anyio.run(main)
    assert reports == ["the lock table was changed", "the lock table was deleted"]


def test_run_ends_the_monitor_process_when_cancelled(fake_nft: FakeNft, monitor_fifo: Path) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.run)
                tg.cancel_scope.cancel()
        assert guard.restores == 0

    anyio.run(main)
    # The stand-in (cat on the FIFO) was terminated: a writer now finds no reader at all.
    with pytest.raises(OSError):
        os.open(monitor_fifo, os.O_WRONLY | os.O_NONBLOCK)
