"""The lock as the runtime drives it (GuardedLock), against stand-ins for the guard and tables.

What is decided here is which change the lock gets (an endpoint swap or the whole table), what
it keeps across changes, and the order of things at removal and at exit. No nft runs in a unit
test (outside any lab namespace); the stand-ins record what they were asked, and the "tables"
they keep are a flag. The real guard, owner and nft are exercised in tests/lab/test_lock_guard.py,
tests/lab/test_lock_owner.py and tests/lab/test_daemon_flush.py; a kernel without the owner flag
(Linux < 5.12) cannot be booted here, so that fallback is driven by a stand-in for its refusal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import structlog
from anyio import wait_all_tasks_blocked

from supervisor.lock.guard import OnTamper
from supervisor.lock.guarded import GuardedLock
from supervisor.lock.links import AppliedLinks
from supervisor.lock.owner import OwnerUnavailable
from supervisor.lock.policy import LockPolicy
from supervisor.net.bypass import BypassWorkload
from supervisor.redact import Secret
from supervisor.servers import Endpoint, Peer, Server

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

    async def state(self) -> tuple[bool, bool, bool, dict[str, int]]:
        return self.world.installed, True, self.owner is not None, {}

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


class FakeOwner:
    """Stands in for OwningContext: removing through it removes both tables."""

    def __init__(self, world: World) -> None:
        self.world = world

    def remove(self, table: str) -> None:
        self.world.calls.append(("owner.remove", table))
        self.world.installed = False
        anyio.from_thread.run_sync(self.world.changed.set)

    def close(self) -> None:
        self.world.calls.append(("owner.close",))


def no_owner(table: str) -> Any:
    raise OwnerUnavailable("nft: Error: Could not process rule: Operation not supported")


Scenario = Callable[[GuardedLock, World], Awaitable[None]]


def run(scenario: Scenario, *, owned: bool = True, tampered: list[str] | None = None) -> World:
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


def test_a_reload_that_changes_a_kept_server_applies_its_new_endpoint() -> None:
    a_moved = server("a", 9)

    async def scenario(lock: GuardedLock, world: World) -> None:
        await lock.apply((A,))
        await lock.rebase(BASE, {"a": a_moved})
        assert lock.servers == (a_moved,)

    world = run(scenario)
    assert world.calls[1:] == [("apply", BASE.with_servers((a_moved,)))]


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
    assert world.names() == ["apply", "apply"]


def test_with_the_owner_flag_the_lock_is_held_twice_and_said_once() -> None:
    async def scenario(lock: GuardedLock, world: World) -> None:
        with structlog.testing.capture_logs() as logs:
            await lock.apply((A,))
            await lock.apply((B,))
        said = [entry for entry in logs if entry["event"] == "the lock is held twice while running"]
        assert len(said) == 1 and said[0]["owned_table"] != said[0]["table"]
        assert isinstance(lock.guard.owner, FakeOwner)
        assert await lock.state() == (True, True, True, {})  # the guard's reading, owned twin held

    run(scenario)


def test_exposure_reports_the_egress_chain_and_the_bypass_workloads_as_last_applied() -> None:
    """What `tunlock status` shows: the uplinks the egress chain is on, and each workload whose
    frames skip the host's netfilter; none of the egress when the kernel refused it."""
    world = World()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            guarded = GuardedLock(BASE, tg, on_tamper, make_guard=lambda p, told: FakeGuard(world, p, told))
            check(guarded)

    async def on_tamper(reason: str) -> None:
        pass

    anyio.run(main)


def check(guarded: GuardedLock) -> None:
    assert guarded.exposure() == ([], [])
    assert isinstance(guarded.guard, FakeGuard)
    child = BypassWorkload("macvlan", "mv1", "macvlan child of uplink eth0")
    guarded.guard.links = AppliedLinks(egress_devices=("eth0",), bypass=(child,))
    assert guarded.exposure() == (["eth0"], [child.as_dict()])
    guarded.guard.links = AppliedLinks(egress_devices=("eth0",), bypass=(child,), egress_refused=True)
    assert guarded.exposure() == ([], [child.as_dict()])
