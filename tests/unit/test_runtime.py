"""The runtime driven without root: fake adapters, a fake clock, events in, calls out.

As h11 is tested by feeding it bytes, the runtime is fed events through its stream and the test
reads what it asked of the world: every call on the lock, the tunnel and the prober lands in one
ordered log, every published status in a stream. The adapters are fakes because the point is
the runtime's own logic (order of actions, timer generations, failures of an adapter); the real
adapters are exercised in the lab tier.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from msgspec.structs import replace

from supervisor import runtime as runtime_module
from supervisor.lock.policy import LockPolicy
from supervisor.lock.state import LockState
from supervisor.machine import actions as act
from supervisor.machine import events as ev
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import Machine
from supervisor.net.dns import DnsError
from supervisor.redact import Secret
from supervisor.runtime import Inbox, LockFailed, Reconfiguration, Runtime, Status, TimerDue, TrafficWatch
from supervisor.servers import Endpoint, Peer, Server
from supervisor.status import StatusReport
from supervisor.wireguard.backend import TunnelStats
from tests.unit.memory_nft import MemoryNft, guarded_lock_over_memory_nft

GUARD_S = 10.0  # only stops a broken test from hanging; nothing here measures time


def server(name: str, last_octet: int) -> Server:
    endpoint = Endpoint(ip_address(f"198.51.100.{last_octet}"), 51820)
    peer = Peer(public_key=f"{name}-key", endpoint=endpoint, allowed_ips=())
    return Server(
        name=name, path=Path(f"/nowhere/{name}.conf"), private_key=Secret("x"), addresses=(), peer=peer
    )


SERVERS = {"a": server("a", 1), "b": server("b", 2)}
# Timers far beyond any test's life unless a test asks for a short one.
SLOW = MachineSettings(
    servers=("a", "b"),
    probe_interval_s=3600,
    interval_s=3600,
    idle_interval_s=3600,
    backoff_initial_s=3600,
    backoff_max_s=3600,
    connect_timeouts_s=(3600,),
)


# A macvlan child of the uplink, as the lock reports it (supervisor.net.bypass).
BYPASS = [{"kind": "macvlan", "interface": "mv1", "detail": "macvlan child of uplink eth0"}]


class World:
    """Fake lock, tunnel and prober sharing one ordered log of what the runtime asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.failing: dict[str, BaseException] = {}
        self.failing_once: dict[str, BaseException] = {}
        self.stats_answers: list[TunnelStats] = []
        self.lock_reading = LockState(installed=True, matching=True, owned=True, counters={"refused": 3})
        self.stats_read = anyio.Event()
        self.lock_gates: dict[str, anyio.Event] = {}  # a lock call waits on its gate, if it has one

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        error = self.failing_once.pop(call[0], None) or self.failing.get(call[0])
        if error is not None:
            raise error

    # Lock
    async def apply(self, servers: tuple[Server, ...]) -> None:
        self._call("apply", tuple(s.name for s in servers))
        if "apply" in self.lock_gates:
            await self.lock_gates["apply"].wait()

    async def set_servers(self, servers: tuple[Server, ...]) -> None:
        self._call("set_servers", tuple(s.name for s in servers))
        if "set_servers" in self.lock_gates:
            await self.lock_gates["set_servers"].wait()

    async def rebase(self, base: LockPolicy, servers: Mapping[str, Server]) -> None:
        self._call("rebase", base.table, tuple(sorted(servers)))

    async def remove(self) -> None:
        self._call("remove")

    async def state(self) -> LockState:
        self._call("state")
        return self.lock_reading

    def exposure(self) -> tuple[list[str], list[dict[str, str]]]:
        return ["eth0"], BYPASS

    # TunnelControl
    async def connect(self, server: Server) -> None:
        self._call("connect", server.name)

    async def complete_adoption(self) -> None:
        self._call("complete_adoption")

    async def restart_handshake(self, server: Server) -> None:
        self._call("restart_handshake", server.name)

    async def disconnect(self) -> None:
        self._call("disconnect")

    async def close(self, keep_interface: bool = False) -> None:
        self._call("close")

    async def stats(self) -> TunnelStats:
        self.stats_read.set()
        self.stats_read = anyio.Event()
        self._call("stats")
        # Unless a test says otherwise: a peer that has not answered yet.
        return self.stats_answers.pop(0) if self.stats_answers else stats(rx=0, tx=0, age=None)

    # Prober
    def send(self, target: IPv4Address | IPv6Address, ifname: str) -> None:
        self._call("probe", str(target), ifname)

    def without_probes(self) -> list[tuple[Any, ...]]:
        """The lock and peer calls in order: probes and counter reads left out (tests that are
        not about them; the machine asks for both at its own pace)."""
        return [call for call in self.calls if call[0] not in ("probe", "stats")]

    def reads(self) -> int:
        return sum(1 for call in self.calls if call[0] == "stats")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stats(rx: int, tx: int, age: float | None) -> TunnelStats:
    endpoint = SERVERS["a"].endpoint
    return TunnelStats("a-key", endpoint, None if age is None else time.time() - age, age, rx, tx)


def probe_target(server: Server) -> IPv4Address | IPv6Address | None:
    return ip_address("10.64.0.1") if server.name != "b" else None


def make_runtime(
    world: World,
    publish: Callable[[Status], None],
    settings: MachineSettings = SLOW,
    *,
    clock: Clock | None = None,
    inbox: Inbox | None = None,
    traffic: TrafficWatch | None = None,
) -> Runtime:
    """The runtime with ``world`` as its lock, tunnel and prober (and ``traffic`` as its traffic
    watch); each status published as a copy (the runtime goes on changing its own)."""
    return Runtime(
        Machine.initial(settings),
        SERVERS,
        world,
        world,
        world,
        ifname="tun-test",
        probe_target=probe_target,
        clock=clock,
        inbox=inbox,
        on_publish=lambda status: publish(_copy(status)),
        traffic=traffic,
    )


Scenario = Callable[[Runtime, World, MemoryObjectReceiveStream[Status]], Awaitable[None]]


def run(
    scenario: Scenario, settings: MachineSettings = SLOW, world: World | None = None
) -> tuple[Runtime, World]:
    """Run the runtime against ``world`` while ``scenario`` feeds it; it must end by itself."""
    world = world or World()
    published_send, published = anyio.create_memory_object_stream[Status](math.inf)
    runtime = make_runtime(world, published_send.send_nowait, settings, clock=Clock())

    async def main() -> None:
        ended = anyio.Event()

        async def run_runtime(tg: anyio.abc.TaskGroup) -> None:
            await runtime.run(tg)
            ended.set()

        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_runtime, tg)
                await scenario(runtime, world, published)
                await ended.wait()
                # As the daemon does once the runtime returned: timers a test reported by hand
                # (their own tasks still asleep) go with the task group.
                tg.cancel_scope.cancel()

    anyio.run(main)
    return runtime, world


def _copy(status: Status) -> Status:
    return replace(status, entered=dict(status.entered), failures=dict(status.failures))


async def next_state(published: MemoryObjectReceiveStream[Status]) -> str:
    return (await published.receive()).state


async def settle(runtime: Runtime, published: MemoryObjectReceiveStream[Status]) -> Status:
    """Wait until everything queued so far was handled: a marker event, published in its turn
    (one stream, handled in order)."""
    await runtime.post(lambda now: ev.LockTampered(now, "a marker"))
    return await published.receive()


async def stop(runtime: Runtime, published: MemoryObjectReceiveStream[Status]) -> None:
    await runtime.post(lambda now: ev.Stop(now))
    assert await next_state(published) == "stopped"


# --- order of actions -------------------------------------------------------------------------


def test_start_locks_before_anything_then_configures() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await stop(runtime, published)

    runtime, world = run(scenario)
    assert world.without_probes() == [("apply", ("a",)), ("connect", "a"), ("close",)]
    assert ("probe", "10.64.0.1", "tun-test") in world.calls
    assert runtime.status.state == "stopped"
    assert runtime.status.entered == {"connecting": 1, "stopped": 1}


def test_an_adopted_tunnel_is_checked_after_the_lock_and_before_any_status() -> None:
    """Issue #27 item 4: a tunnel taken over carries traffic already; the lock goes in first,
    then its routes and resolvers are checked, and only then is the first state published (so
    `connected` means they were, as after a connect)."""

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1, adopted="b"))
        status = await published.receive()
        assert (status.state, status.server) == ("connecting", "b")
        assert world.without_probes() == [("apply", ("b",)), ("complete_adoption",)]
        await stop(runtime, published)

    run(scenario)


def test_an_adoption_that_cannot_be_completed_fails_that_server_as_a_connect_would() -> None:
    world = World()
    world.failing_once["complete_adoption"] = DnsError("cannot write /etc/resolv.conf: read-only file system")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1, adopted="a"))
        first = await published.receive()
        second = await published.receive()
        assert (first.state, first.server) == ("connecting", "a")
        assert (second.state, second.server) == ("connecting", "b")
        assert second.last_failure is not None and second.last_failure.server == "a"
        assert second.last_failure.reason == "cannot write /etc/resolv.conf: read-only file system"
        await stop(runtime, published)

    _, world = run(scenario, world=world)
    assert world.without_probes()[:4] == [
        ("apply", ("a",)),
        ("complete_adoption",),
        ("set_servers", ("b",)),
        ("connect", "b"),
    ]


def test_the_first_connect_costs_one_lock_transaction(memory_nft: MemoryNft) -> None:
    """Issue #27 item 4: the start installed the lock letting no server through, then at once the
    whole table again for the chosen server (its resolvers are other rules): two transactions
    before the first packet. Counted here on the lock's real writer and guard over the in-memory
    nft (nft itself needs root)."""
    resolver = (ip_address("10.64.0.1"),)
    servers = {name: replace(s, dns=resolver) for name, s in SERVERS.items()}
    base = LockPolicy(table="tunlock-test", tunnel_interface="tun-test", fwmark=0x5154)
    world = World()

    async def main() -> None:
        published_send, published = anyio.create_memory_object_stream[Status](math.inf)
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                lock = guarded_lock_over_memory_nft(base, tg)
                runtime = Runtime(
                    Machine.initial(SLOW),
                    servers,
                    lock,
                    world,
                    world,
                    ifname="tun-test",
                    probe_target=probe_target,
                    clock=Clock(),
                    on_publish=published_send.send_nowait,
                )
                tg.start_soon(runtime.run, tg)
                await runtime.post(lambda now: ev.Start(now, seed=1))
                assert await next_state(published) == "connecting"
                tg.cancel_scope.cancel()

    anyio.run(main)
    assert world.without_probes() == [("connect", "a")]
    assert memory_nft.applied == [base.with_servers((servers["a"],))]
    assert memory_nft.swaps == [] and memory_nft.inbound_swaps == []


def test_stop_in_session_mode_removes_the_lock_after_closing_the_tunnel() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await stop(runtime, published)

    session = replace(SLOW, lock_mode="session")
    _, world = run(scenario, session)
    assert world.without_probes()[-2:] == [("close",), ("remove",)]


def test_a_peer_that_will_not_configure_is_answered_at_once_with_the_next_server() -> None:
    world = World()
    world.failing_once["connect"] = OSError("wireguard-go refused")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        first = await published.receive()
        second = await published.receive()
        # The failure is handled ahead of the stream: "a" fails, "b" is tried, before any Stop.
        assert (first.state, first.server) == ("connecting", "a")
        assert (second.state, second.server) == ("connecting", "b")
        assert second.last_failure is not None
        assert second.last_failure.server == "a"
        assert second.last_failure.reason == "wireguard-go refused"
        assert second.failures == {"a": 1}
        await stop(runtime, published)

    _, world = run(scenario, world=world)
    assert world.without_probes()[:4] == [
        ("apply", ("a",)),
        ("connect", "a"),
        ("set_servers", ("b",)),
        ("connect", "b"),
    ]


def test_a_server_missing_from_the_runtime_fails_as_not_configured() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        runtime.servers = {"b": SERVERS["b"]}
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        second = await published.receive()
        assert second.server == "b"
        assert second.last_failure is not None
        assert second.last_failure.reason == "not configured"
        await stop(runtime, published)

    _, world = run(scenario)
    # "a" is unknown: the lock lets no server through, never a server the runtime cannot name.
    assert world.without_probes()[:3] == [
        ("apply", ()),
        ("set_servers", ("b",)),
        ("connect", "b"),
    ]


def test_every_server_failing_drops_the_peer_and_publishes_blocked() -> None:
    world = World()
    world.failing["connect"] = OSError("no")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        states = [await next_state(published) for _ in range(3)]
        assert states == ["connecting", "connecting", "blocked"]
        assert runtime.status.server is None
        await stop(runtime, published)

    _, world = run(scenario, world=world)
    assert ("disconnect",) in world.calls


# --- the lock's failures ----------------------------------------------------------------------


def test_a_lock_that_cannot_be_installed_ends_the_runtime() -> None:
    world = World()
    world.failing["apply"] = RuntimeError("nft: permission denied")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))

    with pytest.raises(BaseExceptionGroup) as caught:
        run(scenario, world=world)
    (error,) = caught.value.exceptions
    assert isinstance(error, LockFailed)
    assert "nft: permission denied" in str(error)


def test_a_server_change_the_lock_refuses_ends_the_runtime() -> None:
    """The lock falls back to the whole table itself when a swap is refused (tested with it); a
    change it cannot install at all leaves the daemon nothing fail-closed to go on with."""
    world = World()
    world.failing_once["connect"] = OSError("wireguard-go refused")  # on to the next server
    world.failing["set_servers"] = RuntimeError("nft: Error: Could not process rule")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))

    with pytest.raises(BaseExceptionGroup) as caught:
        run(scenario, world=world)
    (error,) = caught.value.exceptions
    assert isinstance(error, LockFailed) and "Could not process rule" in str(error)
    assert world.without_probes() == [("apply", ("a",)), ("connect", "a"), ("set_servers", ("b",))]


def test_teardown_failures_are_logged_and_the_stop_goes_on() -> None:
    world = World()
    world.failing["close"] = OSError("interface busy")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await stop(runtime, published)

    runtime, _ = run(scenario, world=world)
    assert runtime.status.state == "stopped"


# --- timers -----------------------------------------------------------------------------------


def test_a_timer_that_runs_out_reads_the_counters_and_an_answer_after_the_handshake_connects() -> None:
    world = World()
    quick = MachineSettings(
        servers=("a", "b"), probe_interval_s=0.001, interval_s=3600, connect_timeouts_s=(3600,)
    )

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        # The next reads: the handshake complete, then rx beyond it (an answer through it).
        world.stats_answers += [stats(rx=92, tx=92, age=0.0), stats(rx=148, tx=184, age=0.0)]
        connected = await published.receive()  # read when the (short) sample timers ran out
        assert (connected.state, connected.server) == ("connected", "a")
        assert connected.stats is not None
        shown = StatusReport.build(runtime.status, LockState()).as_json()
        assert shown["rx_bytes"] == 148
        assert shown["handshake_age_s"] is not None
        await stop(runtime, published)

    _, world = run(scenario, quick, world)
    assert world.without_probes() == [("apply", ("a",)), ("connect", "a"), ("close",)]
    assert world.reads() >= 3  # at the connect, then on the timers


def test_stale_and_cancelled_timers_are_dropped_and_the_current_one_acts() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await settle(runtime, published)
        armed = runtime.armed_timers
        assert set(armed) == {"connect", "sample"}
        reads = world.reads()
        await runtime.events.send(TimerDue("sample", armed["connect"]))  # not sample's: stale
        await runtime.events.send(TimerDue("backoff", armed["sample"]))  # never armed: stale
        await settle(runtime, published)
        assert world.reads() == reads
        await runtime.events.send(TimerDue("sample", armed["sample"]))  # the current one: a read
        await settle(runtime, published)
        assert world.reads() == reads + 1
        # A fired timer is forgotten (the read armed "sample" anew): its report again is stale.
        assert runtime.armed_timers["sample"] != armed["sample"]
        await runtime.events.send(TimerDue("sample", armed["sample"]))
        await settle(runtime, published)
        assert world.reads() == reads + 1
        await stop(runtime, published)
        # Stop cancelled every timer: what they would report now is stale.
        assert runtime.armed_timers == {}
        await runtime.events.send(TimerDue("connect", armed["connect"]))

    _, world = run(scenario)
    assert world.without_probes()[-1] == ("close",)


def test_the_connect_timer_running_out_fails_the_server_and_moves_on() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await runtime.events.send(TimerDue("connect", 1))
        moved = await published.receive()
        assert (moved.state, moved.server) == ("connecting", "b")
        assert moved.last_failure is not None
        assert moved.last_failure.reason == "no handshake within 3600 s"
        await stop(runtime, published)

    _, world = run(scenario)
    assert world.without_probes()[2:4] == [("set_servers", ("b",)), ("connect", "b")]


# --- a stats read that fails ------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["raises", "hangs"])
def test_an_unreadable_tunnel_reads_as_silence_and_keeps_the_last_counters(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_module, "STATS_TIMEOUT_S", 0.01)
    world = World()
    world.stats_answers = [stats(rx=92, tx=46, age=0.0), stats(rx=148, tx=92, age=0.0)]

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        # The read at the connect found the handshake; the sample after it, an answer through it.
        await settle(runtime, published)
        await runtime.events.send(TimerDue("sample", runtime.armed_timers["sample"]))
        assert await next_state(published) == "connected"
        if failure == "raises":
            world.failing["stats"] = OSError("uapi socket gone")
        else:

            async def never() -> TunnelStats:
                await anyio.sleep_forever()
                raise AssertionError

            world.stats = never  # type: ignore[method-assign]
        for _ in range(2):  # two reads that fail, each re-arming the sample timer
            await settle(runtime, published)
            await runtime.events.send(TimerDue("sample", runtime.armed_timers["sample"]))
        after = await settle(runtime, published)
        # The machine got its own last counters and no handshake: that is idle, not dead; the
        # status keeps the last counters it read.
        assert (after.state, after.server) == ("connected", "a")
        assert after.stats is not None
        assert (after.stats.rx_bytes, after.stats.tx_bytes) == (148, 92)
        await stop(runtime, published)

    _, world = run(scenario, world=world)
    assert world.reads() == (4 if failure == "raises" else 2)  # the hanging reads never got to log


# --- probes -----------------------------------------------------------------------------------


def test_a_probe_that_cannot_be_sent_is_dropped_and_a_server_without_target_gets_none() -> None:
    world = World()
    world.failing["probe"] = OSError("network unreachable")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await settle(runtime, published)
        probes_to_a = [call for call in world.calls if call[0] == "probe"]
        assert probes_to_a and set(probes_to_a) == {("probe", "10.64.0.1", "tun-test")}
        await runtime.post(lambda now: ev.RotateRequested(now))  # to "b", which has no target
        assert (await published.receive()).server == "b"
        await settle(runtime, published)
        assert [call for call in world.calls if call[0] == "probe"] == probes_to_a
        await stop(runtime, published)

    run(scenario, world=world)


def test_lock_status_is_read_on_request_and_a_failed_read_says_not_installed() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        state = await runtime.lock_state()
        assert StatusReport.build(runtime.status, state).as_json()["lock"] == {
            "installed": True,
            "matching": True,
            "owned": True,
            "egress": [],
            "bypass": [],
            "inbound": {},
        }
        assert state.counters == {"refused": 3}
        world.failing["state"] = RuntimeError("nft missing")
        state = await runtime.lock_state()
        assert StatusReport.build(runtime.status, state).as_json()["lock"] == {
            "installed": False,
            "matching": False,
            "owned": False,
            "egress": [],
            "bypass": [],
            "inbound": {},
        }
        assert state.counters == {}
        await stop(runtime, published)

    run(scenario)


def test_tamper_is_published_with_the_same_state_and_counted_once() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        heard: list[str] = []
        runtime.subscribe(lambda status: heard.append(status.state))  # as the plugins do
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await runtime.post(lambda now: ev.LockTampered(now, "the lock table was deleted"))
        again = await published.receive()
        assert (again.state, again.server) == ("connecting", "a")
        assert again.reason == "lock tampered with and restored: the lock table was deleted"
        assert again.entered == {"connecting": 1}  # the same state published again is no new entry
        assert again.failures == {}  # no server is to blame
        await stop(runtime, published)
        assert heard == ["connecting", "connecting", "stopped"]

    run(scenario)


# --- reload -----------------------------------------------------------------------------------


BASE = LockPolicy(table="tunlock-test", tunnel_interface="tun-test", fwmark=0x5154)


def reload_to(names: tuple[str, ...], reachable: frozenset[str] | None = None) -> Reconfiguration:
    """What the daemon hands the runtime on SIGHUP: the new list, its lock base and settings."""
    return Reconfiguration(
        {name: SERVERS[name] for name in names},
        probe_target,
        BASE,
        replace(SLOW, servers=names),
        reachable,
    )


def test_reload_without_the_current_server_moves_to_a_configured_one() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        assert await runtime.reconfigure(reload_to(("b",)))
        assert runtime.servers == {"b": SERVERS["b"]}
        moved = await published.receive()
        assert (moved.state, moved.server, moved.reason) == ("connecting", "b", "a is no longer configured")
        await stop(runtime, published)

    _, world = run(scenario)
    assert world.without_probes()[2:5] == [
        ("rebase", "tunlock-test", ("b",)),
        ("set_servers", ("b",)),
        ("connect", "b"),
    ]


def test_reload_keeping_the_current_server_does_nothing_visible() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        assert await runtime.reconfigure(reload_to(("a",)))
        await stop(runtime, published)
        assert runtime.machine.context.settings.servers == ("a",)

    _, world = run(scenario)
    assert world.without_probes() == [
        ("apply", ("a",)),
        ("connect", "a"),
        ("rebase", "tunlock-test", ("a",)),
        ("close",),
    ]


def test_a_reload_waits_for_the_lock_change_on_its_way_and_reaches_lock_runtime_machine_in_order() -> None:
    """Issue #22: a reload swapped the runtime's servers and rebased the lock from outside the
    loop, while an action of the old configuration could be half done."""

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        world.lock_gates["apply"] = gate = anyio.Event()
        await runtime.post(lambda now: ev.Start(now, seed=1))
        await anyio.wait_all_tasks_blocked()  # the lock for "a" is on its way
        async with anyio.create_task_group() as reloads:
            reloads.start_soon(runtime.reconfigure, reload_to(("b",)))
            await anyio.wait_all_tasks_blocked()
            assert runtime.servers == SERVERS  # not while the old configuration's action runs
            assert ("rebase", "tunlock-test", ("b",)) not in world.calls
            gate.set()
        assert runtime.servers == {"b": SERVERS["b"]}
        assert (await published.receive()).server == "a"
        moved = await published.receive()
        assert (moved.server, moved.reason) == ("b", "a is no longer configured")
        await stop(runtime, published)

    _, world = run(scenario)
    assert world.without_probes()[:4] == [
        ("apply", ("a",)),
        ("connect", "a"),
        ("rebase", "tunlock-test", ("b",)),
        ("set_servers", ("b",)),
    ]


def test_a_reload_the_lock_refuses_changes_nothing_and_says_so() -> None:
    world = World()
    world.failing["rebase"] = RuntimeError("nft: Error: Could not process rule")

    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        with structlog.testing.capture_logs() as logs:
            assert not await runtime.reconfigure(reload_to(("b",)))
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "reload refused: the lock could not be applied for it"
        ]
        assert runtime.servers == SERVERS
        assert runtime.machine.context.settings.servers == ("a", "b")
        await stop(runtime, published)

    run(scenario, world=world)


def test_a_reconnect_sets_the_same_peer_again_and_restarts_its_handshake() -> None:
    async def scenario(runtime: Runtime, world: World, published: MemoryObjectReceiveStream[Status]) -> None:
        await runtime.post(lambda now: ev.Start(now, seed=1))
        assert await next_state(published) == "connecting"
        await runtime.post(lambda now: ev.ReconnectRequested(now))
        again = await published.receive()
        assert (again.state, again.server, again.reason) == ("connecting", "a", "reconnect requested")
        await stop(runtime, published)

    _, world = run(scenario)
    assert ("restart_handshake", "a") in world.without_probes()
    assert world.without_probes()[-1] == ("close",)


# --- the idle wake-up (issue #27 item 1) ------------------------------------------------------


class PacketGate:
    """Stands in for the packet socket (it needs CAP_NET_RAW and a real interface): a watch
    waits until the test lets "a packet" through."""

    def __init__(self) -> None:
        self.watches: list[str] = []
        self.cancelled = 0
        self.packet = anyio.Event()
        self.broken: OSError | None = None  # the socket cannot even be opened
        self.fails_while_armed = False  # the watch breaks after it was in place

    async def next_packet(self, ifname: str, armed: Callable[[], Awaitable[None]]) -> None:
        self.watches.append(ifname)
        if self.broken is not None:
            raise self.broken
        await armed()
        try:
            await self.packet.wait()
            if self.fails_while_armed:
                raise OSError("the interface went away")
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise


def watching(gate: PacketGate) -> Runtime:
    """A runtime whose traffic watch is ``gate``."""
    return make_runtime(World(), lambda status: None, clock=Clock(), traffic=gate)


def drive(runtime: Runtime, steps: Callable[[], Awaitable[None]]) -> None:
    """Run ``steps`` (actions executed one by one) inside the task group ``run`` would set."""

    async def main() -> None:
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                runtime._task_group = tg
                await steps()

    anyio.run(main)


def test_the_traffic_watch_reports_the_first_packet_once_and_a_stop_disarms_it() -> None:
    gate = PacketGate()
    runtime = watching(gate)

    async def steps() -> None:
        await runtime._execute(act.WatchTraffic())
        await runtime._execute(act.WatchTraffic())  # armed already: no second watch
        await anyio.wait_all_tasks_blocked()
        assert gate.watches == ["tun-test"]
        assert await runtime.inbox.receive.receive() == ev.TrafficWatchArmed(100.0)
        gate.packet.set()
        assert await runtime.inbox.receive.receive() == ev.TrafficSeen(100.0)
        gate.packet = anyio.Event()
        await runtime._execute(act.WatchTraffic())  # it fired: a new spell arms a new one
        await anyio.wait_all_tasks_blocked()
        assert await runtime.inbox.receive.receive() == ev.TrafficWatchArmed(100.0)
        await runtime._execute(act.StopWatchingTraffic())
        await anyio.wait_all_tasks_blocked()
        assert gate.watches == ["tun-test", "tun-test"] and gate.cancelled == 1
        gate.packet.set()
        await anyio.wait_all_tasks_blocked()
        assert runtime.inbox.receive.statistics().current_buffer_used == 0, "no wake once stopped"

    drive(runtime, steps)


def test_a_watch_that_cannot_listen_says_nothing_and_one_that_breaks_once_listening_wakes() -> None:
    """The machine lets an idle tunnel sleep until its idle probe only once the watch said it
    listens: a watch that never listened must not say so (the idle samples go on), and one that
    breaks afterwards must wake the machine, as a packet would, or traffic would go unseen."""
    gate = PacketGate()
    runtime = watching(gate)

    async def steps() -> None:
        gate.broken = OSError("no CAP_NET_RAW")
        await runtime._execute(act.WatchTraffic())
        await anyio.wait_all_tasks_blocked()
        assert runtime.inbox.receive.statistics().current_buffer_used == 0
        gate.broken, gate.fails_while_armed = None, True
        await runtime._execute(act.WatchTraffic())  # the failed one is gone: a new one
        assert await runtime.inbox.receive.receive() == ev.TrafficWatchArmed(100.0)
        gate.packet.set()
        assert await runtime.inbox.receive.receive() == ev.TrafficSeen(100.0)
        assert gate.watches == ["tun-test", "tun-test"]

    drive(runtime, steps)
