"""Properties of the machine over arbitrary event sequences (hypothesis), no I/O at all.

Whatever happens, in whatever order: no action removes the lock (except a stop in session mode)
or widens it beyond the one server being set up; a peer is configured only after the lock lets
exactly that server through; nothing is attempted while offline; timers are sane and backoff
grows and is capped; a stopped machine does nothing.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from supervisor.machine import actions as act
from supervisor.machine import events as ev
from supervisor.machine.core import TRANSITIONS, step, targets
from supervisor.machine.rotation import nominal_backoff
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import Blocked, Connected, Connecting, Machine, Offline, Stopped

SERVERS = ("a", "b", "c", "d")
# Names a reload may bring in: the monitor can report paths for them before the reload lands.
NAMES_EVER = (*SERVERS, "e", "f")


def kinds(actions: list[act.Action]) -> list[type]:
    return [type(a) for a in actions]


NAMES = {"blocked", "connecting", "connected", "offline", "stopped"}


class MachineUnderEvents(RuleBasedStateMachine):
    """Feeds events the runtime could produce and checks every step's actions."""

    def __init__(self) -> None:
        super().__init__()
        self.machine: Machine | None = None
        self.now = 0.0
        self.rx = self.tx = 0
        self.lock: tuple[str, ...] | None = None  # what the lock lets through, as the actions set it
        self.exited = False
        self.nominal_by_round: dict[int, float] = {}

    @initialize(
        strategy=st.sampled_from(["sequential", "random"]),
        mode=st.sampled_from(["permanent", "session"]),
        seed=st.integers(0, 2**64 - 1),
        adopted=st.sampled_from([None, "a", "c", "elsewhere"]),
        reachable=st.frozensets(st.sampled_from(SERVERS)),
    )
    def start(
        self, strategy: str, mode: str, seed: int, adopted: str | None, reachable: frozenset[str]
    ) -> None:
        self.settings = MachineSettings(servers=SERVERS, strategy=strategy, lock_mode=mode, cooldown_s=5.0)  # type: ignore[arg-type]
        self.machine = Machine.initial(self.settings)
        self.feed(ev.PathsChanged(self.now, reachable))
        self.feed(ev.Start(self.now, seed=seed, adopted=adopted))

    def feed(self, event: ev.Event) -> list[act.Action]:
        assert self.machine is not None
        before = self.machine
        self.machine, actions = step(self.machine, event)
        self.check(before, event, actions)
        return actions

    def check(self, before: Machine, event: ev.Event, actions: list[act.Action]) -> None:
        assert self.machine is not None
        handler = TRANSITIONS[type(before.state)][type(event)]
        declared = targets(handler, type(before.state))
        assert type(self.machine.state) in declared, (
            f"{handler.__name__} led {before.state.name} to {self.machine.state.name}, "
            f"declared: {[t.name for t in declared]}"
        )
        if self.exited:
            assert actions == [], "a stopped machine does nothing"
        for action in actions:
            if isinstance(action, (act.ApplyLock, act.SetLockServers)):
                assert len(action.servers) <= 1, f"the lock widened to {action.servers}"
                assert set(action.servers) <= set(self.settings.servers)
                self.lock = action.servers
            elif isinstance(action, act.RemoveLock):
                assert isinstance(event, ev.Stop) and self.settings.lock_mode == "session"
                assert act.Exit() in actions
            elif isinstance(action, act.ConfigurePeer):
                assert self.lock == (action.server,), (
                    f"peer {action.server} set up while the lock allows {self.lock}"
                )
            elif isinstance(action, act.StartTimer):
                assert 0 < action.delay_s < math.inf
                if action.timer == "backoff":
                    rounds = self.machine.context.rounds
                    nominal = nominal_backoff(self.settings, rounds)
                    assert nominal / 2 <= action.delay_s <= nominal <= self.settings.backoff_max_s
                    self.nominal_by_round[rounds] = nominal
            elif isinstance(action, act.Exit):
                self.exited = True
        if isinstance(self.machine.state, Offline):
            attempted = (act.ConfigurePeer, act.Probe, act.ReadStats, act.StartTimer)
            assert not any(isinstance(a, attempted) for a in actions), f"attempted while offline: {actions}"
        reachable = self.machine.context.reachable
        if reachable is not None and not reachable:
            assert not any(isinstance(a, act.ConfigurePeer) for a in actions), "a peer set up with no path"

    @invariant()
    def state_is_one_of_the_contract(self) -> None:
        if self.machine is not None:
            assert self.machine.state.name in NAMES
            assert isinstance(self.machine.state, Stopped) == self.exited

    @invariant()
    def never_stranded(self) -> None:
        """Offline only while no configured server has a path; blocked without a retry only for
        want of servers (issue #11: a reload once left the daemon offline for good)."""
        machine = self.machine
        if machine is None or not machine.context.started:
            return
        ctx = machine.context
        reachable = ctx.reachable
        if isinstance(machine.state, Offline):
            assert reachable is not None and not (reachable & set(ctx.settings.servers)), (
                f"offline with {sorted(reachable or ())} reachable among {ctx.settings.servers}"
            )
        if isinstance(machine.state, Blocked) and machine.state.retry_at is None:
            assert not ctx.settings.servers, f"blocked for good: {machine.state.reason}"

    @invariant()
    def backoff_grows_and_is_capped(self) -> None:
        rounds = sorted(self.nominal_by_round)
        nominals = [self.nominal_by_round[r] for r in rounds]
        assert nominals == sorted(nominals)
        assert all(n <= self.settings.backoff_max_s for n in nominals) if nominals else True

    # --- the world ------------------------------------------------------------------------

    @rule(dt=st.floats(0.01, 30))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule(reachable=st.frozensets(st.sampled_from(NAMES_EVER)))
    def paths(self, reachable: frozenset[str]) -> None:
        self.feed(ev.PathsChanged(self.now, reachable))

    @rule(
        rx=st.integers(0, 3000),
        tx=st.integers(0, 3000),
        reset=st.booleans(),
        age=st.none() | st.floats(0, 400),
    )
    def stats(self, rx: int, tx: int, reset: bool, age: float | None) -> None:
        if reset:
            self.rx, self.tx = 0, 0
        self.rx += rx
        self.tx += tx
        self.now += 0.25
        self.feed(ev.StatsRead(self.now, self.rx, self.tx, age))

    @rule()
    def stats_unreadable(self) -> None:
        self.now += 0.25
        self.feed(ev.StatsUnreadable(self.now, "uapi socket gone"))

    @rule(timer=st.sampled_from(ev.TIMERS))
    def timer_fires(self, timer: ev.Timer) -> None:
        self.now += 1
        self.feed(ev.TimerFired(self.now, timer))

    @rule()
    def tunnel_lost(self) -> None:
        self.feed(ev.TunnelLost(self.now))

    @rule(up=st.booleans())
    def backend(self, up: bool) -> None:
        self.feed(ev.BackendUp(self.now) if up else ev.BackendDown(self.now, "died"))

    @rule(server=st.sampled_from(SERVERS))
    def connect_failed(self, server: str) -> None:
        self.feed(ev.ConnectFailed(self.now, server, "refused"))

    @rule(server=st.sampled_from(SERVERS), granted=st.booleans())
    def port_forwarding(self, server: str, granted: bool) -> None:
        event = ev.PortGranted(self.now, server) if granted else ev.ServerUnfit(self.now, server, "refused")
        before = self.machine
        self.feed(event)
        if isinstance(event, ev.ServerUnfit) and before is not None and isinstance(before.state, Connected):
            # Unfit is never worse than staying: the tunnel is not dropped for want of a port.
            assert self.machine is not None and isinstance(self.machine.state, (Connected, Connecting))

    @rule()
    def tampered(self) -> None:
        self.feed(ev.LockTampered(self.now, "the lock table was deleted"))

    @rule(rotate=st.booleans())
    def user(self, rotate: bool) -> None:
        self.feed(ev.RotateRequested(self.now) if rotate else ev.ReconnectRequested(self.now))

    @rule(
        order=st.permutations(NAMES_EVER),
        keep=st.integers(0, len(NAMES_EVER)),
        reachable=st.none() | st.frozensets(st.sampled_from(NAMES_EVER)),
    )
    def reload(self, order: list[str], keep: int, reachable: frozenset[str] | None) -> None:
        self.settings = MachineSettings(
            servers=tuple(order[:keep]),
            strategy=self.settings.strategy,
            lock_mode=self.settings.lock_mode,
            cooldown_s=self.settings.cooldown_s,
        )
        self.feed(ev.ConfigReloaded(self.now, self.settings, reachable))

    @precondition(lambda self: not self.exited)
    @rule()
    def stop(self) -> None:
        actions = self.feed(ev.Stop(self.now))
        assert act.CloseTunnel() in actions and actions[-1] == act.Exit()


MachineUnderEvents.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestMachineUnderEvents = MachineUnderEvents.TestCase


@settings(max_examples=100, deadline=None)
@given(
    strategy=st.sampled_from(["sequential", "random"]),
    count=st.integers(1, 8),
    seed=st.integers(0, 2**64 - 1),
)
def test_every_server_is_tried_before_any_backoff(strategy: str, count: int, seed: int) -> None:
    """Every server failing by timeout (within its cooldown): the first round tries each once,
    then the machine backs off, then tries again."""
    servers = tuple(f"s{i}" for i in range(count))
    machine = Machine.initial(MachineSettings(servers=servers, strategy=strategy, cooldown_s=600))  # type: ignore[arg-type]
    now = 0.0
    machine, actions = step(machine, ev.Start(now, seed=seed))
    tried = [a.server for a in actions if isinstance(a, act.ConfigurePeer)]
    tried_before_backoff: list[str] | None = None
    for _ in range(3 * count + 6):
        now += 1
        timer = "backoff" if machine.state.name == "blocked" else "connect"
        machine, actions = step(machine, ev.TimerFired(now, timer))  # type: ignore[arg-type]
        tried += [a.server for a in actions if isinstance(a, act.ConfigurePeer)]
        backoff = any(isinstance(a, act.StartTimer) and a.timer == "backoff" for a in actions)
        if backoff and tried_before_backoff is None:
            tried_before_backoff = list(tried)
    assert tried_before_backoff is not None, "every server failed: the machine must back off"
    assert sorted(tried_before_backoff) == sorted(servers), f"first round tried {tried_before_backoff}"
    assert len(tried) > count, "attempts go on after the backoff"


# --- escalating liveness: the doubt, its pace and its verdict ------------------------------

# One sample of a connected tunnel: how long after the last, whether rx grew (any answer) and
# whether tx grew (something sent).
samples = st.lists(
    st.tuples(st.floats(0.001, 0.6), st.booleans(), st.booleans()),
    min_size=1,
    max_size=150,
)
detection = st.builds(
    lambda pace, count, window, reply: MachineSettings(
        servers=SERVERS,
        doubt_probe_interval_s=pace,
        min_unanswered_probes=count,
        dead_after_s=window,
        probe_reply_s=reply,
    ),
    pace=st.floats(0.005, 0.2),
    count=st.integers(1, 40),
    window=st.floats(0.05, 2.0),
    reply=st.floats(0.0, 1.0),
)


def connect(machine: Machine, now: float, rx: int, tx: int) -> Machine:
    """From connecting, at ``now + 0.1``: the reading at entry, the handshake complete, and rx
    beyond it (the server answering through the session), ending at counters ``rx``, ``tx``."""
    machine, _ = step(machine, ev.StatsRead(now, 0, 0, None))
    machine, _ = step(machine, ev.StatsRead(now + 0.05, rx // 2, tx // 2, 0.01))
    machine, _ = step(machine, ev.StatsRead(now + 0.1, rx, tx, 0.05))
    return machine


WATCH_ACTIONS = (act.WatchTraffic, act.StopWatchingTraffic)


@settings(max_examples=300, deadline=None)
@given(config=detection, samples=samples, woken=st.lists(st.booleans(), min_size=40, max_size=40))
def test_the_traffic_watch_is_armed_exactly_while_idle_and_never_sees_our_own_probes(
    config: MachineSettings, samples: list[tuple[float, bool, bool]], woken: list[bool]
) -> None:
    """Whatever the samples and wherever traffic wakes the daemon: an idle verdict arms the
    watch; every other verdict disarms it before its probe (a probe of our own must not read as
    traffic starting); a wake while idle brings the next sample forward to the doubt pace."""
    machine = Machine.initial(config)
    now, rx, tx = 0.0, 100, 100
    machine, _ = step(machine, ev.Start(now, seed=1))
    machine = connect(machine, now, rx, tx)
    armed = False
    for (dt, rx_grew, tx_grew), wake in zip(samples, woken, strict=False):
        now += dt
        rx += 92 if rx_grew else 0
        before = machine.state
        assert isinstance(before, Connected)
        tx += 100 if tx_grew or before.liveness.in_doubt else 0
        machine, actions = step(machine, ev.StatsRead(now, rx, tx, 1.0))
        state = machine.state
        if not isinstance(state, Connected):
            return
        idle = not rx_grew and not tx_grew and not state.liveness.in_doubt
        for action in actions:
            if isinstance(action, act.WatchTraffic):
                armed = True
            elif isinstance(action, act.StopWatchingTraffic):
                armed = False
            elif isinstance(action, act.Probe):
                assert not armed, f"a probe with the watch armed: {actions}"
        assert armed == (idle and act.Probe() not in actions), actions
        if armed and state.watch == "asked":
            # The watch reports in: asleep, the next sample waits for the idle probe, never less
            # than the idle pace, never past the probe's time.
            machine, actions = step(machine, ev.TrafficWatchArmed(now + 0.0005))
            since = state.liveness.idle_since
            assert since is not None
            for action in actions:
                assert isinstance(action, act.StartTimer) and action.timer == "sample", actions
                assert config.idle_interval_s < action.delay_s <= since + config.idle_probe_s - now
        if wake and armed:
            machine, actions = step(machine, ev.TrafficSeen(now + 0.001))
            armed = False  # it fires once
            assert actions == [act.StartTimer("sample", config.doubt_probe_interval_s)]


@settings(max_examples=300, deadline=None)
@given(config=detection, samples=samples)
def test_doubt_probes_fast_decides_only_on_count_and_window_and_any_answer_resets(
    config: MachineSettings, samples: list[tuple[float, bool, bool]]
) -> None:
    """Whatever the samples: no verdict before the count of overdue probes *and* the window; any
    rx growth clears the doubt with no probe and the calm pace; in doubt every sample probes at
    the doubt pace."""
    machine = Machine.initial(config)
    now, rx, tx = 0.0, 100, 100
    machine, _ = step(machine, ev.Start(now, seed=1))
    machine = connect(machine, now, rx, tx)
    now += 0.1
    assert machine.state.name == "connected"
    probes: list[float] = []  # this doubt's probes, as the test saw the actions ask for them
    for dt, rx_grew, tx_grew in samples:
        now += dt
        rx += 92 if rx_grew else 0
        tx += 100 if tx_grew or probes else 0  # in doubt, the last sample's probe went out
        machine, actions = step(machine, ev.StatsRead(now, rx, tx, 1.0))
        actions = [a for a in actions if not isinstance(a, WATCH_ACTIONS)]  # (the next test's)
        if machine.state.name != "connected":
            overdue = [t for t in probes if now - t >= config.probe_reply_s]
            assert not rx_grew, "an answer never kills"
            assert len(overdue) >= config.min_unanswered_probes, f"verdict on {len(overdue)} probes"
            assert probes and now - probes[0] >= config.dead_after_s, "verdict before the window"
            return
        assert isinstance(machine.state, Connected)
        if rx_grew:
            assert actions == [act.StartTimer("sample", config.interval_s)], "the pace falls back"
            assert not machine.state.liveness.in_doubt
            probes = []
        elif tx_grew or probes:
            assert kinds(actions) == [act.Probe, act.StartTimer], actions
            timer = actions[1]
            assert isinstance(timer, act.StartTimer) and timer.timer == "sample"
            pace = config.doubt_probe_interval_s
            assert pace / 3 - 1e-6 <= timer.delay_s <= pace + 1e-6, "the doubt pace, caught up"
            probes.append(now)
            # On schedule from the doubt's first probe: a late sample makes the next one sooner.
            due = probes[0] + len(probes) * pace - now
            assert timer.delay_s == pytest.approx(min(pace, max(pace / 3, due)), abs=1e-6)
            assert machine.state.liveness.unanswered == len(probes)
        else:
            assert act.Probe() not in actions or config.idle_probe_s <= now, "idle: no doubt pace"
            assert all(a.delay_s >= config.interval_s for a in actions if isinstance(a, act.StartTimer))


@settings(max_examples=100, deadline=None)
@given(config=detection)
def test_a_silent_server_is_declared_dead_once_count_and_window_are_met(config: MachineSettings) -> None:
    """Sampled at the doubt pace with nothing coming back, the verdict comes within one sample
    after both the count of overdue probes and the window are met, never before."""
    machine = Machine.initial(config)
    now, tx = 0.0, 100
    machine, _ = step(machine, ev.Start(now, seed=1))
    machine = connect(machine, now, 100, tx)
    now += 0.1
    began = None
    for _ in range(100_000):
        now += config.doubt_probe_interval_s
        tx += 100
        machine, _ = step(machine, ev.StatsRead(now, 100, tx, 1.0))
        began = began if began is not None else now
        if machine.state.name != "connected":
            break
    pace = config.doubt_probe_interval_s
    assert began is not None
    count_met = began + (config.min_unanswered_probes - 1) * pace + config.probe_reply_s
    due = max(count_met, began + config.dead_after_s)
    assert due - 1e-6 <= now <= due + pace + 1e-6
