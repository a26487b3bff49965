"""The machine and required port forwarding: ``ServerUnfit`` and ``PortGranted`` (issue #26).

A server that forwards no port, when the user requires one, is left like a failed server
(another one, a cooldown, the reason in the status); with none left to try the tunnel stays up
and the status says so; rotation tries servers that granted a port before first.
"""

from __future__ import annotations

from supervisor.machine import actions as act
from supervisor.machine import events as ev
from supervisor.machine.rotation import preferred
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import Blocked, Connected, Connecting, Offline
from tests.unit.test_machine import ALL, Run, configured

SETTINGS = MachineSettings(servers=("a", "b", "c"), cooldown_s=60)


def published(actions: list[act.Action]) -> list[act.PublishStatus]:
    return [a for a in actions if isinstance(a, act.PublishStatus)]


def test_an_unfit_server_is_left_for_the_next_cooled_down_and_the_reason_shown() -> None:
    run = Run(SETTINGS)
    run.start()
    run.connect()
    actions = run.feed(ev.ServerUnfit(run.at(1), "a", "natpmp: the gateway refused (not authorized)"))
    assert isinstance(run.state, Connecting) and run.state.server == "b"
    assert configured(actions) == ["b"] and act.SetLockServers(("b",)) in actions
    assert published(actions)[-1].reason == "a is unfit: natpmp: the gateway refused (not authorized)"
    ctx = run.machine.context
    assert ctx.cooling["a"] == run.now + 60 and "a" in ctx.unfit
    assert ctx.last_failure is not None and ctx.last_failure.server == "a"
    assert ctx.failures == 0, "a server without a port is no reason to wait longer for the next"


def test_an_unfit_report_about_a_server_already_left_or_while_not_connected_is_ignored() -> None:
    run = Run(SETTINGS)
    run.start()
    assert run.feed(ev.ServerUnfit(run.at(0.1), "a", "late")) == [], "connecting: nothing to judge yet"
    run.connect()
    assert run.feed(ev.ServerUnfit(run.at(1), "b", "about another server")) == []
    assert isinstance(run.state, Connected) and run.state.server == "a"
    blocked = Run(SETTINGS)
    assert blocked.feed(ev.ServerUnfit(0.0, "a", "before start")) == []
    assert isinstance(blocked.state, Blocked)
    offline = Run(SETTINGS)
    offline.start(reachable=frozenset())
    assert isinstance(offline.state, Offline) and offline.feed(ev.ServerUnfit(1.0, "a", "x")) == []


def test_when_every_server_is_unfit_the_tunnel_stays_up_and_the_status_says_so() -> None:
    run = Run(SETTINGS)
    run.start()
    for server in ("a", "b", "c"):
        run.connect()
        assert run.state.server == server
        actions = run.feed(ev.ServerUnfit(run.at(1), server, "natpmp: no answer"))
    assert isinstance(run.state, Connected) and run.state.server == "c", "the tunnel still protects"
    assert not configured(actions) and not any(isinstance(a, act.RemovePeer) for a in actions)
    assert published(actions) == [
        act.PublishStatus(
            "connected",
            "c",
            "c is unfit (natpmp: no answer); no server forwards a port: staying connected without it",
        )
    ]


def test_an_unfit_server_with_the_others_only_cooling_down_stays_and_says_why() -> None:
    run = Run(MachineSettings(servers=("a", "b"), cooldown_s=60))
    run.start()
    run.feed(ev.ConnectFailed(run.at(0.1), "a", "refused"))  # a cools down; b now
    run.connect()
    actions = run.feed(ev.ServerUnfit(run.at(1), "b", "natpmp: refused"))
    assert isinstance(run.state, Connected) and run.state.server == "b"
    reason = published(actions)[0].reason or ""
    assert reason.endswith("no other server can be tried now: staying connected without it")


def test_rotation_prefers_servers_that_granted_a_port_before() -> None:
    run = Run(SETTINGS)
    run.start()
    run.feed(ev.PortGranted(run.at(0.1), "c"))
    run.connect()
    assert run.machine.context.granted == {"c"}
    actions = run.feed(ev.RotateRequested(run.at(1)))
    assert configured(actions) == ["c"], "c granted a port before: before b, next in order"
    assert preferred(["a", "b"], frozenset({"c"})) == ["a", "b"], "none granted: the order as it is"


def test_a_server_that_grants_is_no_longer_unfit_and_an_unknown_one_is_ignored() -> None:
    run = Run(SETTINGS)
    run.start()
    run.connect()
    run.feed(ev.ServerUnfit(run.at(1), "a", "silent"))
    run.feed(ev.PortGranted(run.at(0.1), "a"))
    assert "a" not in run.machine.context.unfit and "a" in run.machine.context.granted
    assert run.feed(ev.PortGranted(run.at(0.1), "zz")) == []
    assert "zz" not in run.machine.context.granted


def test_a_reload_forgets_what_it_knew_of_servers_no_longer_configured() -> None:
    run = Run(SETTINGS)
    run.start()
    run.feed(ev.PortGranted(run.at(0.1), "b"))
    run.connect()
    run.feed(ev.ServerUnfit(run.at(1), "a", "silent"))
    run.feed(ev.ConfigReloaded(run.at(0.1), MachineSettings(servers=("c",)), ALL))
    assert run.machine.context.granted == frozenset() and run.machine.context.unfit == frozenset()


def test_staying_is_said_once_and_a_server_back_from_its_cooldown_is_tried_at_the_next_report():
    run = Run(MachineSettings(servers=("a", "b", "c"), cooldown_s=60))
    run.start()
    run.feed(ev.ConnectFailed(run.at(0.1), "a", "refused"))  # a cools down until 60.1
    run.connect()
    run.feed(ev.ServerUnfit(run.at(1), "b", "natpmp: refused"))
    run.connect()
    assert run.state.server == "c"
    first = run.feed(ev.ServerUnfit(run.at(1), "c", "natpmp: refused"))
    assert isinstance(run.state, Connected) and run.state.server == "c" and len(published(first)) == 1
    assert run.feed(ev.ServerUnfit(run.at(2), "c", "natpmp: refused")) == [], "said once"
    # The plugin reports at each retry; once a's cooldown ran out, a (not known unfit) is tried,
    # never b (known to forward no port).
    actions = run.feed(ev.ServerUnfit(run.at(60), "c", "natpmp: refused"))
    assert configured(actions) == ["a"]
