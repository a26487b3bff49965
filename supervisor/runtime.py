"""The runtime: feeds events to the pure machine and carries out its actions.

Everything that happens reaches the machine through one memory object stream (netlink paths,
backend deaths, the lock guard, the control socket, signals, timers), and one loop takes each
event, steps the machine and executes the actions in order before taking the next. Actions that
answer with an event (reading the counters, a peer that would not configure) have it handled at
once, ahead of the stream, so the machine sees cause and effect back to back.

The runtime knows its adapters only by the small protocols below; ``supervisor.daemon`` wires
the real ones (nft, wireguard-go or the kernel, rtnetlink, ICMP). Every wait on an adapter has a
timeout; timers are tasks in the caller's task group, each in its own cancel scope and stamped
with a generation so that a timer cancelled just as it fired is dropped, not acted on.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from msgspec import Struct, field

from supervisor.jsonvalue import JSON
from supervisor.lock.policy import LockPolicy
from supervisor.lock.state import LockState
from supervisor.log import get_logger
from supervisor.machine import actions as act
from supervisor.machine import events as ev
from supervisor.machine.core import step
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import Failure, Machine
from supervisor.servers import Server
from supervisor.wireguard.backend import TunnelStats

log = get_logger(__name__)

# Generous limits: a swap takes milliseconds, a wireguard-go start well under a second; these
# only stop one stuck call from stalling the whole daemon.
CONFIGURE_TIMEOUT_S = 15.0
STATS_TIMEOUT_S = 2.0
TEARDOWN_TIMEOUT_S = 15.0
LOCK_TIMEOUT_S = 15.0


class LockFailed(RuntimeError):
    """The lock could not be installed: the daemon must not go on (it would not be fail-closed)."""


# --- what the runtime needs from the world ---------------------------------------------------


class Lock(Protocol):
    async def apply(self, servers: tuple[Server, ...]) -> None:
        """Install the whole lock letting the tunnel reach ``servers``."""

    async def set_servers(self, servers: tuple[Server, ...]) -> None:
        """Let the tunnel reach ``servers`` instead, in one transaction (the cheapest that is)."""

    async def rebase(self, base: LockPolicy, servers: Mapping[str, Server]) -> None:
        """A reload: the policy around the endpoints, and the servers as now configured."""

    async def remove(self) -> None: ...

    async def state(self) -> LockState:
        """The lock as read now (installed, matching, owned twin held, counters)."""


class TunnelControl(Protocol):
    async def connect(self, server: Server) -> None: ...

    async def complete_adoption(self) -> None:
        """Check and complete an adopted tunnel's addresses, routes and resolvers."""

    async def restart_handshake(self, server: Server) -> None:
        """Set ``server``'s peer again as it is, so that its next packet starts a handshake."""

    async def disconnect(self) -> None: ...

    async def close(self, keep_interface: bool = False) -> None: ...

    async def stats(self) -> TunnelStats: ...


class TrafficWatch(Protocol):
    async def next_packet(self, ifname: str, armed: Callable[[], Awaitable[None]]) -> None:
        """Await ``armed()`` once the watch is in place, then return on the next packet through
        ``ifname`` (either way); OSError if it cannot watch. (net.wake.PacketWatch is the real
        one.)"""


class Prober(Protocol):
    def send(self, target: IPv4Address | IPv6Address, ifname: str) -> None:
        """Send one probe through the tunnel without waiting (non-blocking); the answer is rx.
        (health.IcmpProber is the real one.)"""


# --- what the runtime tells the world ---------------------------------------------------------


class FailureReport(Struct, frozen=True):
    """The last server failure the machine declared; ``at`` in wall-clock seconds."""

    server: str | None
    reason: str
    at: float

    def as_json(self) -> dict[str, JSON]:
        return {"server": self.server, "reason": self.reason, "at": self.at}


class Status(Struct):
    """The machine's side of the status, as last published (the runtime's alone to write).

    ``tunlock status`` is built from it on request, with the lock's state and the plugins'
    reports beside it (``supervisor.status.StatusReport``)."""

    state: str = "blocked"
    server: str | None = None
    since_wall: float = field(default_factory=time.time)
    reason: str | None = None
    stats: TunnelStats | None = None
    last_failure: FailureReport | None = None
    backend: str | None = None
    namespace: str | None = None  # namespace mode's namespace, None for the whole host
    # For the metrics: times each state was entered, and failures declared per server.
    entered: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)


class TimerDue(Struct, frozen=True):
    """A timer task's report that ``timer`` ran out; stale unless ``generation`` is still the
    one armed (the timer was cancelled or re-armed after it fired)."""

    timer: ev.Timer
    generation: int


class Reconfiguration(Struct, frozen=True):
    """A reload as it reaches the loop: the lock's new base, the servers and probe targets the
    runtime acts on, and the machine's new settings. Taken between two events like any other
    item, so the lock, the runtime and the machine move to the new configuration together and
    no action of the old one runs half on the new (issue #22)."""

    servers: Mapping[str, Server]
    probe_target: Callable[[Server], IPv4Address | IPv6Address | None]
    lock_base: LockPolicy
    settings: MachineSettings
    reachable: frozenset[str] | None  # for ``ConfigReloaded``: paths under the new list, or unknown


class PendingReconfiguration(Struct, eq=False):
    """A reconfiguration in the stream, and the loop's answer: whether it was applied."""

    change: Reconfiguration
    done: anyio.Event = field(default_factory=anyio.Event)
    applied: bool = False


Item = ev.Event | TimerDue | PendingReconfiguration


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME, the clock events are stamped with: monotonic like
    CLOCK_MONOTONIC, but it goes on counting while the machine is suspended (CLOCK_MONOTONIC
    stops). A suspend then shows to the machine as the gap it was, as it shows in the handshake's
    age (wall-clock), and the machine does not blame the server for it (``core.resume_after_gap``)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Inbox:
    """The one stream every event reaches the machine through, and the clock that stamps them.

    Made before the runtime, so that the adapters the runtime drives can report into it from
    the moment they exist: the tunnel backend (a wireguard-go that died), the lock guard (a
    table restored after tampering). What they post waits here until the runtime runs.
    """

    def __init__(self, clock: Callable[[], float] = boottime) -> None:
        self.clock = clock
        self.send, self.receive = anyio.create_memory_object_stream[Item](max_buffer_size=1024)

    async def post(self, make: Callable[[float], ev.Event]) -> None:
        """Queue an event, stamped now: ``await inbox.post(lambda now: ev.Stop(now))``."""
        await self.send.send(make(self.clock()))


class Runtime:
    """One machine, its event stream, and the adapters its actions drive."""

    def __init__(
        self,
        machine: Machine,
        servers: Mapping[str, Server],
        lock: Lock,
        tunnel: TunnelControl,
        prober: Prober,
        *,
        ifname: str,
        probe_target: Callable[[Server], IPv4Address | IPv6Address | None],
        clock: Callable[[], float] | None = None,
        inbox: Inbox | None = None,
        on_publish: Callable[[Status], None] | None = None,
        traffic: TrafficWatch | None = None,
    ) -> None:
        """``inbox``: where events queue (made beforehand when adapters report into it), else a
        new one on ``clock`` (default ``boottime``); give one or the other, not both.
        ``traffic``: what wakes an idle tunnel on its first packet (without one, traffic after an
        idle spell is seen at the next idle sample)."""
        if inbox is None:
            inbox = Inbox(clock or boottime)
        elif clock is not None:
            raise TypeError("give the clock to the inbox: the runtime stamps with the inbox's clock")
        self.inbox = inbox
        self.machine = machine
        self.servers = dict(servers)
        self.lock = lock
        self.tunnel = tunnel
        self.prober = prober
        self.ifname = ifname
        self.probe_target = probe_target
        self.clock = inbox.clock
        self.status = Status()
        self._subscribers: list[Callable[[Status], None]] = [on_publish] if on_publish else []
        self._send, self._receive = inbox.send, inbox.receive
        self._timers: dict[ev.Timer, tuple[int, anyio.CancelScope]] = {}
        self._generation = 0
        self._task_group: anyio.abc.TaskGroup | None = None
        self._done = False
        self._counted_failure: Failure | None = None
        self.traffic = traffic
        self._traffic_watch: anyio.CancelScope | None = None

    def subscribe(self, on_publish: Callable[[Status], None]) -> None:
        """Call ``on_publish`` (synchronous, must not wait) after every status publish."""
        self._subscribers.append(on_publish)

    # --- feeding ----------------------------------------------------------------------------

    @property
    def events(self) -> MemoryObjectSendStream[Item]:
        return self._send

    @property
    def armed_timers(self) -> dict[ev.Timer, int]:
        """The timers running now, each with its generation (what a ``TimerDue`` must carry)."""
        return {timer: generation for timer, (generation, _scope) in self._timers.items()}

    async def post(self, make: Callable[[float], ev.Event]) -> None:
        """Queue an event, stamped now: ``await runtime.post(lambda now: ev.Stop(now))``."""
        await self.inbox.post(make)

    async def reconfigure(self, change: Reconfiguration) -> bool:
        """Hand a reload to the loop and wait until it took it: True once the lock, the servers
        and the machine follow ``change``; False if the lock refused it (nothing changed then)."""
        pending = PendingReconfiguration(change)
        await self._send.send(pending)
        await pending.done.wait()
        return pending.applied

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        """Step the machine on every event until it says ``Exit``. Timers and probes run in
        ``task_group``; cancelled with it, they leave nothing behind."""
        self._task_group = task_group
        receive: MemoryObjectReceiveStream[Item] = self._receive
        async for item in receive:
            if isinstance(item, TimerDue):
                current = self._timers.get(item.timer)
                if current is None or current[0] != item.generation:
                    continue  # cancelled or re-armed after it fired: stale
                del self._timers[item.timer]
                await self._handle(ev.TimerFired(self.clock(), item.timer))
            elif isinstance(item, PendingReconfiguration):
                await self._reconfigure(item)
            else:
                await self._handle(item)
            if self._done:
                return

    async def _handle(self, first: ev.Event) -> None:
        pending: deque[ev.Event] = deque([first])
        while pending:
            event = pending.popleft()
            log.debug("event", received=event)
            self.machine, actions = step(self.machine, event)
            for action in actions:
                answer = await self._execute(action)
                if answer is not None:
                    pending.append(answer)

    async def _reconfigure(self, pending: PendingReconfiguration) -> None:
        """The lock first (a reload that widens it must be in force before the machine acts on
        it), then the runtime's servers, then the machine."""
        change = pending.change
        try:
            try:
                with anyio.fail_after(LOCK_TIMEOUT_S):
                    await self.lock.rebase(change.lock_base, change.servers)
            except Exception as err:  # the table as it was: still the old configuration throughout
                log.error("reload refused: the lock could not be applied for it", error=str(err))
                return
            self.servers = dict(change.servers)
            self.probe_target = change.probe_target
            pending.applied = True
            await self._handle(ev.ConfigReloaded(self.clock(), change.settings, change.reachable))
        finally:
            pending.done.set()

    # --- the actions ------------------------------------------------------------------------

    async def _execute(self, action: act.Action) -> ev.Event | None:
        match action:
            case act.ApplyLock(names):
                await self._lock_call(self.lock.apply, names)
            case act.SetLockServers(names):
                # The lock falls back to the whole table itself when an element swap is refused.
                await self._lock_call(self.lock.set_servers, names)
            case act.RemoveLock():
                with anyio.CancelScope(shield=True), anyio.move_on_after(LOCK_TIMEOUT_S):
                    await self.lock.remove()
            case act.ConfigurePeer(name):
                return await self._configure(name)
            case act.CompleteAdoption(name):
                return await self._complete_adoption(name)
            case act.RestartHandshake(name):
                server = self.servers.get(name)
                if server is not None:
                    restart = self.tunnel.restart_handshake
                    await self._quietly("restart the handshake", functools.partial(restart, server))
            case act.RemovePeer():
                await self._quietly("remove the peer", self.tunnel.disconnect)
            case act.CloseTunnel():
                with anyio.CancelScope(shield=True):
                    await self._quietly("close the tunnel", self.tunnel.close)
            case act.ReadStats():
                return await self._read_stats()
            case act.Probe():
                self._probe()
            case act.WatchTraffic():
                self._watch_traffic()
            case act.StopWatchingTraffic():
                if self._traffic_watch is not None:
                    self._traffic_watch.cancel()
                    self._traffic_watch = None
            case act.StartTimer(timer, delay):
                self._start_timer(timer, delay)
            case act.CancelTimer(timer):
                entry = self._timers.pop(timer, None)
                if entry is not None:
                    entry[1].cancel()
            case act.PublishStatus(state, server, reason):
                await self._publish(state, server, reason)
            case act.Exit():
                self._done = True
        return None

    async def _lock_call(self, method: Callable[[tuple[Server, ...]], Any], names: tuple[str, ...]) -> None:
        chosen = tuple(self.servers[name] for name in names if name in self.servers)
        try:
            with anyio.fail_after(LOCK_TIMEOUT_S):
                await method(chosen)
        except Exception as err:  # any failure here is the same failure
            raise LockFailed(f"could not install the lock: {err}") from err

    async def _configure(self, name: str) -> ev.Event | None:
        server = self.servers.get(name)
        if server is None:
            return ev.ConnectFailed(self.clock(), name, "not configured")
        try:
            with anyio.fail_after(CONFIGURE_TIMEOUT_S):
                await self.tunnel.connect(server)
        except Exception as err:  # reported to the machine, which moves on
            log.error("could not set up the peer", server=name, error=str(err))
            return ev.ConnectFailed(self.clock(), name, str(err) or type(err).__name__)
        return None

    async def _complete_adoption(self, name: str) -> ev.Event | None:
        try:
            with anyio.fail_after(CONFIGURE_TIMEOUT_S):
                await self.tunnel.complete_adoption()
        except Exception as err:  # the machine counts it as the server failing, as a connect's
            log.error("could not complete the adoption of the running tunnel", server=name, error=str(err))
            return ev.ConnectFailed(self.clock(), name, str(err) or type(err).__name__)
        return None

    async def _read_stats(self) -> ev.Event:
        try:
            with anyio.fail_after(STATS_TIMEOUT_S):
                stats = await self.tunnel.stats()
        except Exception as err:  # what an unreadable tunnel means is the machine's to decide
            log.warning("could not read the tunnel's counters", error=str(err))
            return ev.StatsUnreadable(self.clock(), str(err) or type(err).__name__)
        self.status.stats = stats
        return ev.StatsRead(self.clock(), stats.rx_bytes, stats.tx_bytes, stats.handshake_age_s)

    def _probe(self) -> None:
        """One non-blocking send, no task: in doubt the machine asks for tens a second."""
        server = self.servers.get(self.machine.state.server or "")
        target = self.probe_target(server) if server else None
        if target is None:
            return
        try:
            self.prober.send(target, self.ifname)
        except OSError as err:  # a probe that cannot go is a lost probe: the counters tell
            log.debug("probe not sent", error=str(err))

    def _watch_traffic(self) -> None:
        if self.traffic is None or self._traffic_watch is not None:
            return  # nothing to watch with, or armed already
        assert self._task_group is not None
        scope = self._traffic_watch = anyio.CancelScope()
        self._task_group.start_soon(self._await_traffic, self.traffic, scope)

    async def _await_traffic(self, traffic: TrafficWatch, scope: anyio.CancelScope) -> None:
        armed = False

        async def report_armed() -> None:
            nonlocal armed
            armed = True
            await self._send.send(ev.TrafficWatchArmed(self.clock()))

        with scope:
            try:
                await traffic.next_packet(self.ifname, report_armed)
            except OSError as err:
                log.debug("cannot watch the tunnel for traffic", error=str(err))
                if not armed:
                    return  # the machine never counted on it: the idle samples see traffic, later
                # It failed after the machine let the samples wait for it: wake the machine as a
                # packet would, so the next idle spell asks for a watch afresh.
            finally:
                if self._traffic_watch is scope:
                    self._traffic_watch = None
            await self._send.send(ev.TrafficSeen(self.clock()))

    def _start_timer(self, timer: ev.Timer, delay: float) -> None:
        previous = self._timers.pop(timer, None)
        if previous is not None:
            previous[1].cancel()
        assert self._task_group is not None
        self._generation += 1
        scope = anyio.CancelScope()
        self._timers[timer] = (self._generation, scope)
        self._task_group.start_soon(self._timer, timer, self._generation, delay, scope)

    async def _timer(self, timer: ev.Timer, generation: int, delay: float, scope: anyio.CancelScope) -> None:
        with scope:
            await anyio.sleep(delay)
            await self._send.send(TimerDue(timer, generation))

    async def _publish(self, state: str, server: str | None, reason: str | None) -> None:
        failure = self.machine.context.last_failure
        status = self.status
        if state != status.state or not status.entered:
            status.entered[state] = status.entered.get(state, 0) + 1
        if failure is not None and failure.server is not None and failure is not self._counted_failure:
            status.failures[failure.server] = status.failures.get(failure.server, 0) + 1
            self._counted_failure = failure
        status.state, status.server, status.reason = state, server, reason
        status.since_wall = time.time()
        if server is None:
            status.stats = None  # no peer: the last counters belong to a tunnel that is gone
        if failure is not None:
            status.last_failure = FailureReport(
                failure.server, failure.reason, round(time.time() - (self.clock() - failure.at), 3)
            )
        log.info("state", state=state, server=server, reason=reason)
        for subscriber in self._subscribers:
            subscriber(status)

    async def _quietly(self, what: str, call: Callable[[], Any]) -> None:
        try:
            with anyio.fail_after(TEARDOWN_TIMEOUT_S):
                await call()
        except Exception as err:  # teardown goes on; the lock holds regardless
            log.error(f"could not {what}", error=str(err))

    async def lock_state(self) -> LockState:
        """The lock as read now (for a status request); an unreadable lock is reported as not
        installed."""
        try:
            with anyio.fail_after(LOCK_TIMEOUT_S):
                return await self.lock.state()
        except Exception as err:  # the status says "not installed" then
            log.warning("could not read the lock", error=str(err))
            return LockState()
