"""The lock guard without root: an in-memory nftables, and a stand-in for its subscriptions.

The guard's logic (remember what it installed, compare after every change, restore and report)
is what these tests drive; nft itself cannot run without root, so ``supervisor.lock.nft`` is
replaced by a table held in memory, and the netlink subscriptions (nftables' group needs
CAP_NET_ADMIN) by socket pairs the test sends "a change" on. The real nft and netlink are
exercised by the lab tests.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network, ip_address

import anyio
import pytest

from supervisor.lock import guard as guard_module
from supervisor.lock import nft
from supervisor.lock.guard import LockGuard
from supervisor.lock.links import AppliedLinks
from supervisor.lock.policy import LockPolicy
from supervisor.lock.state import LockState
from supervisor.servers import Endpoint
from tests.unit.memory_nft import MemoryNft

GUARD_S = 10.0  # only stops a broken test from hanging
POLICY = LockPolicy(table="tunlock_test", tunnel_interface="tun-test", fwmark=0x5154)
ENDPOINT = Endpoint(ip_address("198.51.100.7"), 51820)


@pytest.fixture
def onlink_now(memory_nft: MemoryNft, monkeypatch: pytest.MonkeyPatch) -> list[tuple[IPv4Network, ...]]:
    """The on-link subnets as ``ip route`` would show them now (a one-item list to change)."""
    now = [memory_nft.onlink]
    monkeypatch.setattr(guard_module, "read_links", lambda policy: AppliedLinks(onlink=now[0]))
    return now


class FakeSubscription:
    """Stands in for a netlink subscription (subscribing to nftables' group needs root): each
    subscribe hands the guard the reading end of a new socket pair; ``change`` sends it one
    notification, ``end`` closes the sending side (the subscription reads end-of-file), ``refuse``
    makes the next subscribes fail as the kernel would."""

    def __init__(self) -> None:
        self.writers: list[socket.socket] = []
        self.readers: list[socket.socket] = []
        self.refusing = False

    def subscribe(self) -> socket.socket:
        if self.refusing:
            raise OSError(errno.EPERM, "refused")
        reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reader.setblocking(False)
        self.readers.append(reader)
        self.writers.append(writer)
        return reader

    def change(self) -> None:
        self.writers[-1].send(b"a change")

    def end(self) -> None:
        self.writers[-1].close()

    def close(self) -> None:
        for sock in self.writers + self.readers:
            sock.close()


def faked(monkeypatch: pytest.MonkeyPatch, subscribe: str) -> Iterator[FakeSubscription]:
    """The guard's ``subscription.<subscribe>`` replaced by a fake the test drives."""
    fake = FakeSubscription()
    monkeypatch.setattr(guard_module.subscription, subscribe, fake.subscribe)
    yield fake
    fake.close()


@pytest.fixture
def nft_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSubscription]:
    yield from faked(monkeypatch, "nftables_changes")


@pytest.fixture
def link_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSubscription]:
    yield from faked(monkeypatch, "link_changes")


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.01)


def test_apply_swap_and_state_follow_what_the_guard_installed(memory_nft: MemoryNft) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        assert await guard.state() == LockState()  # nothing installed yet
        await guard.apply()
        assert await guard.state() == LockState(True, True, False, {"refused_out": 12})  # no owned twin here
        wider = POLICY.with_endpoints([ENDPOINT])
        await guard.swap_endpoints(wider)
        assert memory_nft.swaps == [(frozenset(), frozenset({ENDPOINT}))]
        assert await guard.state() == LockState(True, True, False, {"refused_out": 12})  # no owned twin here
        assert await guard.check() is None  # unchanged: nothing to restore
        forwarded = wider.with_tunnel_inbound([("tcp", 40001)])
        await guard.swap_tunnel_inbound(forwarded)
        assert memory_nft.inbound_swaps == [(frozenset(), frozenset({("tcp", 40001)}))]
        assert guard.policy == forwarded
        assert await guard.check() is None  # the swap's result is the new reference
        memory_nft.installed = "table tunlock_test with a rule someone added"
        assert await guard.state() == LockState(True, False, False, {"refused_out": 12})  # never restores
        assert guard.restores == 0

    anyio.run(main)


def test_check_restores_a_changed_or_deleted_table_and_reports_it(memory_nft: MemoryNft) -> None:
    reports: list[str] = []

    async def on_tamper(reason: str) -> None:
        reports.append(reason)

    async def main() -> None:
        guard = LockGuard(POLICY, on_tamper)
        await guard.apply(POLICY.with_endpoints([ENDPOINT]))
        expected = memory_nft.installed
        memory_nft.installed = "table tunlock_test accept everything"
        assert await guard.check() == "the lock table was changed"
        assert memory_nft.installed == expected
        memory_nft.installed = None
        assert await guard.check() == "the lock table was deleted"
        assert memory_nft.installed == expected
        assert guard.restores == 2
        # Restored from the last policy the guard was given, endpoints included.
        assert memory_nft.applied[-1].endpoints == {ENDPOINT}

    anyio.run(main)
    assert reports == ["the lock table was changed", "the lock table was deleted"]


def test_run_checks_once_on_start_after_every_change_and_outlives_its_subscription(
    memory_nft: MemoryNft, nft_events: FakeSubscription
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
        memory_nft.installed = "changed while the daemon was starting"
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.run)
                # The check on start found the change made before the subscription.
                assert reports == ["the lock table was changed"]
                restored = anyio.Event()
                memory_nft.installed = None
                nft_events.change()
                await restored.wait()
                # The subscription ends: the guard subscribes again, checks at once, and a change
                # after that is caught as well.
                memory_nft.installed = "changed while nothing watched"
                restored = anyio.Event()
                nft_events.end()
                await restored.wait()
                assert guard.watch_restarts == 1
                restored = anyio.Event()
                memory_nft.installed = "table tunlock_test accept everything"
                nft_events.change()
                await restored.wait()
                tg.cancel_scope.cancel()

    anyio.run(main)
    assert reports == [
        "the lock table was changed",
        "the lock table was deleted",
        "the lock table was changed",
        "the lock table was changed",
    ]


def test_run_closes_its_subscription_when_cancelled(
    memory_nft: MemoryNft, nft_events: FakeSubscription
) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.run)
                tg.cancel_scope.cancel()
        assert guard.restores == 0

    anyio.run(main)
    assert [reader.fileno() for reader in nft_events.readers] == [-1]


def test_check_links_applies_again_only_when_the_onlink_subnets_changed(
    memory_nft: MemoryNft, onlink_now: list[tuple[IPv4Network, ...]]
) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        assert await guard.check_links() is False  # never applied: nothing to compare with
        await guard.apply()
        assert await guard.check_links() is False  # the same subnets
        onlink_now[0] = memory_nft.onlink = (IPv4Network("198.51.100.0/24"),)
        assert await guard.check_links() is True
        assert len(memory_nft.applied) == 2
        assert await guard.check_links() is False  # remembered what the new apply read
        assert guard.relinks == 1

    anyio.run(main)


def test_a_failed_apply_for_new_subnets_keeps_the_old_table_and_retries_next_time(
    memory_nft: MemoryNft, onlink_now: list[tuple[IPv4Network, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        before = memory_nft.installed
        onlink_now[0] = (IPv4Network("198.51.100.0/24"),)

        def refuse(policy: LockPolicy) -> None:
            raise nft.LockError("nft: busy")

        monkeypatch.setattr(guard_module.nft, "apply", refuse)
        assert await guard.check_links() is False
        assert memory_nft.installed == before
        monkeypatch.setattr(guard_module.nft, "apply", memory_nft.apply)
        memory_nft.onlink = onlink_now[0]
        assert await guard.check_links() is True

    anyio.run(main)


def test_watch_follows_route_changes(
    memory_nft: MemoryNft,
    onlink_now: list[tuple[IPv4Network, ...]],
    nft_events: FakeSubscription,
    link_events: FakeSubscription,
) -> None:
    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.watch)
                await until(lambda: bool(link_events.writers))
                onlink_now[0] = memory_nft.onlink = (IPv4Network("198.51.100.0/24"),)
                link_events.change()
                await until(lambda: guard.relinks == 1)
                # A subscription that fails is made again, and the links checked at once: a change
                # while nothing watched is not missed.
                onlink_now[0] = memory_nft.onlink = (IPv4Network("203.0.113.0/24"),)
                link_events.end()
                await until(lambda: guard.relinks == 2)
                assert guard.link_watch_restarts == 1
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_subscription_that_cannot_be_made_again_is_tried_again(
    memory_nft: MemoryNft, nft_events: FakeSubscription, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard_module, "WATCH_RESTART_MAX_S", 0.01)
    monkeypatch.setattr(guard_module, "WATCH_RESTART_INITIAL_S", 0.01)

    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(guard.run)
                nft_events.refusing = True
                nft_events.end()  # the first subscription ends
                await until(lambda: guard.watch_restarts >= 3)  # each failed one is tried again
                nft_events.refusing = False
                memory_nft.installed = None
                await until(lambda: guard.restores == 1)  # and once it works, it checks at once
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_check_links_applies_again_when_the_uplinks_or_bridges_change(
    memory_nft: MemoryNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uplink that appears (a new NIC with a default route) or a bridge that comes (a Docker
    network) needs the lock applied again: the egress chain and the bridge set name devices."""
    now = [AppliedLinks(egress_devices=("eth0",))]
    monkeypatch.setattr(guard_module, "read_links", lambda policy: now[0])

    def apply(policy: LockPolicy) -> AppliedLinks:
        memory_nft.apply(policy)
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
        assert len(memory_nft.applied) == 3

    anyio.run(main)


def test_where_the_kernel_refused_the_egress_chain_uplink_changes_do_not_reapply(
    memory_nft: MemoryNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [AppliedLinks(egress_devices=("eth0",))]
    monkeypatch.setattr(guard_module, "read_links", lambda policy: now[0])

    def apply(policy: LockPolicy) -> AppliedLinks:
        memory_nft.apply(policy)
        return AppliedLinks(egress_devices=("eth0",), egress_refused=True)

    monkeypatch.setattr(guard_module.nft, "apply", apply)

    async def main() -> None:
        guard = LockGuard(POLICY)
        await guard.apply()
        now[0] = AppliedLinks(egress_devices=("eth1",))
        assert await guard.check_links() is False

    anyio.run(main)
