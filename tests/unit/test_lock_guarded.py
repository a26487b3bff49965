"""The lock as the runtime drives it (GuardedLock), against stand-ins for the guard and tables.

What is decided here is which change the lock gets (an endpoint swap or the whole table), what
it keeps across changes, and the order of things at removal and at exit. No nft runs in a unit
test (outside any lab namespace); the stand-ins record what they were asked, and the "tables"
they keep are a flag. The real guard, owner and nft are exercised in tests/lab/test_lock_guard.py,
tests/lab/test_lock_owner.py and tests/lab/test_daemon_flush.py; a kernel without the owner flag
(Linux < 5.12) cannot be booted here, so that fallback is driven by a stand-in for its refusal.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import structlog
from anyio import wait_all_tasks_blocked

from supervisor.lock import guard as guard_module
from supervisor.lock import nft
from supervisor.lock.guard import OnTamper
from supervisor.lock.guarded import GuardedLock, cheapest_change
from supervisor.lock.links import AppliedLinks
from supervisor.lock.owner import NftContext, OwningContext
from supervisor.lock.policy import LockPolicy
from supervisor.lock.state import LockState
from supervisor.net.bypass import BypassWorkload
from supervisor.redact import Secret
from supervisor.servers import Endpoint, Peer, Server
from tests.unit.memory_nft import (
    MemoryNft,
    UnwatchedGuard,
    guarded_lock_over_memory_nft,
    no_libnftables,
    no_owner,
)

BASE = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C)
GUARD_S = 10.0  # only stops a broken test from hanging; nothing here measures time


def server(name: str, last_octet: int, dns: str | None = "10.64.0.1") -> Server:
    endpoint = Endpoint(ip_address(f"198.51.100.{last_octet}"), 51820)
    peer = Peer(public_key=f"{name}-key", endpoint=endpoint, allowed_ips=())
    return Server(
        name=name,
        path=Path(f"/nowhere/{name}.conf"),
        private_key=Secret("x"),
        addresses=(),
        peer=peer,
        dns=(ip_address(dns),) if dns else (),
    )


A, B = server("a", 1), server("b", 2)
C_OTHER_DNS = server("c", 3, dns="10.99.0.1")


class World:
    """The host as the stand-ins see it: whether the ordinary table is in place, and every call
    made on the guard, the owner and the ordinary table, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.installed = False
        self.changed = anyio.Event()  # what `nft monitor` would print: something changed
        self.watching = 0
        self.apply_fails: Exception | None = None

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


class FakeGuard:
    """Stands in for LockGuard: applies and swaps by recording; its watch restores the table
    whenever a change leaves it missing, as the real guard does after a flush."""

    def __init__(self, world: World, policy: LockPolicy, on_tamper: OnTamper) -> None:
        self.world = world
        self.policy = policy
        self.owner: Any = None
        self.links: AppliedLinks | None = None
        self.reader: Any = None
        self.on_tamper = on_tamper
        self.restores = 0

    async def apply(self, policy: LockPolicy) -> None:
        self.policy = policy
        self.world.installed = True
        self.world.calls.append(("apply", policy))

    async def swap_endpoints(self, policy: LockPolicy) -> None:
        self.policy = policy
        self.world.calls.append(("swap_endpoints", policy))

    async def swap_tunnel_inbound(self, policy: LockPolicy) -> None:
        self.policy = policy
        self.world.calls.append(("swap_tunnel_inbound", policy))

    async def state(self) -> LockState:
        return LockState(self.world.installed, True, self.owner is not None)

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.world.watching += 1
        task_status.started()
        try:
            while True:
                await self.world.changed.wait()
                self.world.changed = anyio.Event()
                if not self.world.installed:
                    await self.apply(self.policy)
                    self.restores += 1
                    await self.on_tamper("the lock table was deleted")
        finally:
            self.world.watching -= 1


class FakeOrdinaryTable:
    """Stands in for supervisor.lock.nft (called from a worker thread, as nft is)."""

    def __init__(self, world: World) -> None:
        self.world = world

    def apply(self, policy: LockPolicy) -> None:
        self.world.calls.append(("ordinary.apply", policy))
        if self.world.apply_fails is not None:
            raise self.world.apply_fails
        self.world.installed = True

    def remove(self, table: str) -> None:
        self.world.calls.append(("ordinary.remove", table))
        self.world.installed = False
        anyio.from_thread.run_sync(self.world.changed.set)


class FakeOwner(OwningContext):
    """Stands in for OwningContext (no thread, no libnftables): removing through it removes both
    tables. Only what GuardedLock calls is overridden; FakeGuard calls nothing else."""

    def __init__(self, world: World) -> None:  # no super().__init__(): it opens libnftables
        self.world = world

    def remove(self, table: str) -> None:
        self.world.calls.append(("owner.remove", table))
        self.world.installed = False
        anyio.from_thread.run_sync(self.world.changed.set)

    def close(self) -> None:
        self.world.calls.append(("owner.close",))


class FakeReader(NftContext):
    """Stands in for NftContext: a libnftables context that only reads. Only what GuardedLock
    calls is overridden, as in FakeOwner."""

    def __init__(self, world: World) -> None:  # no super().__init__(): it opens libnftables
        self.world = world

    def close(self) -> None:
        self.world.calls.append(("reader.close",))


Scenario = Callable[[GuardedLock, World], Awaitable[None]]


def run(
    scenario: Scenario, *, owned: bool = True, library: bool = True, tampered: list[str] | None = None
) -> World:
    """``scenario`` against a GuardedLock wired to stand-ins; the world it left."""

    async def main() -> World:
        world = World()

        async def on_tamper(reason: str) -> None:
            if tampered is not None:
                tampered.append(reason)

        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                lock = GuardedLock(
                    BASE,
                    tg,
                    on_tamper,
                    make_guard=lambda policy, told: FakeGuard(world, policy, told),
                    open_owner=(lambda table: FakeOwner(world)) if owned else no_owner,
                    open_reader=(lambda: FakeReader(world)) if library else no_libnftables,
                    ordinary=FakeOrdinaryTable(world),
                )
                await scenario(lock, world)
                tg.cancel_scope.cancel()
        return world

    return anyio.run(main)


# --- choosing the change -----------------------------------------------------------------------


def test_the_first_apply_installs_the_whole_table_and_starts_one_watch() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.apply((A, B))
        assert world.watching == 1
        assert lock.servers == (A, B)

    world = run(scenario)
    assert world.calls == [("apply", BASE.with_servers((A,))), ("apply", BASE.with_servers((A, B)))]


def test_moving_to_a_server_with_the_same_tunnel_dns_swaps_the_endpoints_only() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.set_servers((B,))
        assert lock.servers == (B,)

    world = run(scenario)
    assert world.calls[1:] == [("swap_endpoints", BASE.with_servers((B,)))]


def test_moving_to_a_server_with_another_tunnel_dns_applies_the_whole_table() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.set_servers((C_OTHER_DNS,))

    world = run(scenario)
    assert world.calls[1:] == [("apply", BASE.with_servers((C_OTHER_DNS,)))]


def test_ports_a_plugin_opened_are_kept_across_whole_applies() -> None:
    forwarded = frozenset({("tcp", 40001), ("udp", 40001)})

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.set_tunnel_inbound(forwarded)
        await lock.set_servers((C_OTHER_DNS,))  # a whole apply
        await lock.apply((A,))

    world = run(scenario)
    with_ports = BASE.with_tunnel_inbound(forwarded)
    assert world.calls[1:] == [
        ("swap_tunnel_inbound", with_ports.with_servers((A,))),
        ("apply", with_ports.with_servers((C_OTHER_DNS,))),
        ("apply", with_ports.with_servers((A,))),
    ]


# --- a reload ------------------------------------------------------------------------------------


def test_a_reload_keeps_only_the_servers_still_configured_and_applies_what_changed() -> None:
    new_base = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C, allow_lan=True)

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A, B))
        await lock.rebase(new_base, {"b": B, "c": C_OTHER_DNS})
        assert lock.servers == (B,)

    world = run(scenario)
    assert world.calls[1:] == [("apply", new_base.with_servers((B,)))]


def test_a_reload_that_changes_nothing_in_the_lock_applies_nothing() -> None:
    moved_elsewhere_in_the_file = server("a", 1)  # read again: equal, not the same object

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.rebase(BASE, {"a": moved_elsewhere_in_the_file, "b": B})
        assert lock.servers == (A,)

    world = run(scenario)
    assert world.names() == ["apply"]


def test_a_reload_that_changes_a_kept_server_swaps_in_its_new_endpoint() -> None:
    a_moved = server("a", 9)

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.rebase(BASE, {"a": a_moved})
        assert lock.servers == (a_moved,)

    world = run(scenario)
    assert world.calls[1:] == [("swap_endpoints", BASE.with_servers((a_moved,)))]


# --- the guard's watch -------------------------------------------------------------------------


def test_the_watch_restores_a_deleted_table_and_reports_why() -> None:
    tampered: list[str] = []

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        world.installed = False  # another program deleted it
        world.changed.set()
        await wait_all_tasks_blocked()
        assert lock.restores == 1

    world = run(scenario, tampered=tampered)
    assert world.installed
    assert tampered == ["the lock table was deleted"]


@pytest.mark.parametrize(("owned", "removal"), [(True, "owner.remove"), (False, "ordinary.remove")])
def test_remove_stops_the_watch_first_so_the_guard_cannot_restore_it(owned: bool, removal: str) -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.remove()
        await wait_all_tasks_blocked()  # a watch still running would have restored it by now
        assert world.watching == 0 and lock.restores == 0

    world = run(scenario, owned=owned)
    assert not world.installed
    assert world.names() == ["apply", removal]


# --- at exit -------------------------------------------------------------------------------------


def test_close_puts_the_ordinary_table_in_place_then_frees_the_owned_twin() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        world.installed = False  # a flush just before the end: the owned twin alone holds
        await lock.close()
        assert world.watching == 0 and lock.restores == 0

    world = run(scenario)
    assert world.calls == [
        ("apply", BASE.with_servers((A,))),
        ("ordinary.apply", BASE.with_servers((A,))),
        ("owner.close",),
    ]
    assert world.installed


def test_close_after_remove_does_not_put_the_lock_back() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.remove()
        await lock.close()

    world = run(scenario)
    assert world.names() == ["apply", "owner.remove", "owner.close"]
    assert not world.installed


def test_close_frees_the_owned_twin_even_when_the_ordinary_table_cannot_be_applied() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        world.apply_fails = OSError("nft: netlink: Error: Could not process rule: No buffer space")
        with structlog.testing.capture_logs() as logs:
            await lock.close()
        errors = [entry for entry in logs if entry["log_level"] == "error"]
        assert [entry["event"] for entry in errors] == ["could not re-apply the lock at exit"]
        assert "No buffer space" in errors[0]["error"]

    world = run(scenario)
    assert world.names() == ["apply", "ordinary.apply", "owner.close"]


def test_without_the_owner_flag_it_says_so_once_and_keeps_the_guard_alone() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        with structlog.testing.capture_logs() as logs:
            await lock.apply((A,))
            await lock.apply((B,))  # a second apply does not ask (or say it) again
            await lock.close()  # nothing owned, nothing to free or re-apply
        said = [entry for entry in logs if "owner flag" in entry["event"]]
        assert len(said) == 1 and said[0]["log_level"] == "warning"
        assert "guard alone" in said[0]["event"] and "Operation not supported" in said[0]["reason"]
        assert lock.guard.owner is None

    world = run(scenario, owned=False)
    assert world.names() == ["apply", "apply", "reader.close"]


def test_without_the_owner_flag_the_guard_reads_through_a_context_of_its_own() -> None:
    """An `nft list` child per read (each status request, each nftables event) fragmented a
    worker thread's memory for good; a context that only reads does not (LockGuard._reading)."""

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        assert isinstance(lock.guard.reader, FakeReader)
        await lock.close()
        assert lock.guard.reader is None

    world = run(scenario, owned=False)
    assert world.names() == ["apply", "reader.close"]


def test_without_libnftables_the_nft_tool_reads() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        with structlog.testing.capture_logs() as logs:
            await lock.apply((A,))
        assert lock.guard.reader is None
        said = [entry for entry in logs if "nft tool reads" in entry["event"]]
        assert len(said) == 1 and "cannot be loaded" in said[0]["reason"]
        await lock.close()

    world = run(scenario, owned=False, library=False)
    assert world.names() == ["apply"]


def test_with_the_owner_flag_the_lock_is_held_twice_and_said_once() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        with structlog.testing.capture_logs() as logs:
            await lock.apply((A,))
            await lock.apply((B,))
        said = [entry for entry in logs if entry["event"] == "the lock is held twice while running"]
        assert len(said) == 1 and said[0]["owned_table"] != said[0]["table"]
        assert isinstance(lock.guard.owner, FakeOwner)
        assert await lock.state() == LockState(True, True, True)  # the guard's reading, owned twin held

    run(scenario)


# --- one writer ---------------------------------------------------------------------------------


def test_a_port_request_during_a_server_swap_leaves_table_guard_and_intent_agreeing(
    memory_nft: MemoryNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #22's race: a plugin's port request arriving while the move to B is on its way. With
    two writers the guard ended up remembering A (the port request's policy was built from the
    servers before the move), so the next restore after tampering cut the tunnel to B."""
    forwarded = frozenset({("tcp", 40001)})
    swap_entered, swap_may_finish = threading.Event(), threading.Event()
    swap_endpoints = memory_nft.swap_endpoints

    def slow_swap(policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> None:
        swap_entered.set()
        swap_may_finish.wait(GUARD_S)
        swap_endpoints(policy, old, new)

    monkeypatch.setattr(guard_module.nft, "swap_endpoints", slow_swap)

    async def main() -> GuardedLock:
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                lock = guarded_lock_over_memory_nft(BASE, tg)
                await lock.apply((A,))
                async with anyio.create_task_group() as writers:
                    writers.start_soon(lock.set_servers, (B,))
                    await anyio.to_thread.run_sync(swap_entered.wait)
                    writers.start_soon(lock.set_tunnel_inbound, forwarded)
                    await wait_all_tasks_blocked()  # the port request waits on the swap
                    swap_may_finish.set()
                memory_nft.installed = None  # another program deletes the table
                guard = lock.guard
                assert isinstance(guard, UnwatchedGuard)
                assert await guard.check() == "the lock table was deleted"
                tg.cancel_scope.cancel()
        return lock

    lock = anyio.run(main)
    wanted = BASE.with_servers((B,)).with_tunnel_inbound(forwarded)
    assert lock.intent.policy() == wanted
    assert lock.guard.policy == wanted
    assert memory_nft.applied[-1] == wanted, "the restore put back another policy than the one wanted"


def test_a_refused_swap_falls_back_to_the_whole_table_and_the_guard_remembers_what_is_installed(
    memory_nft: MemoryNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> None:
        raise nft.LockError("nft: Error: Could not process rule: No such file or directory")

    monkeypatch.setattr(guard_module.nft, "swap_endpoints", refuse)

    async def main() -> GuardedLock:
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                lock = guarded_lock_over_memory_nft(BASE, tg)
                await lock.apply((A,))
                with structlog.testing.capture_logs() as logs:
                    await lock.set_servers((B,))
                assert [e["event"] for e in logs] == ["endpoints swap failed; applying the whole lock"]
                tg.cancel_scope.cancel()
        return lock

    lock = anyio.run(main)
    assert memory_nft.applied == [BASE.with_servers((A,)), BASE.with_servers((B,))]
    assert lock.guard.policy == BASE.with_servers((B,))


def test_a_port_request_before_the_first_apply_is_installed_with_it() -> None:
    forwarded = frozenset({("udp", 40001)})

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.set_tunnel_inbound(forwarded)
        assert world.calls == []  # nothing installed yet: nothing to swap
        await lock.apply((A,))

    world = run(scenario)
    assert world.calls == [("apply", BASE.with_servers((A,)).with_tunnel_inbound(forwarded))]


@pytest.mark.parametrize(
    ("wanted", "change"),
    [
        (BASE.with_servers((A,)), None),
        (BASE.with_servers((B,)), "endpoints"),
        (BASE.with_servers((A,)).with_tunnel_inbound({("tcp", 1)}), "inbound"),
        (BASE.with_servers((C_OTHER_DNS,)), "whole"),
        (BASE.with_servers((B,)).with_tunnel_inbound({("tcp", 1)}), "whole"),
    ],
)
def test_the_cheapest_change_is_a_swap_only_when_that_is_all_that_differs(
    wanted: LockPolicy, change: str | None
) -> None:
    assert cheapest_change(BASE.with_servers((A,)), wanted) == change
    assert cheapest_change(None, wanted) == "whole"


def test_the_state_carries_the_egress_chain_and_the_bypass_workloads_as_last_applied() -> None:
    """What `tunlock status` shows: the uplinks the egress chain is on, and each workload whose
    frames skip the host's netfilter; none of the egress when the kernel refused it."""
    child = BypassWorkload("macvlan", "mv1", "macvlan child of uplink eth0")

    async def scenario(lock: GuardedLock, world: World) -> None:
        assert isinstance(lock.guard, FakeGuard)
        state = await lock.state()
        assert (state.egress, state.bypass) == ((), ())
        lock.guard.links = AppliedLinks(egress_devices=("eth0",), bypass=(child,))
        state = await lock.state()
        assert (state.egress, state.bypass) == (("eth0",), (child.as_dict(),))
        lock.guard.links = AppliedLinks(egress_devices=("eth0",), bypass=(child,), egress_refused=True)
        state = await lock.state()
        assert (state.egress, state.bypass) == ((), (child.as_dict(),))

    run(scenario)
