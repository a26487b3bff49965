"""The lock guard without root: an in-memory nftables, and a stand-in for ``nft monitor``.

The guard's logic (remember what it installed, compare after every change, restore and report)
is what these tests drive; nft itself cannot run without root, so ``supervisor.lock.nft`` is
replaced by a table held in memory, and ``nft monitor`` by a script that prints whatever the
test writes into a FIFO, one line per change. The real nft is exercised by the lab tests.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Network, ip_address
from pathlib import Path

import anyio
import pytest

from supervisor.lock import guard as guard_module
from supervisor.lock import nft
from supervisor.lock.guard import LockGuard
from supervisor.lock.links import AppliedLinks
from supervisor.lock.policy import LockPolicy
from supervisor.servers import Endpoint

GUARD_S = 10.0  # only stops a broken test from hanging
POLICY = LockPolicy(table="tunlock_test", tunnel_interface="tun-test", fwmark=0x5154)
ENDPOINT = Endpoint(ip_address("198.51.100.7"), 51820)


class FakeNft:
    """One table, rendered as text from the policy; counters per name."""

    def __init__(self) -> None:
        self.installed: str | None = None
        self.onlink: tuple[IPv4Network, ...] = (IPv4Network("192.0.2.0/24"),)
        self.applied: list[LockPolicy] = []
        self.swaps: list[tuple[frozenset[Endpoint], frozenset[Endpoint]]] = []
        self.inbound_swaps: list[tuple[frozenset[tuple[str, int]], frozenset[tuple[str, int]]]] = []

    def render(self, policy: LockPolicy) -> str:
        return f"table {policy.table} endpoints {sorted(map(str, policy.endpoints))}"

    def apply(self, policy: LockPolicy) -> AppliedLinks:
        self.applied.append(policy)
        self.installed = self.render(policy)
        return AppliedLinks(onlink=self.onlink)  # what the real one read while applying

    def swap_endpoints(self, policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> None:
        self.swaps.append((old, new))
        self.installed = self.render(policy)

    def swap_tunnel_inbound(
        self, policy: LockPolicy, old: frozenset[tuple[str, int]], new: frozenset[tuple[str, int]]
    ) -> None:
        self.inbound_swaps.append((old, new))
        self.installed = self.render(policy) + f" inbound {sorted(policy.tunnel_inbound)}"

    def listing(self, table: str) -> str:
        if self.installed is None:
            raise nft.LockError(f"no table {table}")
        return self.installed

    def reading(self, table: str) -> tuple[str, dict[str, int]]:
        return self.listing(table), {"refused_out": 12}


@pytest.fixture
def fake_nft(monkeypatch: pytest.MonkeyPatch) -> FakeNft:
    fake = FakeNft()
    for name in ("apply", "swap_endpoints", "swap_tunnel_inbound", "listing", "reading"):
        monkeypatch.setattr(guard_module.nft, name, getattr(fake, name))
    return fake


@pytest.fixture
def onlink_now(fake_nft: FakeNft, monkeypatch: pytest.MonkeyPatch) -> list[tuple[IPv4Network, ...]]:
    """The on-link subnets as ``ip route`` would show them now (a one-item list to change)."""
    now = [fake_nft.onlink]
    monkeypatch.setattr(guard_module, "read_links", lambda policy: AppliedLinks(onlink=now[0]))
    return now


def fake_tool(directory: Path, name: str, fifo: Path) -> None:
    script = directory / name
    script.write_text(f'#!/bin/sh\nexec cat "{fifo}"\n')
    script.chmod(0o755)


@pytest.fixture
def route_fifo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in ``ip`` (first on PATH) whose ``ip monitor route`` prints the FIFO's lines."""
    fifo = tmp_path / "routes"
    os.mkfifo(fifo)
    tools = tmp_path / "bin"
    tools.mkdir()
    fake_tool(tools, "ip", fifo)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    return fifo


def write_lines(fifo: Path, *lines: str) -> None:
    with open(fifo, "w") as writer:  # blocks until the stand-in opened it
        for line in lines:
            writer.write(line + "\n")
            writer.flush()


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
        assert await guard.state() == (False, False, False, {})  # nothing installed yet
        await guard.apply()
        assert await guard.state() == (True, True, False, {"refused_out": 12})  # no owned twin here
        wider = POLICY.with_endpoints([ENDPOINT])
        await guard.swap_endpoints(wider)
        assert fake_nft.swaps == [(frozenset(), frozenset({ENDPOINT}))]
        assert await guard.state() == (True, True, False, {"refused_out": 12})  # no owned twin here
        assert await guard.check() is None  # unchanged: nothing to restore
        forwarded = wider.with_tunnel_inbound([("tcp", 40001)])
        await guard.swap_tunnel_inbound(forwarded)
        assert fake_nft.inbound_swaps == [(frozenset(), frozenset({("tcp", 40001)}))]
        assert guard.policy == forwarded
        assert await guard.check() is None  # the swap's result is the new reference
        fake_nft.installed = "table tunlock_test with a rule someone added"
        assert await guard.state() == (True, False, False, {"refused_out": 12})  # reading never restores
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


def test_run_checks_once_on_start_after_every_monitor_line_and_outlives_its_monitor(
    fake_nft: FakeNft, monitor_fifo: Path
) -> None:
    reports: list[str] = []
    restored = anyio.Event()

    async def on_tamper(reason: str) -> None:
        reports.append(reason)
        restored.set()

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
                await anyio.to_thread.run_sync(
                    write_lines, monitor_fifo, "delete table inet tunlock_test", ""
                )
                await restored.wait()
                # The stand-in ended when the FIFO closed: the guard starts another monitor, and
                # a change after that is caught as well.
                while guard.watch_restarts == 0:
                    await anyio.sleep(0.01)
                restored = anyio.Event()
                fake_nft.installed = "table tunlock_test accept everything"
                await anyio.to_thread.run_sync(
                    write_lines, monitor_fifo, "add rule inet tunlock_test out accept"
                )
                await restored.wait()
                tg.cancel_scope.cancel()

    anyio.run(main)
    assert reports == [
        "the lock table was changed",
        "the lock table was deleted",
        "the lock table was changed",
    ]


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


def test_check_links_applies_again_only_when_the_onlink_subnets_changed(
    fake_nft: FakeNft, onlink_now: list[tuple[IPv4Network, ...]]
) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        assert await guard.check_links() is False  # never applied: nothing to compare with
        await guard.apply()
        assert await guard.check_links() is False  # the same subnets
        onlink_now[0] = fake_nft.onlink = (IPv4Network("198.51.100.0/24"),)
        assert await guard.check_links() is True
        assert len(fake_nft.applied) == 2
        assert await guard.check_links() is False  # remembered what the new apply read
        assert guard.relinks == 1

    anyio.run(main)


def test_a_failed_apply_for_new_subnets_keeps_the_old_table_and_retries_next_time(
    fake_nft: FakeNft, onlink_now: list[tuple[IPv4Network, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        before = fake_nft.installed
        onlink_now[0] = (IPv4Network("198.51.100.0/24"),)

        def refuse(policy: LockPolicy) -> None:
            raise nft.LockError("nft: busy")

        monkeypatch.setattr(guard_module.nft, "apply", refuse)
        assert await guard.check_links() is False
        assert fake_nft.installed == before
        monkeypatch.setattr(guard_module.nft, "apply", fake_nft.apply)
        fake_nft.onlink = onlink_now[0]
        assert await guard.check_links() is True

    anyio.run(main)


def test_watch_follows_route_changes(
    fake_nft: FakeNft, onlink_now: list[tuple[IPv4Network, ...]], monitor_fifo: Path, route_fifo: Path
) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.watch)
                onlink_now[0] = fake_nft.onlink = (IPv4Network("198.51.100.0/24"),)
                await anyio.to_thread.run_sync(write_lines, route_fifo, "10.0.0.0/8 dev eth1 proto kernel")
                with anyio.fail_after(GUARD_S):
                    while guard.relinks == 0:
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert guard.relinks == 1

    anyio.run(main)


def test_without_the_ip_tool_routes_are_not_followed_and_nothing_fails(
    fake_nft: FakeNft, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    async def main() -> None:
        with anyio.fail_after(GUARD_S):
            await LockGuard(POLICY).follow_links()  # returns at once

    anyio.run(main)


def test_a_monitor_that_cannot_be_restarted_is_tried_again(
    fake_nft: FakeNft, monitor_fifo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard_module, "WATCH_RESTART_MAX_S", 0.01)
    monkeypatch.setattr(guard_module, "WATCH_RESTART_INITIAL_S", 0.01)

    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.run)
                monkeypatch.setattr(guard_module.nft, "NFT", str(tmp_path / "no-such-nft"))
                await anyio.to_thread.run_sync(write_lines, monitor_fifo)  # the first monitor ends
                while guard.watch_restarts < 3:  # each failed start is followed by another try
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_check_links_applies_again_when_the_uplinks_or_bridges_change(
    fake_nft: FakeNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uplink that appears (a new NIC with a default route) or a bridge that comes (a Docker
    network) needs the lock applied again: the egress chain and the bridge set name devices."""
    now = [AppliedLinks(egress_devices=("eth0",))]
    monkeypatch.setattr(guard_module, "read_links", lambda policy: now[0])

    def apply(policy: LockPolicy) -> AppliedLinks:
        fake_nft.apply(policy)
        return now[0]

    monkeypatch.setattr(guard_module.nft, "apply", apply)

    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        assert await guard.check_links() is False
        now[0] = AppliedLinks(egress_devices=("eth0", "eth1"))
        assert await guard.check_links() is True
        now[0] = AppliedLinks(egress_devices=("eth0", "eth1"), bridges=("docker0",))
        assert await guard.check_links() is True
        assert guard.relinks == 2
        assert len(fake_nft.applied) == 3

    anyio.run(main)


def test_where_the_kernel_refused_the_egress_chain_uplink_changes_do_not_reapply(
    fake_nft: FakeNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [AppliedLinks(egress_devices=("eth0",))]
    monkeypatch.setattr(guard_module, "read_links", lambda policy: now[0])

    def apply(policy: LockPolicy) -> AppliedLinks:
        fake_nft.apply(policy)
        return AppliedLinks(egress_devices=("eth0",), egress_refused=True)

    monkeypatch.setattr(guard_module.nft, "apply", apply)

    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        now[0] = AppliedLinks(egress_devices=("eth1",))
        assert await guard.check_links() is False

    anyio.run(main)
