"""The pure state machine, transition by transition: no I/O, no clock (time is event data).

Machines in each state are reached by driving ``Machine.initial`` with events, as the runtime
would, never built by hand, so a test cannot start from a state the machine could not reach.
"""

from __future__ import annotations

import pytest
from msgspec.structs import replace

from supervisor.machine import actions as act
from supervisor.machine import events as ev
from supervisor.machine.core import TRANSITIONS, UnknownEvent, describe, ignore, step
from supervisor.machine.liveness import chance_all_lost, probes_needed, round_trip_loss
from supervisor.machine.rotation import nominal_backoff
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import (
    STATE_TYPES,
    Blocked,
    Connected,
    Connecting,
    Failure,
    Machine,
    Offline,
    Stopped,
)

SERVERS = ("a", "b", "c")
ALL = frozenset(SERVERS)
SETTINGS = MachineSettings(servers=SERVERS)


class Run:
    """A machine and everything it asked for, driven one event at a time."""

    def __init__(self, settings: MachineSettings = SETTINGS) -> None:
        self.machine = Machine.initial(settings)
        self.actions: list[act.Action] = []
        self.now = 0.0

    def feed(self, event: ev.Event) -> list[act.Action]:
        self.now = max(self.now, getattr(event, "now", self.now))
        self.machine, actions = step(self.machine, event)
        self.actions += actions
        return actions

    def last_failure(self) -> Failure:
        failure = self.machine.context.last_failure
        assert failure is not None, "no failure recorded"
        return failure

    def at(self, dt: float) -> float:
        self.now += dt
        return self.now

    @property
    def state(self):
        return self.machine.state

    # ways into each state

    def start(self, adopted: str | None = None, reachable: frozenset[str] = ALL) -> list[act.Action]:
        self.feed(ev.PathsChanged(0.0, reachable))
        return self.feed(ev.Start(0.0, seed=7, adopted=adopted))

    def connect(self, rx: int = 100) -> None:
        """From connecting: the reading at entry, a sample that finds the handshake complete, and
        one with rx beyond it (the server answering through the session); 0.25 s in all."""
        self.feed(ev.StatsRead(self.now, 0, 0, None))
        self.feed(ev.StatsRead(self.at(0.125), rx // 2, rx // 2, 0.05))
        self.feed(ev.StatsRead(self.at(0.125), rx, rx, 0.1))
        assert isinstance(self.state, Connected), self.state

    def started_connected(self) -> Run:
        self.start()
        self.connect()
        return self

    def silence(self, seconds: float, tx_growth: int = 100, step: float = 0.25) -> list[act.Action]:
        """Samples every ``step`` s in which tx grows and rx does not; every action they caused."""
        assert isinstance(self.state, (Connected, Connecting))
        rx = self.state.liveness.rx_bytes or 0
        tx = self.state.liveness.tx_bytes or 0
        caused: list[act.Action] = []
        steps = round(seconds / step)
        for _ in range(steps):
            tx += tx_growth
            caused += self.feed(ev.StatsRead(self.at(step), rx, tx, 1.0))
            if not isinstance(self.state, Connected):
                break
        return caused


def kinds(actions: list[act.Action]) -> list[type]:
    return [type(a) for a in actions]


def configured(actions: list[act.Action]) -> list[str]:
    return [a.server for a in actions if isinstance(a, act.ConfigurePeer)]


# --- the table --------------------------------------------------------------------------------


def test_the_table_is_complete_every_state_lists_every_event() -> None:
    assert set(TRANSITIONS) == set(STATE_TYPES)
    for row in TRANSITIONS.values():
        assert set(row) == set(ev.EVENT_TYPES)


def test_a_foreign_event_is_a_programming_error() -> None:
    with pytest.raises(UnknownEvent, match="int in state blocked"):
        step(Machine.initial(SETTINGS), 3)  # type: ignore[arg-type]


def test_describe_prints_every_acting_entry() -> None:
    transitions = describe().split("\n\n")[0]
    acting = sum(1 for row in TRANSITIONS.values() for handler in row.values() if handler is not ignore)
    assert transitions.count("\n") == acting + 1
    assert "| connected | StatsRead |" in transitions


# --- start ------------------------------------------------------------------------------------


def test_start_locks_first_then_connects_the_first_server() -> None:
    run = Run()
    actions = run.start()
    assert actions[0] == act.ApplyLock(("a",))
    assert kinds(actions).index(act.ApplyLock) < kinds(actions).index(act.ConfigurePeer)
    assert configured(actions) == ["a"]
    assert isinstance(run.state, Connecting) and run.state.server == "a"
    assert act.StartTimer("connect", 4.0) in actions


def test_the_first_connect_installs_the_lock_once_already_letting_its_server_through() -> None:
    """Issue #27 item 4: the start used to install the lock letting no server through, then at
    once the whole table again for the server (other resolvers are other rules)."""
    actions = Run().start()
    lock_actions = [a for a in actions if isinstance(a, (act.ApplyLock, act.SetLockServers))]
    assert lock_actions == [act.ApplyLock(("a",))]


def test_start_with_an_adopted_tunnel_lets_only_its_server_through_and_does_not_reconfigure() -> None:
    run = Run()
    actions = run.start(adopted="b")
    assert actions[0] == act.ApplyLock(("b",))
    assert configured(actions) == [], "an adopted tunnel is checked, not set up again"
    assert isinstance(run.state, Connecting) and run.state.server == "b"


def test_start_with_an_unknown_adopted_server_ignores_it() -> None:
    run = Run()
    actions = run.start(adopted="zz")
    assert actions[0] == act.ApplyLock(("a",))
    assert configured(actions) == ["a"]


def test_start_without_any_path_is_offline_and_attempts_nothing() -> None:
    run = Run()
    actions = run.start(reachable=frozenset())
    assert isinstance(run.state, Offline)
    assert kinds(actions) == [act.ApplyLock, act.PublishStatus]


def test_start_twice_does_nothing_the_second_time() -> None:
    run = Run()
    run.start()
    assert run.feed(ev.Start(1.0, seed=1)) == []


# --- connecting -------------------------------------------------------------------------------


def test_a_handshake_connects_only_once_the_server_answers_through_it() -> None:
    run = Run()
    run.start()
    actions = run.feed(ev.StatsRead(run.at(0.25), 0, 0, None))  # no handshake yet
    assert isinstance(run.state, Connecting)
    assert act.Probe() in actions and act.StartTimer("sample", 0.25) in actions
    actions = run.feed(ev.StatsRead(run.at(0.25), 92, 148, 0.1))
    assert isinstance(run.state, Connecting), "a handshake response without more rx: nothing answered yet"
    pace = SETTINGS.doubt_probe_interval_s
    assert act.Probe() in actions and act.StartTimer("sample", pace) in actions, "a session: probe fast"
    actions = run.feed(ev.StatsRead(run.at(0.03), 156, 228, 0.13))  # the probe's answer
    assert isinstance(run.state, Connected)
    assert act.CancelTimer("connect") in actions and act.StartTimer("sample", SETTINGS.interval_s) in actions


def test_a_handshake_response_whose_session_the_server_dropped_is_not_connected() -> None:
    """The lab's link flap right after a reconnect (tests/lab/test_soak_findings.py): two of our
    initiations, held back behind the link's unresolved neighbour, reached the server at once; it
    answered both and kept the other session. The response we took counted 92 bytes of rx and a
    fresh handshake, but everything sent through it went unanswered: that must not be
    ``connected``; the handshake is started afresh, and the next session that answers is."""
    run = Run()
    run.start()
    run.feed(ev.StatsRead(run.now, 0, 0, None))  # the reading at entry: a new peer
    actions = run.feed(ev.StatsRead(run.at(0.25), 92, 228, 0.01))  # a handshake response, no more
    assert isinstance(run.state, Connecting), "a handshake response alone is not traffic answered"
    assert act.Probe() in actions and act.RestartHandshake("a") not in actions
    actions = run.feed(ev.StatsRead(run.at(0.25), 92, 308, 0.26))  # the probe went, nothing back
    assert isinstance(run.state, Connecting) and act.RestartHandshake("a") not in actions
    actions = run.feed(ev.StatsRead(run.at(0.25), 92, 388, 0.51))
    assert isinstance(run.state, Connecting)
    assert act.RestartHandshake("a") in actions, "the session answered nothing for 0.5 s: start afresh"
    run.feed(ev.StatsRead(run.at(0.25), 92, 148, 0.02))  # the new peer's counters, its handshake done
    assert isinstance(run.state, Connecting)
    run.feed(ev.StatsRead(run.at(0.25), 156, 228, 0.27))  # the probe answered through it
    assert isinstance(run.state, Connected) and run.state.server == "a"
    assert run.machine.context.last_failure is None, "the server was never blamed"


def test_a_server_with_nothing_to_probe_connects_on_the_handshake_alone() -> None:
    """No tunnel DNS and no probe_target: no answer can be asked for, so waiting for one would
    fail a working server at the connect timeout."""
    run = Run(MachineSettings(servers=SERVERS, unprobed=frozenset({"a"})))
    run.start()
    run.feed(ev.StatsRead(run.now, 0, 0, None))
    run.feed(ev.StatsRead(run.at(0.25), 92, 148, 0.01))  # the handshake response, nothing more
    assert isinstance(run.state, Connected) and run.state.server == "a"


def test_a_probed_server_is_not_connected_by_the_handshake_alone() -> None:
    run = Run(MachineSettings(servers=SERVERS, unprobed=frozenset({"b"})))
    run.start()
    run.feed(ev.StatsRead(run.now, 0, 0, None))
    run.feed(ev.StatsRead(run.at(0.25), 92, 148, 0.01))
    assert isinstance(run.state, Connecting)


def test_received_bytes_connect_even_without_a_handshake_reading() -> None:
    run = Run()
    run.start()
    run.feed(ev.StatsRead(run.at(0.25), 0, 0, None))
    run.feed(ev.StatsRead(run.at(0.25), 92, 148, None))
    assert isinstance(run.state, Connected)


def test_connect_timeouts_grow_per_consecutive_failure_and_reset_after_success() -> None:
    run = Run(MachineSettings(servers=SERVERS, connect_timeouts_s=(4.0, 8.0, 15.0)))
    run.start()
    limits = []
    for _ in range(3):
        actions = run.feed(ev.TimerFired(run.at(4), "connect"))
        limits += [a.delay_s for a in actions if isinstance(a, act.StartTimer) and a.timer == "connect"]
    assert limits[:2] == [8.0, 15.0]
    run2 = Run()
    run2.start()
    run2.feed(ev.TimerFired(4.0, "connect"))  # a failed: b with 8 s
    run2.connect()
    actions = run2.feed(ev.RotateRequested(run2.at(1)))
    assert act.StartTimer("connect", 4.0) in actions, "a success resets the ladder"


def test_a_peer_that_will_not_configure_counts_as_a_failed_server() -> None:
    run = Run()
    run.start()
    actions = run.feed(ev.ConnectFailed(0.1, "a", "no such device"))
    assert configured(actions) == ["b"]
    assert run.last_failure().reason == "no such device"
    assert run.feed(ev.ConnectFailed(0.2, "zz", "stale")) == [], "a failure for another server is stale"


def test_an_unanswered_handshake_is_started_afresh_until_the_connect_limit() -> None:
    """WireGuard retries only after 5 s, more than the 4 s window: the machine restarts the
    handshake every 0.5 s (8 initiations in the window) so that one lost packet fails nothing."""
    run = Run()
    run.start()
    restarts = []
    for _ in range(15):  # samples every 0.25 s up to 3.75 s, none answered
        actions = run.feed(ev.StatsRead(run.at(0.25), 0, 148, None))
        assert act.Probe() in actions and act.StartTimer("sample", 0.25) in actions
        restarts += [run.now for a in actions if a == act.RestartHandshake("a")]
    assert restarts == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5], "eight initiations before the 4 s limit"
    assert isinstance(run.state, Connecting) and run.state.server == "a"
    actions = run.feed(ev.StatsRead(run.at(0.1), 92, 148, 0.05))  # the handshake completed
    assert isinstance(run.state, Connecting) and act.RestartHandshake("a") not in actions
    actions = run.feed(ev.StatsRead(run.at(0.25), 156, 228, 0.3))  # and the probe answered
    assert isinstance(run.state, Connected) and act.RestartHandshake("a") not in actions


def test_a_sample_that_sees_the_answer_connects_instead_of_restarting_the_handshake() -> None:
    """An intact peer (a path back, an adopted tunnel) answers the probe: the sample that sees it
    connects, though the handshake clock ran out at the same moment."""
    run = Run()
    run.start()
    run.feed(ev.StatsRead(run.at(0.25), 500, 500, 30.0))  # the baseline: an old session's counters
    actions = run.feed(ev.StatsRead(run.at(0.25), 592, 548, 30.0))
    assert isinstance(run.state, Connected) and act.RestartHandshake("a") not in actions


def test_an_intact_peer_that_answers_connects_at_the_first_sample_after_the_probe() -> None:
    """Connecting reads the counters before its probe goes out, so the sample 0.25 s later sees
    the answer (rather than taking it as its baseline and connecting only a sample later)."""
    run = Run().started_connected()
    run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    actions = run.feed(ev.PathsChanged(run.at(2), ALL))
    assert kinds(actions).index(act.ReadStats) < kinds(actions).index(act.Probe)
    run.feed(ev.StatsRead(run.now, 500, 500, 30.0))  # the reading, taken before the probe
    run.feed(ev.StatsRead(run.at(0.25), 592, 548, 30.0))
    assert isinstance(run.state, Connected)


def test_the_handshake_pace_slows_with_each_consecutive_failed_attempt() -> None:
    """A restart drops the answer still on its way, so a slow path gets longer per initiation."""
    run = Run()
    run.start()
    paces = []
    for _ in range(2):
        run.feed(ev.TimerFired(run.at(4), "connect"))  # failed: the next server, one attempt on
        began = run.now
        restarts = []
        for _ in range(12):
            actions = run.feed(ev.StatsRead(run.at(0.25), 0, 148, None))
            restarts += [run.now - began for a in actions if isinstance(a, act.RestartHandshake)]
        paces.append(restarts[0])
    assert paces == [1.0, 2.0]


def test_reconnect_asks_for_a_new_handshake_and_a_path_back_does_not() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.ReconnectRequested(run.at(1)))
    assert configured(actions) == ["a"] and act.RestartHandshake("a") in actions
    run.connect(rx=300)
    run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    actions = run.feed(ev.PathsChanged(run.at(0.1), ALL))
    assert isinstance(run.state, Connecting) and not any(isinstance(a, act.RestartHandshake) for a in actions)


# --- connected: detection ---------------------------------------------------------------------


def test_rx_growth_keeps_the_normal_pace_and_idle_slows_down() -> None:
    run = Run().started_connected()
    assert run.feed(ev.StatsRead(run.at(0.5), 200, 200, 0.5)) == [
        act.StartTimer("sample", SETTINGS.interval_s)
    ]
    assert run.feed(ev.StatsRead(run.at(0.5), 200, 200, 1.0)) == [
        act.WatchTraffic(),
        act.StartTimer("sample", 2.0),
    ]


def test_traffic_after_an_idle_spell_is_sampled_at_once_not_at_the_idle_pace() -> None:
    """Issue #27 item 1: the first packet after an idle spell wakes the daemon, whose next
    sample then comes at the doubt pace; the sample that sees the traffic ends the watch."""
    run = Run().started_connected()
    run.feed(ev.StatsRead(run.at(0.5), 200, 200, 0.5))
    assert act.WatchTraffic() in run.feed(ev.StatsRead(run.at(0.25), 200, 200, 1.0))  # idle
    assert run.feed(ev.TrafficSeen(run.at(0.7))) == [
        act.StartTimer("sample", SETTINGS.doubt_probe_interval_s)
    ]
    actions = run.feed(ev.StatsRead(run.at(0.03), 200, 300, 1.5))  # sent, not answered: doubt
    assert actions[:2] == [act.StopWatchingTraffic(), act.Probe()]
    # A wake that arrives once the spell is over changes nothing.
    assert run.feed(ev.TrafficSeen(run.at(0.01))) == []


def test_with_the_watch_in_place_an_idle_tunnel_sleeps_until_its_idle_probe() -> None:
    """Issue #27: an idle daemon samples nothing between its idle probes once the watch listens
    (any packet wakes it sooner); without the watch it samples at the idle pace as before."""
    run = Run().started_connected()
    run.feed(ev.StatsRead(run.at(0.5), 200, 200, 0.5))
    idle_from = run.now
    assert run.feed(ev.StatsRead(run.at(0.25), 200, 200, 1.0)) == [
        act.WatchTraffic(),
        act.StartTimer("sample", SETTINGS.idle_interval_s),
    ]
    armed_at = run.at(0.01)
    assert run.feed(ev.TrafficWatchArmed(armed_at)) == [
        act.StartTimer("sample", round(idle_from + SETTINGS.idle_probe_s - armed_at, 6))
    ]
    assert run.feed(ev.TrafficWatchArmed(run.at(0.01))) == [], "told twice: nothing new"
    # The sample at the idle probe's time probes, and the watch goes before the probe trips it.
    run.now = idle_from + SETTINGS.idle_probe_s
    actions = run.feed(ev.StatsRead(run.now, 200, 200, 11.0))
    assert actions[:2] == [act.StopWatchingTraffic(), act.Probe()]
    assert isinstance(run.state, Connected) and run.state.watch == "off"
    # A watch that reports in once the spell is over changes nothing.
    assert run.feed(ev.TrafficWatchArmed(run.at(0.01))) == []


def asleep_until_the_idle_probe(run: Run) -> float:
    """Connected, idle, the watch in place; the time at which the idle probe is due."""
    run.feed(ev.StatsRead(run.at(0.5), 200, 200, 0.5))
    idle_from = run.now
    run.feed(ev.StatsRead(run.at(0.25), 200, 200, 1.0))
    run.feed(ev.TrafficWatchArmed(run.at(0.01)))
    return idle_from + SETTINGS.idle_probe_s


ASLEEP_AGAIN = [act.WatchTraffic(), act.StartTimer("sample", SETTINGS.idle_interval_s)]


def test_an_answered_idle_probe_goes_back_to_sleep_without_a_sample_in_between() -> None:
    """Issue #27: two samples per idle probe, not three. The probe's answer (rx and tx grown by
    the same bytes, nothing else) is the idle spell going on: the watch goes back in at once."""
    run = Run().started_connected()
    run.now = asleep_until_the_idle_probe(run)
    assert run.feed(ev.StatsRead(run.now, 200, 200, 11.0)) == [
        act.StopWatchingTraffic(),
        act.Probe(),
        act.StartTimer("sample", SETTINGS.interval_s),
    ]
    answered_at = run.at(SETTINGS.interval_s)
    assert run.feed(ev.StatsRead(answered_at, 280, 280, 0.2)) == ASLEEP_AGAIN
    assert isinstance(run.state, Connected) and run.state.watch == "asked"
    # Asleep until the next idle probe, counted from this answer.
    armed_at = run.at(0.01)
    assert run.feed(ev.TrafficWatchArmed(armed_at)) == [
        act.StartTimer("sample", round(answered_at + SETTINGS.idle_probe_s - armed_at, 6))
    ]


def test_the_keepalive_an_idle_probe_brings_is_probed_once_and_slept_on() -> None:
    """WireGuard answers the idle probe's answer with a keepalive 10 s later (32 bytes out,
    nothing in): the doubt it begins is the idle spell's probe, and its answer sends the daemon
    back to sleep."""
    run = Run().started_connected()
    run.now = asleep_until_the_idle_probe(run)
    actions = run.feed(ev.StatsRead(run.now, 200, 232, 11.0))
    assert actions[:2] == [act.StopWatchingTraffic(), act.Probe()]
    assert run.feed(ev.StatsRead(run.at(DOUBT), 280, 312, 0.02)) == ASLEEP_AGAIN


@pytest.mark.parametrize(
    ("first_out", "answered"),
    [
        (300, (280, 380)),  # traffic woke it: its packet answered, and the probe
        (200, (280, 330)),  # the idle probe answered, but something else went out too
        (232, (260, 312)),  # the keepalive's probe answered by fewer bytes than it sent
    ],
)
def test_an_idle_spell_ends_when_more_than_its_own_probe_moved(
    first_out: int, answered: tuple[int, int]
) -> None:
    """Anything but the idle spell's own probe and its answer is traffic: the calm pace, awake."""
    run = Run().started_connected()
    run.now = asleep_until_the_idle_probe(run)
    if first_out == 300:
        run.now -= 5.0
        run.feed(ev.TrafficSeen(run.now))
        run.now += DOUBT
    run.feed(ev.StatsRead(run.now, 200, first_out, 11.0))
    rx, tx = answered
    actions = run.feed(ev.StatsRead(run.at(SETTINGS.interval_s), rx, tx, 0.02))
    assert act.WatchTraffic() not in actions and actions[-1] == act.StartTimer("sample", SETTINGS.interval_s)
    assert isinstance(run.state, Connected) and run.state.watch == "off"


def test_asleep_a_gap_of_the_idle_probe_pace_is_no_suspension_but_awake_it_is() -> None:
    """Events 12 s apart are the normal pace of a sleeping idle tunnel; with samples every 2 s
    such a gap still means the daemon did not run (``MachineSettings.resume_gap``)."""
    for asleep in (True, False):
        run = Run().started_connected()
        run.feed(ev.StatsRead(run.at(0.5), 200, 200, 0.5))
        run.feed(ev.StatsRead(run.at(0.25), 200, 200, 1.0))  # idle
        if asleep:
            run.feed(ev.TrafficWatchArmed(run.at(0.01)))
        late = run.feed(ev.TimerFired(run.at(12.0), "sample"))
        resumed = any(isinstance(a, act.PublishStatus) and "did not run" in (a.reason or "") for a in late)
        assert resumed is not asleep, late


def test_an_unreadable_tunnel_is_judged_as_the_last_counters_without_a_handshake() -> None:
    run = Run().started_connected()
    # Nothing sent since the last reading: the same verdict a reading of those counters gets.
    assert run.feed(ev.StatsUnreadable(run.at(0.5), "uapi socket gone")) == [
        act.WatchTraffic(),
        act.StartTimer("sample", 2.0),
    ]
    assert isinstance(run.state, Connected)
    # Something went unanswered before the tunnel stopped answering reads: probing goes on, and
    # silence that lasts fails the server over, as it would with readings.
    run.feed(ev.StatsRead(run.at(0.25), 100, 300, None))
    for _ in range(40):
        run.feed(ev.StatsUnreadable(run.at(0.25), "uapi socket gone"))
        if not isinstance(run.state, Connected):
            break
    assert isinstance(run.state, Connecting) and run.state.server != "a"
    assert run.machine.context.last_failure is not None
    assert run.last_failure().reason.startswith("silent")


def test_an_unreadable_tunnel_before_any_reading_is_probed_and_read_again() -> None:
    run = Run()
    run.start()
    assert run.feed(ev.StatsUnreadable(run.at(0.25), "timed out")) == [
        act.Probe(),
        act.StartTimer("sample", SETTINGS.probe_interval_s),
    ]
    assert isinstance(run.state, Connecting)


def test_an_idle_tunnel_is_probed_every_idle_probe_s() -> None:
    run = Run().started_connected()
    probes = 0
    for _ in range(12):  # 24 s idle
        actions = run.feed(ev.StatsRead(run.at(2.0), 100, 100, 1.0))
        probes += actions.count(act.Probe())
    assert probes == 2
    assert isinstance(run.state, Connected), "idle is not silence: nothing was owed"


DOUBT = SETTINGS.doubt_probe_interval_s


def test_default_count_and_window_are_derived_from_the_loss_to_ride_out() -> None:
    # 30 % loss each way loses 51 % of round trips; 31 in a row at most once in 1e9 doubts.
    assert round_trip_loss(0.30) == pytest.approx(0.51)
    assert probes_needed(0.30, 1e-9) == SETTINGS.min_unanswered_probes == 31
    assert chance_all_lost(31, 0.30) <= 1e-9 < chance_all_lost(30, 0.30)
    assert chance_all_lost(31, 0.20) < 1e-13
    # The window is at least the time the count takes at the default pace (a burst of total loss
    # shorter than it never decides), and the pace is "tens a second".
    assert SETTINGS.dead_after_s >= (SETTINGS.min_unanswered_probes - 1) * DOUBT - 1e-9
    assert 10 <= 1 / DOUBT <= 50


def test_doubt_escalates_to_fast_probes_and_a_silent_server_is_dead_on_count_and_window() -> None:
    run = Run().started_connected()
    actions = run.silence(0.5, step=0.5)  # the calm pace finds tx grown, rx not: doubt
    assert actions == [act.Probe(), act.StartTimer("sample", DOUBT)]
    began = run.now
    actions = run.silence(5, step=DOUBT)
    assert isinstance(run.state, Connecting) and run.state.server == "b"
    # The 31st probe went out 0.9 s into the doubt, its answer overdue 0.25 s later: the sample
    # at 1.17 s decides (the 1 s window is met by then).
    assert run.now - began == pytest.approx(39 * DOUBT)
    failure = run.last_failure()
    assert failure.server == "a" and "silent: 31 probes unanswered over 1.2 s" in failure.reason
    assert actions.count(act.Probe()) == 38 + 1  # 38 more in doubt, then the new server's first
    assert act.SetLockServers(("b",)) in actions and configured(actions) == ["b"]


def test_any_rx_clears_the_doubt_at_once_and_the_pace_falls_back() -> None:
    run = Run().started_connected()
    run.silence(1.0, step=DOUBT)
    assert run.state.liveness.in_doubt
    rx = run.state.liveness.rx_bytes + 92
    actions = run.feed(ev.StatsRead(run.at(DOUBT), rx, run.state.liveness.tx_bytes + 100, 1.0))
    assert actions == [act.StartTimer("sample", SETTINGS.interval_s)], "no probe once answered"
    assert not run.state.liveness.in_doubt and run.state.liveness.unanswered == 0


def test_one_answered_probe_in_thirty_keeps_a_lossy_server() -> None:
    run = Run().started_connected()
    for _ in range(40):  # every 30th probe comes back, for 48 s
        run.silence(29 * DOUBT, step=DOUBT)
        rx = run.state.liveness.rx_bytes + 92
        run.feed(ev.StatsRead(run.at(DOUBT), rx, run.state.liveness.tx_bytes + 100, 1.0))
    assert isinstance(run.state, Connected) and run.state.server == "a"
    assert run.machine.context.last_failure is None


def test_a_short_burst_never_decides_however_many_probes_it_swallowed() -> None:
    fast = replace(SETTINGS, doubt_probe_interval_s=0.01)  # 31 probes in 0.3 s
    run = Run(fast).started_connected()
    run.silence(0.95, step=0.01)
    assert isinstance(run.state, Connected), "the count is met, the window is not"
    assert run.state.liveness.overdue(run.now, fast) > 2 * fast.min_unanswered_probes
    run.silence(0.1, step=0.01)
    assert isinstance(run.state, Connecting) and run.state.server == "b"


def test_probes_still_in_flight_are_not_counted() -> None:
    slow_path = replace(SETTINGS, probe_reply_s=1.0)  # a satellite link: answers take a second
    run = Run(slow_path).started_connected()
    run.silence(1.85, step=DOUBT)  # 31 probes by 0.9 s and the window met: the answers are not due
    assert isinstance(run.state, Connected)
    run.silence(0.2, step=DOUBT)
    assert isinstance(run.state, Connecting) and run.state.server == "b"


def test_the_probes_of_a_slow_connect_do_not_count_once_the_handshake_answered() -> None:
    run = Run()
    run.start()
    for _ in range(40):  # 10 s of connecting: probes out, nothing back
        run.feed(ev.StatsRead(run.at(0.25), 0, 100 * (_ + 1), None))
    assert isinstance(run.state, Connecting)
    run.feed(ev.StatsRead(run.at(0.25), 92, 4200, 0.1))  # a handshake just completed
    run.feed(ev.StatsRead(run.at(0.25), 156, 4280, 0.35))  # and the probe through it answered
    assert isinstance(run.state, Connected) and not run.state.liveness.in_doubt
    run.silence(0.5, step=DOUBT)
    assert isinstance(run.state, Connected) and run.state.server == "a", "a fresh doubt, not a verdict"


def test_silence_after_an_idle_spell_counts_from_the_first_doubt_not_the_last_answer() -> None:
    run = Run().started_connected()
    run.feed(ev.StatsRead(run.at(0.5), 100, 100, 1.0))  # idle: the next sample comes 2 s later
    for _ in range(15):  # long idle, sampled every 2 s: nothing owed
        run.feed(ev.StatsRead(run.at(2.0), 100, 100, 1.0))
    run.feed(ev.StatsRead(run.at(2.0), 100, 200, 1.0))  # tx grew: doubt, its first probe
    began = run.now
    run.silence(1.1, step=DOUBT)
    assert isinstance(run.state, Connected), "the idle time is not silence"
    run.silence(0.2, step=DOUBT)
    assert isinstance(run.state, Connecting) and run.now - began == pytest.approx(39 * DOUBT)


def test_an_expired_handshake_is_dead_even_with_rx() -> None:
    run = Run().started_connected()
    run.feed(ev.StatsRead(run.at(0.5), 500, 500, 181.0))
    assert isinstance(run.state, Connecting) and run.state.server == "b"
    assert "no handshake for 181 s" in run.last_failure().reason


def test_counters_going_down_are_a_new_baseline_not_death() -> None:
    run = Run().started_connected()
    run.feed(ev.StatsRead(run.at(0.5), 5000, 5000, 1.0))
    run.feed(ev.StatsRead(run.at(0.5), 10, 10, 1.0))  # the backend restarted: counters reset
    assert isinstance(run.state, Connected)
    assert run.state.liveness.rx_bytes == 10 and run.state.liveness.unanswered == 0


# --- rotation and backoff ---------------------------------------------------------------------


def test_sequential_rotation_goes_round_and_skips_cooling_servers() -> None:
    run = Run(MachineSettings(servers=SERVERS, cooldown_s=60))
    run.start()
    order = [run.state.server]
    for _ in range(2):
        run.feed(ev.TimerFired(run.at(1), "connect"))
        order.append(run.state.server)
    assert order == ["a", "b", "c"]
    actions = run.feed(ev.TimerFired(run.at(1), "connect"))  # c fails; a and b still cooling
    assert isinstance(run.state, Blocked) and run.state.retry_at is not None
    assert act.RemovePeer() in actions
    backoff = next(a for a in actions if isinstance(a, act.StartTimer))
    assert backoff.timer == "backoff" and 1.0 <= backoff.delay_s <= 2.0
    actions = run.feed(ev.TimerFired(run.at(backoff.delay_s), "backoff"))
    assert configured(actions) == ["a"], "after the backoff, cooldowns are ignored"


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    settings = MachineSettings(
        servers=("a",), backoff_initial_s=2, backoff_max_s=60, connect_timeouts_s=(1.0,)
    )
    run = Run(settings)
    run.start()
    delays = []
    for _ in range(8):
        actions = run.feed(ev.TimerFired(run.at(1), "connect"))
        delay = next(a.delay_s for a in actions if isinstance(a, act.StartTimer) and a.timer == "backoff")
        delays.append(delay)
        rounds = run.machine.context.rounds
        assert nominal_backoff(settings, rounds) / 2 <= delay <= nominal_backoff(settings, rounds)
        run.feed(ev.TimerFired(run.at(delay), "backoff"))
    assert [nominal_backoff(settings, r) for r in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]
    assert max(delays) <= 60


def test_random_rotation_is_repeatable_from_the_seed() -> None:
    def choices(seed: int) -> list[str]:
        run = Run(MachineSettings(servers=tuple("abcdefgh"), strategy="random", cooldown_s=0.5))
        run.feed(ev.Start(0.0, seed=seed))
        seen = [run.state.server]
        for _ in range(10):
            run.feed(ev.TimerFired(run.at(1), "connect"))
            seen.append(run.state.server)
        return seen

    assert choices(1) == choices(1)
    assert choices(1) != choices(2)
    assert all(b != a for a, b in zip(choices(3), choices(3)[1:], strict=False)), "never the failed one"


def test_rotate_goes_to_another_server_and_reconnect_to_the_same() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.RotateRequested(run.at(1)))
    assert configured(actions) == ["b"] and act.SetLockServers(("b",)) in actions
    run.connect(rx=300)
    actions = run.feed(ev.ReconnectRequested(run.at(1)))
    assert configured(actions) == ["b"] and act.RestartHandshake("b") in actions
    assert run.machine.context.last_failure is None, "a request is not a failure"


def test_rotate_with_one_server_sets_it_up_afresh() -> None:
    run = Run(MachineSettings(servers=("a",)))
    run.start()
    run.connect()
    assert configured(run.feed(ev.RotateRequested(run.at(1)))) == ["a"]


def test_requests_while_blocked_try_at_once_and_while_offline_are_ignored() -> None:
    run = Run(MachineSettings(servers=("a",), connect_timeouts_s=(1.0,)))
    run.start()
    run.feed(ev.TimerFired(run.at(1), "connect"))
    assert isinstance(run.state, Blocked)
    assert configured(run.feed(ev.RotateRequested(run.at(0.1)))) == ["a"]
    run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    assert isinstance(run.state, Offline)
    assert run.feed(ev.RotateRequested(run.at(0.1))) == []
    assert run.feed(ev.ReconnectRequested(run.at(0.1))) == []
    assert Run().feed(ev.RotateRequested(0.0)) == [], "not started: nothing to rotate"


# --- offline ----------------------------------------------------------------------------------


def test_no_path_goes_offline_at_once_and_stops_every_clock() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    assert isinstance(run.state, Offline) and run.state.resume == "a" and run.state.intact
    assert set(actions[: len(ev.TIMERS)]) == {act.CancelTimer(t) for t in ev.TIMERS}
    assert run.feed(ev.TimerFired(run.at(5), "connect")) == []
    assert run.feed(ev.StatsRead(run.at(5), 0, 0, None)) == []


def test_back_online_checks_the_intact_peer_without_setting_it_up_again() -> None:
    run = Run().started_connected()
    run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    actions = run.feed(ev.PathsChanged(run.at(5), ALL))
    assert isinstance(run.state, Connecting) and run.state.server == "a"
    assert configured(actions) == [] and act.Probe() in actions


def test_a_tunnel_lost_while_offline_is_set_up_again_when_back() -> None:
    run = Run().started_connected()
    run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    run.feed(ev.TunnelLost(run.at(1)))
    actions = run.feed(ev.PathsChanged(run.at(5), ALL))
    assert configured(actions) == ["a"]


def test_losing_the_route_to_the_current_server_only_moves_without_blame() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.PathsChanged(run.at(0.1), frozenset({"b", "c"})))
    assert configured(actions) == ["b"]
    assert "a" not in run.machine.context.cooling


def test_offline_while_blocked_cancels_the_backoff() -> None:
    run = Run(MachineSettings(servers=("a",), connect_timeouts_s=(1.0,)))
    run.start()
    run.feed(ev.TimerFired(run.at(1), "connect"))
    actions = run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    assert isinstance(run.state, Offline) and act.CancelTimer("backoff") in actions
    assert run.feed(ev.PathsChanged(run.at(0.1), frozenset())) == [], "still offline: nothing"


def test_paths_before_start_are_remembered_only() -> None:
    run = Run()
    assert run.feed(ev.PathsChanged(0.0, frozenset())) == []
    assert isinstance(run.state, Blocked)


# --- tunnel and backend loss ------------------------------------------------------------------


def test_a_deleted_tunnel_is_set_up_again_on_the_same_server() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.TunnelLost(run.at(1)))
    assert configured(actions) == ["a"] and isinstance(run.state, Connecting)
    assert run.last_failure().reason == "the tunnel interface was deleted"


def test_a_dead_backend_is_waited_for_not_reconfigured() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.BackendDown(run.at(1), "exit status 2"))
    assert configured(actions) == [] and isinstance(run.state, Connecting)
    assert act.StartTimer("connect", 4.0) in actions
    assert run.feed(ev.BackendUp(run.at(0.1))) == [act.Probe()]
    run.connect(rx=50)


def test_losses_while_blocked_are_only_recorded() -> None:
    run = Run(MachineSettings(servers=("a",), connect_timeouts_s=(1.0,)))
    run.start()
    run.feed(ev.TimerFired(run.at(1), "connect"))
    assert run.feed(ev.TunnelLost(run.at(1))) == []
    assert run.feed(ev.BackendDown(run.at(1), "gone")) == []
    assert "backend died" in run.last_failure().reason


# --- the lock ---------------------------------------------------------------------------------


def test_tampering_is_recorded_and_published_with_no_lock_action() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.LockTampered(run.at(1), "the lock table was deleted"))
    assert kinds(actions) == [act.PublishStatus]
    status = actions[0]
    assert isinstance(status, act.PublishStatus) and "restored" in (status.reason or "")


@pytest.mark.parametrize(("mode", "removes"), [("permanent", False), ("session", True)])
def test_stop_closes_the_tunnel_and_removes_the_lock_only_in_session_mode(mode: str, removes: bool) -> None:
    run = Run(MachineSettings(servers=SERVERS, lock_mode=mode))  # type: ignore[arg-type]
    run.start()
    run.connect()
    actions = run.feed(ev.Stop(run.at(1)))
    assert isinstance(run.state, Stopped)
    assert act.CloseTunnel() in actions and actions[-1] == act.Exit()
    assert (act.RemoveLock() in actions) is removes


def test_stopped_ignores_everything() -> None:
    run = Run().started_connected()
    run.feed(ev.Stop(run.at(1)))
    for event in (
        ev.Start(9, 1),
        ev.Stop(9),
        ev.PathsChanged(9, ALL),
        ev.StatsRead(9, 1, 1, 1),
        ev.TimerFired(9, "sample"),
        ev.RotateRequested(9),
        ev.ConfigReloaded(9, SETTINGS),
    ):
        assert run.feed(event) == []


# --- reload -----------------------------------------------------------------------------------


def test_a_reload_keeping_the_server_keeps_the_tunnel() -> None:
    run = Run().started_connected()
    assert run.feed(ev.ConfigReloaded(run.at(1), MachineSettings(servers=("c", "a")))) == []
    assert run.machine.context.settings.servers == ("c", "a")


def test_a_reload_dropping_the_server_moves_to_one_still_listed() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.ConfigReloaded(run.at(1), MachineSettings(servers=("c",))))
    assert configured(actions) == ["c"] and act.SetLockServers(("c",)) in actions


def test_a_reload_with_no_servers_blocks_and_removes_the_peer() -> None:
    run = Run().started_connected()
    actions = run.feed(ev.ConfigReloaded(run.at(1), MachineSettings(servers=())))
    assert isinstance(run.state, Blocked) and act.RemovePeer() in actions
    assert not any(isinstance(a, (act.ConfigurePeer, act.RemoveLock)) for a in actions)


def test_a_reload_while_offline_forgets_a_removed_resume_server() -> None:
    run = Run().started_connected()
    run.feed(ev.PathsChanged(run.at(0.1), frozenset()))
    run.feed(ev.ConfigReloaded(run.at(1), MachineSettings(servers=("b",))))
    assert isinstance(run.state, Offline) and run.state.resume is None
    actions = run.feed(ev.PathsChanged(run.at(1), frozenset({"b"})))
    assert configured(actions) == ["b"]


# A reload that drops the current server (issue #11, item 2): the monitor's report for the new
# server list can reach the machine before the new settings do, naming servers it does not know
# yet. Neither order may leave it offline with a configured server reachable.


def test_paths_for_the_new_servers_ahead_of_the_reload_do_not_strand_the_machine() -> None:
    run = Run(MachineSettings(servers=("b", "c")))
    run.start(reachable=frozenset({"b", "c"}))
    run.connect()
    run.feed(ev.PathsChanged(run.at(0.1), frozenset({"a"})))  # the new list's paths, old settings
    actions = run.feed(ev.ConfigReloaded(run.at(0.1), MachineSettings(servers=("a",))))
    assert isinstance(run.state, Connecting) and run.state.server == "a", run.state
    assert act.SetLockServers(("a",)) in actions and configured(actions) == ["a"]


def test_a_reload_with_the_paths_of_its_servers_moves_at_once_without_going_offline() -> None:
    run = Run(MachineSettings(servers=("b", "c")))
    run.start(reachable=frozenset({"b", "c"}))
    run.connect()
    actions = run.feed(
        ev.ConfigReloaded(run.at(0.1), MachineSettings(servers=("a",)), reachable=frozenset({"a"}))
    )
    assert isinstance(run.state, Connecting) and run.state.server == "a", run.state
    assert configured(actions) == ["a"]
    assert all(a.state != "offline" for a in actions if isinstance(a, act.PublishStatus))


def test_a_reload_whose_paths_leave_no_server_reachable_goes_offline() -> None:
    run = Run().started_connected()
    actions = run.feed(
        ev.ConfigReloaded(run.at(1), MachineSettings(servers=("d",)), reachable=frozenset({"a"}))
    )
    assert isinstance(run.state, Offline) and run.state.resume is None
    assert not configured(actions)
    actions = run.feed(ev.PathsChanged(run.at(1), frozenset({"d"})))
    assert configured(actions) == ["d"]


def test_a_reload_while_offline_connects_when_a_new_server_is_reachable() -> None:
    run = Run().started_connected()
    run.feed(ev.PathsChanged(run.at(0.1), frozenset({"d"})))  # none of a, b, c: offline
    assert isinstance(run.state, Offline)
    actions = run.feed(ev.ConfigReloaded(run.at(1), MachineSettings(servers=("d",))))
    assert configured(actions) == ["d"] and isinstance(run.state, Connecting)


def test_a_reload_adding_servers_to_an_empty_list_connects() -> None:
    run = Run(MachineSettings(servers=()))
    actions = run.feed(ev.Start(0.0, seed=7))
    assert isinstance(run.state, Blocked) and run.state.reason == "no servers configured"
    assert actions[0] == act.ApplyLock(())
    actions = run.feed(ev.ConfigReloaded(run.at(1), MachineSettings(servers=("a",))))
    assert configured(actions) == ["a"] and isinstance(run.state, Connecting)


def test_a_reload_emptying_the_list_while_backing_off_says_so() -> None:
    run = Run(MachineSettings(servers=("a",), connect_timeouts_s=(4.0,)))
    run.start(reachable=frozenset({"a"}))
    run.feed(ev.TimerFired(run.at(4), "connect"))
    assert isinstance(run.state, Blocked) and run.state.retry_at is not None
    actions = run.feed(ev.ConfigReloaded(run.at(1), MachineSettings(servers=())))
    assert isinstance(run.state, Blocked) and run.state.reason == "no servers configured"
    assert act.CancelTimer("backoff") in actions


def test_a_reload_before_start_only_remembers() -> None:
    run = Run()
    assert run.feed(ev.ConfigReloaded(0.0, MachineSettings(servers=("b",)), reachable=frozenset({"b"}))) == []
    assert run.machine.context.reachable == frozenset({"b"})


# --- a daemon that did not run (a suspended VM, SIGSTOP): issue #21, item 9b ----------------


def test_a_suspension_while_connected_is_not_the_servers_fault() -> None:
    """200 s without running, then the late sample: the handshake aged past handshake_max_age_s
    meanwhile, and that failed a healthy server (a needless failover that cooled it down)."""
    run = Run().started_connected()
    run.feed(ev.StatsRead(run.at(0.25), 200, 200, 1.0))
    run.feed(ev.StatsRead(run.at(2.0), 200, 200, 3.0))  # idle
    late = run.feed(ev.TimerFired(run.at(200.0), "sample"))
    assert act.ReadStats() in late
    assert any(isinstance(a, act.PublishStatus) and "did not run for 200 s" in (a.reason or "") for a in late)
    caused = run.feed(ev.StatsRead(run.at(0.01), 200, 200, 203.0))  # the handshake aged unwatched
    assert isinstance(run.state, Connected) and run.state.server == "a"
    assert act.Probe() in caused, "the resumed watch asks the server at once"
    run.feed(ev.StatsRead(run.at(DOUBT), 200, 260, 203.0))  # the probe went out...
    run.feed(ev.StatsRead(run.at(DOUBT), 300, 260, 0.01))  # ...a new handshake, the answer
    assert isinstance(run.state, Connected) and run.state.server == "a"
    assert run.machine.context.last_failure is None and not run.machine.context.cooling


def test_a_read_pending_over_a_suspension_is_judged_as_a_new_baseline() -> None:
    """The counters were read before the stop and reach the machine after it; the next reading
    then finds the handshake aged by the whole stop."""
    run = Run().started_connected()
    run.feed(ev.StatsRead(run.at(0.25), 200, 300, 1.0))  # tx grew: doubt
    run.feed(ev.StatsRead(run.at(200.0), 200, 400, 1.0))  # read before the stop, stamped after it
    run.feed(ev.StatsRead(run.at(DOUBT), 200, 460, 201.0))
    assert isinstance(run.state, Connected) and run.machine.context.last_failure is None


def test_a_dead_server_is_still_found_in_seconds_after_a_suspension() -> None:
    run = Run().started_connected()
    run.feed(ev.TimerFired(run.at(200.0), "sample"))
    run.feed(ev.StatsRead(run.at(0.01), 100, 100, 200.0))
    began, tx = run.now, 100
    while isinstance(run.state, Connected) and run.now - began < 5:
        tx += 60  # the probes go out, nothing comes back, no new handshake
        run.feed(ev.StatsRead(run.at(DOUBT), 100, tx, 200.0 + run.now - began))
    assert isinstance(run.state, Connecting) and run.state.server == "b"
    assert run.now - began < 2.0
    assert "silent" in run.last_failure().reason


def test_a_connect_timeout_that_fired_late_after_a_suspension_starts_the_window_again() -> None:
    run = Run()
    run.start()
    assert isinstance(run.state, Connecting) and run.state.server == "a"
    run.feed(ev.StatsRead(run.at(0.01), 0, 0, None))
    caused = run.feed(ev.TimerFired(run.at(15.0), "connect"))  # due at 4 s; the daemon was stopped
    assert isinstance(run.state, Connecting) and run.state.server == "a"
    assert act.StartTimer("connect", SETTINGS.connect_timeout(0)) in caused
    assert run.machine.context.last_failure is None and not run.machine.context.cooling
    run.connect()
    assert run.state.server == "a"


def test_a_connect_timeout_that_fired_on_time_still_fails_the_server() -> None:
    run = Run()
    run.start()
    for _ in range(16):  # samples every 0.25 s, as the daemon takes them
        run.feed(ev.StatsRead(run.at(0.25), 0, 0, None))
    run.feed(ev.TimerFired(run.now, "connect"))
    assert isinstance(run.state, Connecting) and run.state.server == "b"
    assert run.machine.context.last_failure is not None


def test_a_gap_while_offline_or_blocked_changes_nothing() -> None:
    run = Run()
    run.start(reachable=frozenset())
    assert isinstance(run.state, Offline)
    assert run.feed(ev.PathsChanged(run.at(300.0), frozenset())) == []
    assert isinstance(run.state, Offline)
