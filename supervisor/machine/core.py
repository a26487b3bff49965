"""The supervisor's decisions as one pure function: ``step(machine, event) -> (machine, actions)``.

Why a pure machine: the daemon's worth is in what it decides under faults (a silent server, a
link that flaps, a backend that dies mid-swap), and decisions that take plain data and return
plain data can be tested exhaustively and by property, with no sockets, clocks or threads. The
runtime (``supervisor.runtime``) feeds it events and carries out its actions; nothing here
imports anyio, pyroute2 or nft, or reads a clock.

The shape follows h11's ``_state.py``: ``TRANSITIONS`` below is one literal table, state ->
event type -> handler, which a reader can scan top to bottom (``python -m supervisor.machine``
prints it). The table is complete: every state lists every event, and an event a state has no
use for maps to ``ignore`` explicitly, so a daemon never crashes on an event arriving late
(a timer that fired as it was cancelled, a stats read after a swap).

The lock invariant is structural: the only lock actions are ``ApplyLock`` and
``SetLockServers`` naming at most the one server being connected to, and ``RemoveLock`` on stop
in session mode. There is no "open" to emit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from msgspec.structs import replace

from supervisor.machine import actions as act
from supervisor.machine import events as ev
from supervisor.machine.liveness import Liveness, Verdict
from supervisor.machine.rotation import backoff, choose, eligible, preferred
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import (
    Blocked,
    Connected,
    Connecting,
    Context,
    Failure,
    Machine,
    Offline,
    State,
    Stopped,
)

Actions = list[act.Action]
Handler = Callable[[Machine, Any], tuple[Machine, Actions]]


class Stays:
    """In a handler's declared targets: the state it was called in (it may leave it unchanged)."""

    name = "(stays)"


STAYS = Stays
Target = type[State] | type[Stays]
_TARGETS: dict[Callable[..., Any], tuple[Target, ...]] = {}
_H = TypeVar("_H", bound=Callable[..., Any])


def leads_to(*targets: Target) -> Callable[[_H], _H]:
    """Declare the states ``handler`` may leave the machine in: the table shows them, and the
    property test fails when a handler reaches a state it did not declare."""

    def declare(handler: _H) -> _H:
        _TARGETS[handler] = targets
        return handler

    return declare


def targets(handler: Callable[..., Any], state: type[State]) -> tuple[type[State], ...]:
    """The states ``handler`` may lead to when called in ``state``, in declaration order."""
    resolved: list[type[State]] = []
    for target in _TARGETS[handler]:
        chosen = state if issubclass(target, Stays) else target
        if chosen not in resolved:
            resolved.append(chosen)
    return tuple(resolved)


# --- small pieces shared by the handlers -----------------------------------------------------


def _publish(state: State, reason: str | None = None) -> act.PublishStatus:
    return act.PublishStatus(state.name, getattr(state, "server", None), reason)


def _cancel_all() -> Actions:
    return [act.CancelTimer(timer) for timer in ev.TIMERS]


def _any_reachable(ctx: Context) -> bool:
    return ctx.reachable is None or any(name in ctx.reachable for name in ctx.settings.servers)


def _reachable(ctx: Context, server: str) -> bool:
    return ctx.reachable is None or server in ctx.reachable


# --- entries: each builds one state and the actions that go with entering it ------------------


def enter_connecting(
    m: Machine, now: float, server: str, reason: str, *, configure: bool = True, fresh: bool = False
) -> tuple[Machine, Actions]:
    """Go to ``connecting(server)``: narrow the lock to it, set the peer (unless it is already the
    intact peer and only needs checking), provoke a handshake and start the clocks.

    ``ConfigurePeer`` leaves a peer that is already exactly this server's alone (a second
    initiation milliseconds after the first is dropped by the server); ``fresh`` asks for a new
    handshake all the same (a reconnect). While connecting, the samples start the handshake
    afresh whenever the last went unanswered for ``handshake_retry`` (WireGuard would wait 5 s).
    """
    ctx = replace(m.context, last_server=server)
    settings = ctx.settings
    state = Connecting(
        since=now, server=server, attempt=ctx.failures, liveness=Liveness(since=now), initiated_at=now
    )
    actions: Actions = [act.CancelTimer("backoff")]
    if configure:
        actions += [act.SetLockServers((server,)), act.ConfigurePeer(server)]
    if fresh:
        actions.append(act.RestartHandshake(server))
    actions += [
        # The counters before the probe: the sample 0.25 s later can then tell an intact peer's
        # answer from what was there before, instead of taking that sample as its baseline.
        act.ReadStats(),
        act.Probe(),
        act.StartTimer("connect", settings.connect_timeout(ctx.failures)),
        act.StartTimer("sample", settings.probe_interval_s),
        _publish(state, reason),
    ]
    return Machine(state, ctx), actions


def enter_offline(m: Machine, now: float) -> tuple[Machine, Actions]:
    """No path to any server: stop every clock and attempt nothing until a path returns."""
    current = m.state
    if isinstance(current, (Connecting, Connected)) and current.server in m.context.settings.servers:
        state = Offline(since=now, resume=current.server, intact=True)
    elif isinstance(current, Offline):
        return m, []
    else:
        state = Offline(since=now, resume=None, intact=False)
    return Machine(state, m.context), [*_cancel_all(), _publish(state, "no route to any server")]


def _pick_and_connect(
    m: Machine, now: float, reason: str, *, exclude: tuple[str, ...] = (), ignore_cooldown: bool = False
) -> tuple[Machine, Actions]:
    ctx = m.context
    if not _any_reachable(ctx):
        return enter_offline(m, now)
    candidates = eligible(
        ctx.settings, ctx.reachable, ctx.cooling, now, exclude=exclude, ignore_cooldown=ignore_cooldown
    )
    server, rng = choose(ctx.settings, preferred(candidates, ctx.granted), ctx.last_server, ctx.rng)
    m = Machine(m.state, replace(ctx, rng=rng))
    if server is None:
        return enter_blocked(m, now)
    return enter_connecting(m, now, server, reason)


def enter_blocked(m: Machine, now: float) -> tuple[Machine, Actions]:
    """Nothing left to try: drop the peer and wait a growing, capped, jittered delay (or, with no
    server configured, just wait)."""
    ctx = m.context
    if not ctx.settings.servers:
        state = Blocked(since=now, reason="no servers configured")
        return Machine(state, ctx), [*_cancel_all(), act.RemovePeer(), _publish(state, state.reason)]
    rounds = ctx.rounds + 1
    delay, rng = backoff(ctx.settings, rounds, ctx.rng)
    state = Blocked(since=now, reason=f"every server failed; retrying in {delay:.1f} s", retry_at=now + delay)
    return Machine(state, replace(ctx, rounds=rounds, rng=rng)), [
        act.CancelTimer("connect"),
        act.CancelTimer("sample"),
        act.RemovePeer(),
        act.StartTimer("backoff", delay),
        _publish(state, state.reason),
    ]


def _server_failed(m: Machine, now: float, server: str, reason: str) -> tuple[Machine, Actions]:
    """``server`` is dead or would not connect: skip it for the cooldown and move on."""
    ctx = m.context
    ctx = replace(
        ctx,
        cooling=ctx.cooled(server, now + ctx.settings.cooldown_s),
        failures=ctx.failures + 1,
        last_failure=Failure(now, server, reason),
    )
    return _pick_and_connect(Machine(m.state, ctx), now, f"{server} failed: {reason}", exclude=(server,))


def _note_failure(m: Machine, now: float, server: str | None, reason: str) -> Machine:
    return Machine(m.state, replace(m.context, last_failure=Failure(now, server, reason)))


# --- handlers, one per entry of the table ----------------------------------------------------


@leads_to(STAYS)
def ignore(m: Machine, _event: Any) -> tuple[Machine, Actions]:
    """Nothing to do in this state."""
    return m, []


@leads_to(Connecting, Blocked, Offline)
def start(m: Machine, e: ev.Start) -> tuple[Machine, Actions]:
    """Install the whole lock, letting through only the server the start goes to (an adopted
    tunnel's, or the one it connects to: one transaction before the peer), then connect or adopt
    (an adopted tunnel's routes and resolvers are checked once the lock is in)."""
    if m.context.started:
        return m, []
    ctx = m.context
    adopted = e.adopted if e.adopted in ctx.settings.servers else None
    m = Machine(m.state, replace(ctx, started=True, rng=e.seed))
    completed: Actions = [act.CompleteAdoption(adopted)] if adopted else []
    if not _any_reachable(m.context):
        state = Offline(since=e.now, resume=adopted, intact=adopted is not None)
        lock = act.ApplyLock((adopted,) if adopted else ())
        return Machine(state, m.context), [lock, *completed, _publish(state, "no route to any server")]
    if adopted and _reachable(m.context, adopted):
        m, actions = enter_connecting(m, e.now, adopted, "adopting the running tunnel", configure=False)
        return m, [act.ApplyLock((adopted,)), *completed, *actions]
    m, actions = _pick_and_connect(m, e.now, "starting")
    return m, _lock_installed_first(actions)


def _lock_installed_first(actions: Actions) -> Actions:
    """A start's connect (or its wait) with the whole lock installed first, and once.

    The connect narrows the lock to its server (``SetLockServers``) before the peer. At start
    nothing is installed yet for that to narrow: installing the whole lock with the server in
    it already is the same table one transaction sooner, instead of a lock letting no server
    through followed at once by a second whole table (another server means other resolvers:
    other rules, no element swap). The lock still comes before the peer, and a refused install
    leaves the table as it was (issue #27 item 4)."""
    narrowing = next((a for a in actions if isinstance(a, act.SetLockServers)), None)
    servers = narrowing.servers if narrowing is not None else ()
    return [act.ApplyLock(servers), *(a for a in actions if a is not narrowing)]


@leads_to(Stopped)
def stop(m: Machine, e: ev.Stop) -> tuple[Machine, Actions]:
    """Tear the tunnel down; the lock stays (``permanent``) unless the mode is ``session``."""
    state = Stopped(since=e.now)
    removal: Actions = [act.RemoveLock()] if m.context.settings.lock_mode == "session" else []
    return Machine(state, m.context), [
        *_cancel_all(),
        act.CloseTunnel(),
        *removal,
        _publish(state),
        act.Exit(),
    ]


@leads_to(STAYS, Offline)
def paths_while_blocked(m: Machine, e: ev.PathsChanged) -> tuple[Machine, Actions]:
    """Remember the paths; with none left, go offline (the backoff must not run down meanwhile)."""
    m = Machine(m.state, replace(m.context, reachable=e.reachable))
    if m.context.started and not _any_reachable(m.context):
        return enter_offline(m, e.now)
    return m, []


@leads_to(STAYS, Connecting, Blocked, Offline)
def paths_while_tunnelled(m: Machine, e: ev.PathsChanged) -> tuple[Machine, Actions]:
    """No path at all: offline. No path to this server only: another server (not its fault)."""
    m = Machine(m.state, replace(m.context, reachable=e.reachable))
    server = m.state.server
    assert server is not None
    return _follow_paths(m, e.now, server)


def _follow_paths(m: Machine, now: float, server: str) -> tuple[Machine, Actions]:
    """While tunnelled through ``server``: no path at all is offline; no path to this server only
    moves to another (not its fault); otherwise nothing to do."""
    if not _any_reachable(m.context):
        return enter_offline(m, now)
    if not _reachable(m.context, server):
        return _pick_and_connect(m, now, f"no route to {server}", exclude=(server,))
    return m, []


@leads_to(STAYS, Connecting, Blocked)
def paths_while_offline(m: Machine, e: ev.PathsChanged) -> tuple[Machine, Actions]:
    """A path is back: check the intact peer, or set up the server to resume, or pick one."""
    m = Machine(m.state, replace(m.context, reachable=e.reachable))
    return _back_online(m, e.now, "a path is back")


def _back_online(m: Machine, now: float, reason: str) -> tuple[Machine, Actions]:
    """Offline: stay while no configured server has a path; else resume or pick one."""
    state = m.state
    assert isinstance(state, Offline)
    if not _any_reachable(m.context):
        return m, []
    if state.resume is not None and _reachable(m.context, state.resume):
        return enter_connecting(m, now, state.resume, reason, configure=not state.intact)
    return _pick_and_connect(m, now, reason)


@leads_to(STAYS, Connected)
def sample_while_connecting(m: Machine, e: ev.StatsRead) -> tuple[Machine, Actions]:
    """Connected once rx grows after a sample that found the handshake complete (or rx grows with
    no handshake reading): the server answers through the session. Otherwise probe (at the doubt
    pace once there is a session); restart a handshake unanswered too long.

    A handshake response alone is not enough: initiations of ours held back together (behind an
    unresolved neighbour after a link came back, say) reach the server at once, and its workers
    may accept more than one; the session it keeps is the last, which need not be the one whose
    response we took, and then it drops everything we send. A server with nothing to probe
    (``MachineSettings.unprobed``) connects on the handshake alone: waiting for an answer it cannot ask
    for would fail it. The connect timer decides when the server has failed."""
    state = m.state
    assert isinstance(state, Connecting)
    settings = m.context.settings
    liveness, _verdict, _why = state.liveness.judge(e, settings)
    before = state.liveness
    restarted = before.restarted_by(e)
    session_rx = None if restarted else state.session_rx
    grew = before.rx_bytes is not None and not restarted and e.rx_bytes > before.rx_bytes
    answered = grew and (session_rx is not None or e.handshake_age_s is None)
    if answered or (state.server in settings.unprobed and liveness.ever_answered):
        ctx = m.context
        ctx = replace(ctx, failures=0, rounds=0, cooling=ctx.warmed(state.server))
        connected = Connected(since=e.now, server=state.server, liveness=liveness)
        return Machine(connected, ctx), [
            act.CancelTimer("connect"),
            act.StartTimer("sample", ctx.settings.interval_s),
            _publish(connected),
        ]
    if session_rx is None and e.handshake_age_s is not None:
        # A session now: its first answer (to the probe below) gets a full retry window.
        state = replace(state, session_rx=e.rx_bytes, initiated_at=e.now)
    else:
        state = replace(state, session_rx=session_rx)
    restart: Actions = []
    if e.now - state.initiated_at >= settings.handshake_retry(state.attempt):
        # Unanswered (this sample saw no answer, judged above): lost on the way, or dropped by the
        # server's limit of one initiation per peer per 20 ms. WireGuard would send the next one
        # only 5 s after the last; a peer set anew sends it with the probe that follows.
        restart = [act.RestartHandshake(state.server)]
        state = replace(state, initiated_at=e.now, session_rx=None)
    # With a session to check, probe at the doubt pace: a lossy path answers one of the many
    # probes within the retry window, a session the server dropped answers none of them.
    pace = settings.probe_interval_s if state.session_rx is None else settings.doubt_probe_interval_s
    return Machine(replace(state, liveness=liveness), m.context), [
        *restart,
        act.Probe(),
        act.StartTimer("sample", pace),
    ]


@leads_to(STAYS, Connecting, Blocked, Offline)
def sample_while_connected(m: Machine, e: ev.StatsRead) -> tuple[Machine, Actions]:
    """rx grew or idle: sample at the calm pace (idle long: one probe). Doubt: probe fast. Dead: fail over.

    In doubt (tx grew, rx did not) every sample sends a probe and the next comes
    ``doubt_probe_interval_s`` after the last was due (``Liveness.next_probe_in``); the first rx
    growth falls back to ``interval_s`` without a probe.
    The verdict (a count of overdue probes *and* a window) is ``Liveness.judge``'s."""
    state = m.state
    assert isinstance(state, Connected)
    settings = m.context.settings
    liveness, verdict, why = state.liveness.judge(e, settings)
    if verdict is Verdict.DEAD:
        return _server_failed(m, e.now, state.server, why or "dead")
    if verdict is Verdict.IDLE:
        # Asleep until the idle sample, or until the first packet says traffic started.
        watch: Literal["asked", "armed"] = "armed" if state.watch == "armed" else "asked"
        asleep = replace(state, liveness=liveness, watch=watch)
        return Machine(asleep, m.context), [
            act.WatchTraffic(),
            act.StartTimer("sample", _idle_sample_in(asleep, e.now, settings)),
        ]
    m = Machine(replace(state, liveness=liveness, watch="off"), m.context)
    # Awake: the watch of an idle spell (the previous sample's) goes before a probe of our own
    # would trip it.
    woken: Actions = [act.StopWatchingTraffic()] if state.liveness.idle_since is not None else []
    if verdict is Verdict.ALIVE:
        return m, [*woken, act.StartTimer("sample", settings.interval_s)]
    if verdict is Verdict.IDLE_PROBE:
        return m, [*woken, act.Probe(), act.StartTimer("sample", settings.interval_s)]
    return m, [*woken, act.Probe(), act.StartTimer("sample", liveness.next_probe_in(e.now, settings))]


@leads_to(STAYS)
def traffic_while_connected(m: Machine, e: ev.TrafficSeen) -> tuple[Machine, Actions]:
    """Traffic started after an idle spell: sample after ``doubt_probe_interval_s`` instead of
    at the idle pace (the packet was seen on its way into the tunnel, before the counters count
    it), so a server that went silent meanwhile is found as fast as with steady traffic. A
    watch that answers after the spell ended changes nothing."""
    state = m.state
    assert isinstance(state, Connected)
    if state.liveness.idle_since is None:
        return m, []
    m = Machine(replace(state, watch="off"), m.context)  # a watch fires once
    return m, [act.StartTimer("sample", m.context.settings.doubt_probe_interval_s)]


def _idle_sample_in(state: Connected, now: float, settings: MachineSettings) -> float:
    """The delay to an idle tunnel's next sample: ``idle_interval_s``, or, with the traffic
    watch in place, the time left until the idle probe is due (any packet before then wakes the
    daemon, so a sample in between would only find the counters unchanged)."""
    since = state.liveness.idle_since
    if state.watch != "armed" or since is None:
        return settings.idle_interval_s
    return max(settings.idle_interval_s, round(since + settings.idle_probe_s - now, 6))


@leads_to(STAYS)
def watch_armed_while_connected(m: Machine, e: ev.TrafficWatchArmed) -> tuple[Machine, Actions]:
    """The traffic watch is in place: asleep, the next sample waits for the idle probe (issue
    #27: an idle daemon wakes on the first packet, or to probe, and not in between). A watch
    that reports in after the idle spell ended changes nothing."""
    state = m.state
    assert isinstance(state, Connected)
    if state.watch != "asked":
        return m, []
    asleep = replace(state, watch="armed")
    delay = _idle_sample_in(asleep, e.now, m.context.settings)
    if delay <= m.context.settings.idle_interval_s:
        return Machine(asleep, m.context), []  # the probe is due before the idle sample anyway
    return Machine(asleep, m.context), [act.StartTimer("sample", delay)]


def _unreadable(
    m: Machine, e: ev.StatsUnreadable, judge: Callable[[Machine, ev.StatsRead], tuple[Machine, Actions]]
) -> tuple[Machine, Actions]:
    state = m.state
    assert isinstance(state, (Connecting, Connected))
    rx, tx = state.liveness.rx_bytes, state.liveness.tx_bytes
    if rx is None or tx is None:  # no reading yet to repeat: probe, and read again soon
        return m, [act.Probe(), act.StartTimer("sample", m.context.settings.probe_interval_s)]
    return judge(m, ev.StatsRead(e.now, rx, tx, None))


@leads_to(STAYS, Connected)
def unreadable_while_connecting(m: Machine, e: ev.StatsUnreadable) -> tuple[Machine, Actions]:
    """An unreadable tunnel is a silent one: the last counters again, no handshake (before any
    reading: probe and read again). The connect timer decides."""
    return _unreadable(m, e, sample_while_connecting)


@leads_to(STAYS, Connecting, Blocked, Offline)
def unreadable_while_connected(m: Machine, e: ev.StatsUnreadable) -> tuple[Machine, Actions]:
    """An unreadable tunnel is a silent one: judged as the last counters again, no handshake."""
    return _unreadable(m, e, sample_while_connected)


@leads_to(STAYS, Connecting, Blocked, Offline)
def timer_while_connecting(m: Machine, e: ev.TimerFired) -> tuple[Machine, Actions]:
    """``connect``: no handshake in time, the server failed. ``sample``: read the counters."""
    state = m.state
    assert isinstance(state, Connecting)
    if e.timer == "connect":
        timeout = m.context.settings.connect_timeout(state.attempt)
        return _server_failed(m, e.now, state.server, f"no handshake within {timeout:g} s")
    if e.timer == "sample":
        return m, [act.ReadStats()]
    return m, []


@leads_to(STAYS)
def timer_while_connected(m: Machine, e: ev.TimerFired) -> tuple[Machine, Actions]:
    """``sample``: read the counters; the other timers are not running here."""
    return (m, [act.ReadStats()]) if e.timer == "sample" else (m, [])


@leads_to(STAYS, Connecting, Offline)
def timer_while_blocked(m: Machine, e: ev.TimerFired) -> tuple[Machine, Actions]:
    """``backoff`` ran out: try again, cooldowns ignored (they would all still be running)."""
    state = m.state
    assert isinstance(state, Blocked)
    if e.timer == "backoff" and state.retry_at is not None:
        return _pick_and_connect(m, e.now, "retrying after backoff", ignore_cooldown=True)
    return m, []


@leads_to(Connecting)
def tunnel_lost_while_tunnelled(m: Machine, e: ev.TunnelLost) -> tuple[Machine, Actions]:
    """The interface was deleted: set the same server up again (which recreates it)."""
    server = m.state.server
    assert server is not None
    m = _note_failure(m, e.now, server, "the tunnel interface was deleted")
    return enter_connecting(m, e.now, server, "the tunnel interface was deleted; recreating it")


@leads_to(STAYS)
def tunnel_lost_while_offline(m: Machine, e: ev.TunnelLost) -> tuple[Machine, Actions]:
    """Remember that the peer must be set up anew when a path returns."""
    state = m.state
    assert isinstance(state, Offline)
    m = _note_failure(m, e.now, state.resume, "the tunnel interface was deleted")
    return Machine(replace(state, intact=False), m.context), []


@leads_to(STAYS)
def note_tunnel_lost(m: Machine, e: ev.TunnelLost) -> tuple[Machine, Actions]:
    """No peer now anyway; the next connect recreates the interface."""
    return _note_failure(m, e.now, None, "the tunnel interface was deleted"), []


@leads_to(Connecting)
def backend_down_while_tunnelled(m: Machine, e: ev.BackendDown) -> tuple[Machine, Actions]:
    """The backend restarts itself with the same peer: check that server again, clocks running."""
    server = m.state.server
    assert server is not None
    m = _note_failure(m, e.now, server, f"the WireGuard backend died: {e.reason}")
    return enter_connecting(m, e.now, server, "the WireGuard backend died; waiting for it", configure=False)


@leads_to(STAYS)
def note_backend_down(m: Machine, e: ev.BackendDown) -> tuple[Machine, Actions]:
    """Recorded for the status; the backend restarts itself."""
    return _note_failure(m, e.now, None, f"the WireGuard backend died: {e.reason}"), []


@leads_to(STAYS)
def backend_up_while_connecting(m: Machine, _e: ev.BackendUp) -> tuple[Machine, Actions]:
    """The restarted backend has the peer again: provoke the handshake now rather than later."""
    return m, [act.Probe()]


@leads_to(STAYS, Connecting, Blocked, Offline)
def connect_failed_while_connecting(m: Machine, e: ev.ConnectFailed) -> tuple[Machine, Actions]:
    """Setting this server up failed: it counts as a failed server."""
    state = m.state
    assert isinstance(state, Connecting)
    if e.server != state.server:
        return m, []
    return _server_failed(m, e.now, e.server, e.reason)


@leads_to(STAYS)
def lock_tampered(m: Machine, e: ev.LockTampered) -> tuple[Machine, Actions]:
    """The guard restored the lock already; record it where the status shows it."""
    m = _note_failure(m, e.now, None, f"lock tampered with and restored: {e.reason}")
    return m, [_publish(m.state, f"lock tampered with and restored: {e.reason}")]


@leads_to(Connecting)
def rotate_while_tunnelled(m: Machine, e: ev.RotateRequested) -> tuple[Machine, Actions]:
    """Another server: one not cooling down if any, else any other, else this one afresh."""
    server = m.state.server
    assert server is not None
    ctx = m.context
    for ignore_cooldown in (False, True):
        candidates = eligible(
            ctx.settings,
            ctx.reachable,
            ctx.cooling,
            e.now,
            exclude=(server,),
            ignore_cooldown=ignore_cooldown,
        )
        if candidates:
            return _pick_and_connect(
                m, e.now, "rotate requested", exclude=(server,), ignore_cooldown=ignore_cooldown
            )
    return enter_connecting(m, e.now, server, "rotate requested; no other server is reachable", fresh=True)


@leads_to(Connecting)
def reconnect_while_tunnelled(m: Machine, e: ev.ReconnectRequested) -> tuple[Machine, Actions]:
    """The same server's peer set up afresh (a new handshake)."""
    server = m.state.server
    assert server is not None
    return enter_connecting(m, e.now, server, "reconnect requested", fresh=True)


@leads_to(STAYS, Connecting, Offline)
def request_while_blocked(
    m: Machine, e: ev.RotateRequested | ev.ReconnectRequested
) -> tuple[Machine, Actions]:
    """Do not wait out the backoff: try now (once started)."""
    if not m.context.started:
        return m, []
    return _pick_and_connect(m, e.now, "requested by the user", ignore_cooldown=True)


@leads_to(STAYS, Connecting, Blocked, Offline)
def reload_while_tunnelled(m: Machine, e: ev.ConfigReloaded) -> tuple[Machine, Actions]:
    """Keep the tunnel if its server is still listed and reachable; else another, or offline.

    ``reachable`` comes with the event, looked up for the new list (see ``ConfigReloaded``)."""
    m = _with_settings(m, e)
    server = m.state.server
    assert server is not None
    if not m.context.settings.servers:
        return enter_blocked(m, e.now)
    if server not in m.context.settings.servers:
        return _pick_and_connect(m, e.now, f"{server} is no longer configured")
    return _follow_paths(m, e.now, server)


@leads_to(STAYS, Connecting)
def unfit_while_connected(m: Machine, e: ev.ServerUnfit) -> tuple[Machine, Actions]:
    """The server forwards no port though the user requires one: leave it like a failed server
    (cooldown, the reason in the status) for another that is not cooling down and not known to
    forward none. With none left to try, stay connected (the tunnel still protects) and say so;
    the plugin reports again at each of its retries, and a server whose cooldown ran out is
    tried then."""
    state = m.state
    assert isinstance(state, Connected)
    if e.server != state.server:
        return m, []  # about a connection already left
    ctx = m.context
    last = ctx.last_failure
    repeated = last is not None and (last.server, last.reason) == (e.server, e.reason)
    ctx = replace(
        ctx,
        unfit=ctx.unfit | {e.server},
        granted=ctx.granted - {e.server},
        cooling=ctx.cooled(e.server, e.now + ctx.settings.cooldown_s),
        last_failure=last if repeated else Failure(e.now, e.server, e.reason),
    )
    m = Machine(state, ctx)
    if [s for s in eligible(ctx.settings, ctx.reachable, ctx.cooling, e.now) if s not in ctx.unfit]:
        return _pick_and_connect(m, e.now, f"{e.server} is unfit: {e.reason}", exclude=tuple(ctx.unfit))
    if repeated:
        return m, []  # said already
    if set(ctx.settings.servers) <= ctx.unfit:
        why = "no server forwards a port"
    else:
        why = "no other server can be tried now"
    return m, [_publish(state, f"{e.server} is unfit ({e.reason}); {why}: staying connected without it")]


@leads_to(STAYS)
def note_port_granted(m: Machine, e: ev.PortGranted) -> tuple[Machine, Actions]:
    """Remember that ``server`` forwards ports: rotation tries such servers first."""
    ctx = m.context
    if e.server not in ctx.settings.servers:
        return m, []
    return Machine(m.state, replace(ctx, granted=ctx.granted | {e.server}, unfit=ctx.unfit - {e.server})), []


@leads_to(STAYS, Connecting, Blocked)
def reload_while_offline(m: Machine, e: ev.ConfigReloaded) -> tuple[Machine, Actions]:
    """Forget a resume server no longer listed; connect if a listed server has a path now.

    No later path report would say so if the endpoints' reachability did not change, or if it
    reached the machine before these settings (it was offline for good once: issue #11)."""
    m = _with_settings(m, e)
    state = m.state
    assert isinstance(state, Offline)
    if state.resume is not None and state.resume not in m.context.settings.servers:
        m = Machine(Offline(state.since, None, False), m.context)
    if not m.context.settings.servers:
        return enter_blocked(m, e.now)
    return _back_online(m, e.now, "the reloaded configuration has a reachable server")


@leads_to(STAYS, Connecting, Offline)
def reload_while_blocked(m: Machine, e: ev.ConfigReloaded) -> tuple[Machine, Actions]:
    """New settings; a running backoff keeps its schedule. Given servers after none: connect.

    No path to any server of the new list: offline, as a path report would do."""
    m = _with_settings(m, e)
    state = m.state
    assert isinstance(state, Blocked)
    if not m.context.started:
        return m, []
    if not m.context.settings.servers:
        return (m, []) if state.retry_at is None else enter_blocked(m, e.now)
    if not _any_reachable(m.context):
        return enter_offline(m, e.now)
    if state.retry_at is None:
        return _pick_and_connect(m, e.now, "servers are configured again")
    return m, []


def _with_settings(m: Machine, e: ev.ConfigReloaded) -> Machine:
    known = set(e.settings.servers)
    ctx = m.context
    cooling = type(ctx.cooling)({k: v for k, v in ctx.cooling.items() if k in known})
    last = ctx.last_server if ctx.last_server in known else None
    reachable = ctx.reachable if e.reachable is None else e.reachable
    return Machine(
        m.state,
        replace(
            ctx,
            settings=e.settings,
            cooling=cooling,
            last_server=last,
            reachable=reachable,
            granted=ctx.granted & known,
            unfit=ctx.unfit & known,
        ),
    )


# --- the table -------------------------------------------------------------------------------

TRANSITIONS: dict[type[State], dict[type, Handler]] = {
    Blocked: {
        ev.Start: start,
        ev.Stop: stop,
        ev.PathsChanged: paths_while_blocked,
        ev.StatsRead: ignore,
        ev.StatsUnreadable: ignore,
        ev.TimerFired: timer_while_blocked,
        ev.TrafficSeen: ignore,
        ev.TrafficWatchArmed: ignore,
        ev.TunnelLost: note_tunnel_lost,
        ev.BackendDown: note_backend_down,
        ev.BackendUp: ignore,
        ev.ConnectFailed: ignore,
        ev.LockTampered: lock_tampered,
        ev.RotateRequested: request_while_blocked,
        ev.ReconnectRequested: request_while_blocked,
        ev.ConfigReloaded: reload_while_blocked,
        ev.ServerUnfit: ignore,
        ev.PortGranted: note_port_granted,
    },
    Connecting: {
        ev.Start: ignore,
        ev.Stop: stop,
        ev.PathsChanged: paths_while_tunnelled,
        ev.StatsRead: sample_while_connecting,
        ev.StatsUnreadable: unreadable_while_connecting,
        ev.TimerFired: timer_while_connecting,
        ev.TrafficSeen: ignore,
        ev.TrafficWatchArmed: ignore,
        ev.TunnelLost: tunnel_lost_while_tunnelled,
        ev.BackendDown: backend_down_while_tunnelled,
        ev.BackendUp: backend_up_while_connecting,
        ev.ConnectFailed: connect_failed_while_connecting,
        ev.LockTampered: lock_tampered,
        ev.RotateRequested: rotate_while_tunnelled,
        ev.ReconnectRequested: reconnect_while_tunnelled,
        ev.ConfigReloaded: reload_while_tunnelled,
        ev.ServerUnfit: ignore,
        ev.PortGranted: note_port_granted,
    },
    Connected: {
        ev.Start: ignore,
        ev.Stop: stop,
        ev.PathsChanged: paths_while_tunnelled,
        ev.StatsRead: sample_while_connected,
        ev.StatsUnreadable: unreadable_while_connected,
        ev.TimerFired: timer_while_connected,
        ev.TrafficSeen: traffic_while_connected,
        ev.TrafficWatchArmed: watch_armed_while_connected,
        ev.TunnelLost: tunnel_lost_while_tunnelled,
        ev.BackendDown: backend_down_while_tunnelled,
        ev.BackendUp: ignore,
        ev.ConnectFailed: ignore,
        ev.LockTampered: lock_tampered,
        ev.RotateRequested: rotate_while_tunnelled,
        ev.ReconnectRequested: reconnect_while_tunnelled,
        ev.ConfigReloaded: reload_while_tunnelled,
        ev.ServerUnfit: unfit_while_connected,
        ev.PortGranted: note_port_granted,
    },
    Offline: {
        ev.Start: ignore,
        ev.Stop: stop,
        ev.PathsChanged: paths_while_offline,
        ev.StatsRead: ignore,
        ev.StatsUnreadable: ignore,
        ev.TimerFired: ignore,
        ev.TrafficSeen: ignore,
        ev.TrafficWatchArmed: ignore,
        ev.TunnelLost: tunnel_lost_while_offline,
        ev.BackendDown: note_backend_down,
        ev.BackendUp: ignore,
        ev.ConnectFailed: ignore,
        ev.LockTampered: lock_tampered,
        ev.RotateRequested: ignore,
        ev.ReconnectRequested: ignore,
        ev.ConfigReloaded: reload_while_offline,
        ev.ServerUnfit: ignore,
        ev.PortGranted: note_port_granted,
    },
    Stopped: {event_type: ignore for event_type in ev.EVENT_TYPES},
}


class UnknownEvent(TypeError):
    """An event type the table does not know: a programming error, never a runtime condition."""


def step(machine: Machine, event: ev.Event) -> tuple[Machine, Actions]:
    """Apply ``event``: the next machine and the actions to carry out, in order.

    Before the table: a gap since the last event longer than ``MachineSettings.resume_gap`` means the
    daemon did not run (``resume_after_gap``); the watch on the server restarts, and a timer
    that fired late because of it (the connect timeout, a sample) is not held against it."""
    try:
        handler = TRANSITIONS[type(machine.state)][type(event)]
    except KeyError:
        raise UnknownEvent(f"{type(event).__name__} in state {machine.state.name}") from None
    machine, resumed = resume_after_gap(machine, event.now)
    if not resumed:
        return handler(machine, event)
    if isinstance(event, ev.TimerFired):
        return machine, resumed  # its clocks were started afresh by the resume
    after, actions = handler(machine, event)
    if type(after.state) is not type(machine.state) or after.state.server != machine.state.server:
        return after, actions  # the event moved the machine on: the resumed watch is moot
    return after, resumed + actions


def resume_after_gap(m: Machine, now: float) -> tuple[Machine, Actions]:
    """Note ``now`` as the latest event's time; after a gap of ``MachineSettings.resume_gap`` or more
    with a tunnel up, restart the watch on its server instead of blaming it for the silence.

    The daemon samples a tunnel at least every ``idle_interval_s``, so no event in longer than
    that means the daemon itself did not run (a suspended VM, SIGSTOP): its timers fired late
    all at once, and the server's handshake aged meanwhile. Connecting: the connect window
    starts again (a connect timer due during the gap would fail a healthy server). Connected: a
    fresh liveness (its counters a new baseline, the handshake's age counted from now), and the
    probes that follow decide, in seconds, whether the server still answers."""
    ctx = m.context
    last = ctx.last_event_at
    m = Machine(m.state, replace(ctx, last_event_at=now if last is None else max(last, now)))
    asleep = isinstance(m.state, Connected) and m.state.watch == "armed"
    if last is None or now - last < ctx.settings.resume_gap(asleep):
        return m, []
    state = m.state
    if not isinstance(state, (Connecting, Connected)):
        return m, []
    reason = f"the daemon did not run for {now - last:.0f} s (suspended?); checking {state.server} afresh"
    if isinstance(state, Connecting):
        return enter_connecting(m, now, state.server, reason, configure=False)
    fresh = replace(state, liveness=Liveness(since=now, resumed_at=now))
    return Machine(fresh, m.context), [_publish(fresh, reason), act.ReadStats()]


def _one_line(doc: str | None) -> str:
    """A docstring as one table cell: every line, joined (a cell cannot hold a line break)."""
    return " ".join(line.strip() for line in (doc or "").strip().splitlines() if line.strip())


def describe() -> str:
    """The table as Markdown: state, event, the states it can lead to, and what happens (the
    handler's docstring). Entries that do nothing (``ignore``) are left out."""
    rows = ["| state | event | leads to | what happens |", "| --- | --- | --- | --- |"]
    for state_type, row in TRANSITIONS.items():
        for event_type, handler in row.items():
            if handler is ignore:
                continue
            leads = ", ".join(t.name for t in targets(handler, state_type))
            rows.append(
                f"| {state_type.name} | {event_type.__name__} | {leads} | {_one_line(handler.__doc__)} |"
            )
    rows += ["", "| action | what it asks | carried out by |", "| --- | --- | --- |"]
    for action_type, executor in act.EXECUTED_BY.items():
        rows.append(f"| {action_type.__name__} | {_one_line(action_type.__doc__)} | {executor} |")
    return "\n".join(rows)
