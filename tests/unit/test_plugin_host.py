"""The plugin host with fakes: views in, port requests out, and misbehaving plugins contained.

No lock and no daemon here: the lock is a fake that records what it was asked; the lab tests
(tests/lab/test_port_forwarding.py) prove the same against nftables and a running daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, ip_address, ip_interface
from pathlib import Path

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from supervisor.jsonvalue import JSON
from supervisor.lock.state import LockState
from supervisor.plugins import InboundLock, PluginContext, PluginHost, View
from supervisor.redact import Secret
from supervisor.runtime import Status
from supervisor.servers import Endpoint, IPAddress, IPInterface, Peer, Server
from supervisor.status import StatusReport

pytestmark = pytest.mark.anyio


_NO_KEY = Secret("")
_PEER = Peer("", Endpoint(ip_address("198.51.100.1"), 51820), ())


class FakeServer(Server, frozen=True):
    """A Server with the addresses and DNS the views carry; the rest plain placeholders."""

    name: str = "s1"
    path: Path = Path("/nonexistent/s1.conf")
    private_key: Secret = _NO_KEY
    addresses: tuple[IPInterface, ...] = (ip_interface("10.2.0.2/32"), ip_interface("fd00::2/128"))
    peer: Peer = _PEER
    dns: tuple[IPAddress, ...] = (ip_address("fd00::1"), ip_address("10.2.0.1"))


class FakeLock(InboundLock):
    def __init__(self) -> None:
        self.calls: list[frozenset[tuple[str, int]]] = []

    async def set_tunnel_inbound(self, pairs: frozenset[tuple[str, int]]) -> None:
        self.calls.append(pairs)


class Recorder:
    """Records every view it takes; forwards ``port`` once per connection when given one."""

    def __init__(self, port: int | None = None) -> None:
        self.views: list[View] = []
        self.port = port
        self.starts = 0

    async def run(self, ctx: PluginContext) -> None:
        self.starts += 1
        while True:
            view = await ctx.next()
            assert view is not None
            self.views.append(view)
            if self.port and view.tunnel.connected and view.forwarded is None:
                await ctx.forward_ports([self.port])


def host_with(*plugins, lock=None, **kw) -> PluginHost:
    return PluginHost(
        [(f"p{i}", p) for i, p in enumerate(plugins)],
        lock or FakeLock(),
        interface="tl0",
        server_of=lambda name: FakeServer(),
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        **kw,
    )


def reported(host: PluginHost, name: str) -> Mapping[str, JSON]:
    """What the status would show under ``plugins.<name>`` now."""
    return host.report().plugins.get(name, {})


def as_text(value: JSON) -> str:
    """A report's field that the test reads as text (a JSON value could be any of them)."""
    assert isinstance(value, str), value
    return value


def as_number(value: JSON) -> int | float:
    """A report's field that the test compares as a number."""
    assert isinstance(value, int | float) and not isinstance(value, bool), value
    return value


def as_object(value: JSON) -> Mapping[str, JSON]:
    """A report's field that the test reads as a JSON object."""
    assert isinstance(value, Mapping), value
    return value


def shown(host: PluginHost) -> dict[str, JSON]:
    """``status --json`` built now, with the plugin host's report beside a blank machine status."""
    return StatusReport.build(Status(), LockState(), host.report()).as_json()


def publish(host: PluginHost, state: str, server: str | None = None) -> None:
    status = Status()
    status.state, status.server = state, server
    host.publish(status)


async def settle() -> None:
    """Until the host and every plugin wait again: what was published has been acted on."""
    await wait_all_tasks_blocked()


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (a restart after its backoff); bounded only against a hang."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.005)


async def test_views_carry_addresses_gateway_and_a_session_per_connection():
    recorder = Recorder()
    host = host_with(recorder)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await settle()
        publish(host, "connecting", "vpn1")
        await settle()
        publish(host, "connected", "vpn1")
        await settle()
        publish(host, "connected", "vpn2")  # a failover published straight as connected
        await settle()
        tg.cancel_scope.cancel()
    tunnels = [v.tunnel for v in recorder.views]
    assert [(t.state, t.server, t.session) for t in tunnels] == [
        ("blocked", None, 0),
        ("connecting", "vpn1", 0),
        ("connected", "vpn1", 1),
        ("connected", "vpn2", 2),
    ]
    assert tunnels[-1].gateway == IPv4Address("10.2.0.1")
    assert tunnels[-1].address_v4 == IPv4Address("10.2.0.2")
    assert tunnels[-1].interface == "tl0"


async def test_forwarded_port_reaches_the_lock_then_every_plugin_and_the_status():
    lock = FakeLock()
    provider, consumer = Recorder(port=40000), Recorder()
    host = host_with(provider, consumer, lock=lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await settle()
        assert lock.calls == [frozenset({("tcp", 40000), ("udp", 40000)})]
        assert consumer.views[-1].forwarded is not None
        assert consumer.views[-1].forwarded.ports == (40000,)
        assert shown(host)["forwarded_port"] == 40000
        # A new connection starts without the old port: the lock closes it, the status forgets it.
        publish(host, "connecting", "vpn2")
        await settle()
        assert lock.calls[-1] == frozenset()
        assert shown(host)["forwarded_port"] is None
        tg.cancel_scope.cancel()


class SlowLock:
    """A lock whose every change waits until the test lets it finish: what the host sees while
    the lock's thread is busy (with a rotation's endpoint swap, under load). ``holds`` is what
    the table would accept on the tunnel: a change counts once it finished."""

    def __init__(self) -> None:
        self.calls: list[frozenset] = []
        self.holds: frozenset = frozenset()
        self._pending: list[anyio.Event] = []

    async def set_tunnel_inbound(self, pairs: frozenset) -> None:
        self.calls.append(pairs)
        done = anyio.Event()
        self._pending.append(done)
        await done.wait()
        self.holds = pairs

    def finish(self) -> None:
        """Let the oldest change under way finish."""
        self._pending.pop(0).set()


PORT_40000 = frozenset({("tcp", 40000), ("udp", 40000)})


async def rotate_while_the_lock_takes_vpn1s_port(host: PluginHost, lock: SlowLock) -> None:
    """vpn1 connected and asked for its port; the rotation to vpn2 is published while the lock is
    still taking that port."""
    publish(host, "connected", "vpn1")
    await until(lambda: lock.calls == [PORT_40000])
    publish(host, "connecting", "vpn2")


async def test_ports_the_lock_took_for_a_connection_that_ended_meanwhile_are_not_announced_for_the_next():
    """vpn1's port is on its way into the lock when the rotation to vpn2 is published. Once the
    lock holds it, the host must not announce it for the new connection (which asked for
    nothing yet, and is not even connected): it closes it again, and the view and status say no
    port throughout."""
    lock = SlowLock()
    host = host_with(Recorder(port=40000), lock=lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await rotate_while_the_lock_takes_vpn1s_port(host, lock)
        lock.finish()  # the lock accepts vpn1's port now, for a connection that is gone
        await until(lambda: len(lock.calls) == 2)
        assert lock.calls[-1] == frozenset()
        assert host.view.tunnel.state == "connecting" and host.view.forwarded is None
        assert shown(host)["forwarded_port"] is None
        lock.finish()
        # vpn2 connected: its own request, announced once the lock holds it, for vpn2.
        publish(host, "connected", "vpn2")
        await until(lambda: len(lock.calls) == 3)
        assert host.view.forwarded is None
        lock.finish()
        await until(lambda: host.view.forwarded is not None)
        assert lock.holds == PORT_40000
        forwarded = host.view.forwarded
        assert forwarded is not None and (forwarded.ports, forwarded.server) == ((40000,), "vpn2")
        tg.cancel_scope.cancel()


async def test_the_same_port_asked_again_by_the_next_connection_is_announced_once_the_lock_holds_it():
    """As above, but vpn2 is connected and asks for the same (static) port while the lock still
    takes it for vpn1: nothing more for the lock to do, and the port is announced for vpn2."""
    lock = SlowLock()
    host = host_with(Recorder(port=40000), lock=lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await rotate_while_the_lock_takes_vpn1s_port(host, lock)
        publish(host, "connected", "vpn2")
        await until(lambda: host._requested.get("p0") == PORT_40000)  # vpn2's own request
        assert host.view.forwarded is None
        lock.finish()
        await until(lambda: host.view.forwarded is not None)
        assert lock.calls == [PORT_40000] and lock.holds == PORT_40000
        forwarded = host.view.forwarded
        assert forwarded is not None and (forwarded.ports, forwarded.server) == ((40000,), "vpn2")
        assert host.view.tunnel.session == 2
        tg.cancel_scope.cancel()


async def test_a_request_while_not_connected_is_ignored():
    lock = FakeLock()

    class Early:
        async def run(self, ctx: PluginContext) -> None:
            await ctx.next()
            await ctx.forward_ports([1234])
            await ctx.next()

    host = host_with(Early(), lock=lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await settle()
        tg.cancel_scope.cancel()
    assert lock.calls == []


async def test_a_plugin_that_raises_is_restarted_and_the_others_go_on():
    class Raises:
        starts = 0

        async def run(self, ctx: PluginContext) -> None:
            self.starts += 1
            await ctx.next()
            raise RuntimeError("boom")

    bad, good = Raises(), Recorder()
    host = host_with(bad, good)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        for state in ("connecting", "connected", "offline"):
            publish(host, state, "vpn1")
            await settle()
        await until(lambda: bad.starts >= 3)
        tg.cancel_scope.cancel()
    assert bad.starts >= 3
    assert [v.tunnel.state for v in good.views][-3:] == ["connecting", "connected", "offline"]
    report = reported(host, "p0")
    assert as_number(report["restarts"]) >= 2 and "boom" in as_text(report["last_error"])


async def test_a_hung_plugin_is_cancelled_and_restarted():
    class Hangs:
        starts = 0

        async def run(self, ctx: PluginContext) -> None:
            self.starts += 1
            await ctx.next()
            await anyio.sleep_forever()

    hangs, good = Hangs(), Recorder()
    host = host_with(hangs, good, stall_timeout_s=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        with anyio.fail_after(10):
            while hangs.starts < 2:
                await anyio.sleep(0.01)
        publish(host, "connected", "vpn1")
        await settle()
        tg.cancel_scope.cancel()
    assert "hung" in as_text(reported(host, "p0")["last_error"])
    assert good.views[-1].tunnel.state == "connected"


async def test_a_flood_of_requests_ends_in_the_last_one_and_a_bounded_number_of_lock_changes():
    lock = FakeLock()

    class Floods:
        async def run(self, ctx: PluginContext) -> None:
            await ctx.next()
            for port in range(1000, 6000):
                await ctx.forward_ports([port])
            await ctx.next()

    host = host_with(Floods(), lock=lock)
    publish(host, "connected", "vpn1")
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await settle()
        tg.cancel_scope.cancel()
    assert lock.calls[-1] == frozenset({("tcp", 5999), ("udp", 5999)})
    assert len(lock.calls) < 10
    assert host.view.forwarded is not None and host.view.forwarded.ports == (5999,)


async def test_bad_port_requests_are_refused_to_the_plugin():
    host = host_with()
    ctx = PluginContext(host, "x")
    for bad in ([0], [70000], list(range(1, 40))):
        with pytest.raises(ValueError):
            await ctx.forward_ports(bad)
    with pytest.raises(ValueError):
        await ctx.forward_ports([80], protocols=("sctp",))


async def test_stopping_waits_for_plugins_to_act_and_no_longer():
    done: list[str] = []

    class Unmaps:
        async def run(self, ctx: PluginContext) -> None:
            while True:
                view = await ctx.next()
                if view is not None and view.tunnel.state == "stopping":
                    await anyio.sleep(0.05)
                    done.append("unmapped")

    class Hangs:
        async def run(self, ctx: PluginContext) -> None:
            await ctx.next()
            await ctx.next()
            await anyio.sleep_forever()

    host = host_with(Unmaps(), Hangs())
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await settle()
        with anyio.fail_after(5):
            await host.stopping(timeout=0.5)
        tg.cancel_scope.cancel()
    assert done == ["unmapped"]


async def test_a_plugin_error_without_a_message_names_its_type_and_line():
    """Issue #21, item 9d: a timeout (no message) was shown as ''."""

    class TimesOut:
        async def run(self, ctx: PluginContext) -> None:
            await ctx.next()
            with anyio.fail_after(0):
                await anyio.sleep(1)

    host = host_with(TimesOut())
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await settle()
        tg.cancel_scope.cancel()
    error = reported(host, "p0")["last_error"]
    assert isinstance(error, str)
    expected = "raised TimeoutError: TimeoutError with no message, at test_plugin_host.py:"
    assert error.startswith(expected), error


def test_describe_says_the_message_or_else_the_type_and_where():
    from supervisor.errors import describe

    assert describe(OSError(111, "Connection refused")) == "[Errno 111] Connection refused"
    try:
        raise KeyError("")
    except KeyError as err:
        said = describe(err)
    assert said.startswith("KeyError with no message, at test_plugin_host.py:"), said
    assert describe(ExceptionGroup("x", [TimeoutError()])) == "TimeoutError with no message"
    try:
        raise TimeoutError from ConnectionResetError("reset by peer")
    except TimeoutError as err:
        said = describe(err)
    expected = "TimeoutError with no message (from ConnectionResetError: reset by peer), at"
    assert said.startswith(expected), said


async def test_a_lock_change_that_failed_is_made_again_even_for_the_ports_asked_before_it():
    """A change that fails (a timeout, say) may have been installed all the same: the host must
    not believe the lock holds its last known ports, or a request equal to them is never made."""

    class FailsOnce(FakeLock):
        def __init__(self) -> None:
            super().__init__()
            self.called = anyio.Event()

        async def set_tunnel_inbound(self, pairs: frozenset[tuple[str, int]]) -> None:
            await super().set_tunnel_inbound(pairs)
            self.called.set()
            if len(self.calls) == 2:
                raise TimeoutError

    class AsksThrice:
        async def run(self, ctx: PluginContext) -> None:
            await ctx.next()
            for ports in ([40000], [40001], [40000]):
                lock.called = anyio.Event()
                await ctx.forward_ports(ports)
                await lock.called.wait()  # the host's lock change is made (or fails)
            await ctx.next()

    lock = FailsOnce()
    host = host_with(AsksThrice(), lock=lock)
    publish(host, "connected", "vpn1")
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await settle()
        tg.cancel_scope.cancel()
    forty_thousand = frozenset({("tcp", 40000), ("udp", 40000)})
    assert lock.calls == [forty_thousand, frozenset({("tcp", 40001), ("udp", 40001)}), forty_thousand]
    assert host.view.forwarded is not None and host.view.forwarded.ports == (40000,)
