"""The port-forwarding driver with fake providers, and the static provider on it.

The driver is what every provider shares (when to ask, retries, expiry, the trust judgement, the
lock request, the status), so it is tested here with providers that only record and answer; the
NAT-PMP provider on it is tested in test_natpmp_plugin.py, and against the lab's gateway in
tests/lab/test_port_forwarding.py. Time is trio's virtual clock (``MockClock`` with autojump):
minutes of leases and retries pass in milliseconds, and the tests can say when each call came.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from ipaddress import ip_address

import anyio
import msgspec
import pytest
from trio.testing import MockClock

from plugins.forwarding import static
from plugins.forwarding.driver import RETRY_MAX_S, ForwardingOptions, PortForwarding
from plugins.forwarding.provider import ForwardingError, Lease, NotForwardedHere, PortForwarder
from plugins.sockets import Program, Socket
from supervisor.plugins import PluginHost, PluginOptionError, TunnelView
from tests.unit.test_plugin_host import FakeLock, FakeServer, as_object, as_text, publish, reported

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Provider(PortForwarder):
    """Grants ``lease`` once, then fails every call (or answers as told); records when."""

    name = "fake"

    def __init__(self, lease: Lease, *, renew_fails: bool = True, obtain_error: Exception | None = None):
        self.lease = lease
        self.renew_fails = renew_fails
        self.obtain_error = obtain_error
        self.calls: list[tuple[str, float]] = []

    async def obtain(self, tunnel: TunnelView, suggested_port: int | None) -> Lease:
        self.calls.append(("obtain", anyio.current_time()))
        if self.obtain_error is not None:
            raise self.obtain_error
        if self.renew_fails and len(self.calls) > 1:
            raise ForwardingError("the gateway is silent")
        return self.lease

    async def renew(self, tunnel: TunnelView, lease: Lease) -> Lease:
        self.calls.append(("renew", anyio.current_time()))
        if self.renew_fails:
            raise ForwardingError("the gateway is silent")
        return self.lease

    async def release(self, tunnel: TunnelView, lease: Lease) -> None:
        self.calls.append(("release", anyio.current_time()))


async def nothing_listens(port: int) -> list[tuple[Socket, list[Program]]]:
    return []


def driver(provider: PortForwarder, **options: object) -> PortForwarding:
    plugin = PortForwarding(provider, msgspec.convert(options, ForwardingOptions))
    plugin.read_holders = nothing_listens  # type: ignore[method-assign]
    return plugin


def host_of(plugin: PortForwarding, lock: FakeLock) -> PluginHost:
    return PluginHost([("pf", plugin)], lock, interface="tl0", server_of=lambda n: FakeServer())


async def wait_for(condition: Callable[[], object], timeout: float = 600) -> None:
    with anyio.fail_after(timeout):  # virtual seconds
        while not condition():
            await anyio.sleep(0.01)


async def test_renewals_come_at_half_life_retries_double_to_a_bound_and_an_expired_lease_is_withdrawn():
    provider, lock = Provider(Lease((40001,), 10.0)), FakeLock()
    host = host_of(driver(provider), lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: host.view.forwarded is not None)
        # Still forwarded while the lease lasts, withdrawn once a renewal fails after it ran out.
        await wait_for(lambda: host.view.forwarded is None)
        withdrawn_at = anyio.current_time()
        await wait_for(lambda: len(provider.calls) >= 9)
        tg.cancel_scope.cancel()
    (first, start), *retries = provider.calls
    assert first == "obtain"
    # Renewals while the lease is held, then fresh requests once it expired.
    assert [call for call, _ in retries] == ["renew"] * 3 + ["obtain"] * 5
    times = [at - start for _, at in retries]
    assert times[0] == pytest.approx(5.0)  # half of the 10 s lease
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert gaps == [2.0, 4.0, 8.0, 16.0, RETRY_MAX_S, RETRY_MAX_S, RETRY_MAX_S]
    # The first failure after the lease's end (5 + 2 + 4 = 11 s) withdraws the port.
    assert withdrawn_at - start == pytest.approx(11.0, abs=0.05)
    assert lock.calls[-1] == frozenset()


async def test_a_connection_that_cannot_forward_is_not_retried_until_the_next_one():
    provider, lock = Provider(Lease((40001,), 60.0), obtain_error=NotForwardedHere("no gateway")), FakeLock()
    host = host_of(driver(provider), lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await anyio.sleep(600)
        assert [call for call, _ in provider.calls] == ["obtain"]
        assert reported(host, "pf")["last_error"] == "no gateway"
        publish(host, "connecting", "vpn2")
        publish(host, "connected", "vpn2")
        await wait_for(lambda: len(provider.calls) == 2)
        tg.cancel_scope.cancel()
    assert lock.calls == []


async def test_a_static_port_is_forwarded_at_each_connection_without_renewals_and_only_on_its_servers():
    lock = FakeLock()
    plugin = static.factory({"ports": [51413], "servers": ["vpn1", "vpn3"]})
    assert isinstance(plugin, PortForwarding)
    plugin.read_holders = nothing_listens  # type: ignore[method-assign]
    host = host_of(plugin, lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: host.view.forwarded is not None)
        forwarded = host.view.forwarded
        assert forwarded is not None
        assert forwarded.ports == (51413,)
        assert lock.calls == [frozenset({("tcp", 51413), ("udp", 51413)})]
        report = reported(host, "pf")
        assert report["provider"] == "static" and report["port"] == 51413 and report["lifetime_s"] is None
        await anyio.sleep(600)  # held as long as the connection: no renewal, no change
        assert len(lock.calls) == 1
        # A server that does not forward it: nothing accepted through the tunnel.
        publish(host, "connecting", "vpn2")
        publish(host, "connected", "vpn2")
        await anyio.sleep(60)
        assert host.view.forwarded is None and lock.calls[-1] == frozenset()
        publish(host, "connected", "vpn3")
        await wait_for(lambda: host.view.forwarded is not None)
        forwarded = host.view.forwarded
        assert forwarded is not None
        assert forwarded.server == "vpn3"
        tg.cancel_scope.cancel()


async def test_a_static_port_another_program_holds_is_refused_until_that_program_is_gone():
    lock = FakeLock()
    plugin = static.factory({"ports": [51413]})
    assert isinstance(plugin, PortForwarding)
    busy = True

    async def holders(port: int) -> list[tuple[Socket, list[Program]]]:
        sock = Socket("tcp", ip_address("0.0.0.0"), port, 0, 7)
        return [(sock, [Program(42, "nc")])] if busy else []

    plugin.read_holders = holders  # type: ignore[method-assign]
    host = host_of(plugin, lock)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: as_object(reported(host, "pf").get("refused") or {}).get("port") == 51413)
        assert "held by nc (pid 42)" in as_text(as_object(reported(host, "pf")["refused"])["reason"])
        assert host.view.forwarded is None and lock.calls == []
        busy = False
        refused_at = anyio.current_time()
        await wait_for(lambda: host.view.forwarded is not None)
        assert anyio.current_time() - refused_at <= RETRY_MAX_S + 0.1  # judged again, bounded
        assert reported(host, "pf")["refused"] is None
        tg.cancel_scope.cancel()


def test_static_ports_are_checked_against_what_may_be_forwarded():
    bad: Mapping[str, object]
    for bad in (
        {},
        {"ports": []},
        {"ports": [22]},
        {"ports": ["51413"]},
        {"ports": list(range(40000, 40017))},
        {"ports": [51413], "allowed_ports": ["40000-50000"]},
        {"ports": [51413], "gateway": "10.2.0.1"},
    ):
        with pytest.raises(PluginOptionError):
            static.factory(bad)
    plugin = static.factory({"ports": [51413, 51414], "allowed_ports": ["51413-51414"]})
    assert isinstance(plugin, PortForwarding)
    assert isinstance(plugin.provider, static.StaticPorts)
    assert plugin.provider.lease == Lease((51413, 51414), None)


class Scripted:
    """Answers each server as scripted: a port (kept when suggested, if ``keeps``) or an error;
    records the suggestions."""

    name = "scripted"

    def __init__(self, answers: dict[str, int | Exception], keeps: bool = False) -> None:
        self.answers = answers
        self.keeps = keeps
        self.suggested: list[int | None] = []

    async def obtain(self, tunnel: TunnelView, suggested_port: int | None) -> Lease:
        self.suggested.append(suggested_port)
        answer = self.answers[tunnel.server or ""]
        if isinstance(answer, Exception):
            raise answer
        return Lease((suggested_port if self.keeps and suggested_port else answer,), None)

    async def renew(self, tunnel: TunnelView, lease: Lease) -> Lease:
        return lease

    async def release(self, tunnel: TunnelView, lease: Lease) -> None:
        return None


def told_host(plugin: PortForwarding, lock: FakeLock, told: list) -> PluginHost:
    async def post(make) -> None:
        told.append(make(0.0))

    return PluginHost([("pf", plugin)], lock, interface="tl0", server_of=lambda n: FakeServer(), post=post)


async def test_required_forwarding_tells_the_machine_of_a_server_without_a_port_at_each_try_and_of_grants():
    from supervisor.machine import events as ev

    provider = Scripted({"vpn1": 40001, "vpn2": ForwardingError("refused: not authorized"), "vpn3": 40003})
    told: list = []
    host = told_host(driver(provider, required=True), FakeLock(), told)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: host.view.forwarded is not None)
        publish(host, "connected", "vpn2")
        await wait_for(lambda: len(told) == 2)
        started = anyio.current_time()
        await anyio.sleep(31)  # retried meanwhile (2, 4, 8, 16 s): told again at each try
        unfit_report = as_object(reported(host, "pf")["unfit"])
        assert unfit_report["server"] == "vpn2"
        assert "refused: not authorized" in as_text(unfit_report["reason"])
        assert anyio.current_time() - started >= 31
        publish(host, "connected", "vpn3")
        await wait_for(lambda: told[-1] == ev.PortGranted(0.0, "vpn3"))
        await anyio.sleep(120)
        tg.cancel_scope.cancel()
    unfit = ev.ServerUnfit(0.0, "vpn2", "pf: no forwarded port: refused: not authorized")
    assert told == [ev.PortGranted(0.0, "vpn1"), *[unfit] * 5, ev.PortGranted(0.0, "vpn3")]


async def test_without_required_the_machine_hears_nothing():
    provider = Scripted({"vpn1": ForwardingError("silent")})
    told: list = []
    host = told_host(driver(provider), FakeLock(), told)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await anyio.sleep(120)
        tg.cancel_scope.cancel()
    assert told == [] and "unfit" not in reported(host, "pf")


async def test_each_connection_asks_for_the_port_held_before_and_the_status_says_if_it_changed():
    provider = Scripted({"vpn1": 40001, "vpn2": 40002}, keeps=True)
    host = host_of(driver(provider), FakeLock())
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: host.view.forwarded is not None)
        assert reported(host, "pf")["port_changed"] is False and reported(host, "pf")["previous_port"] is None
        publish(host, "connected", "vpn2")  # a failover: the gateway keeps the port asked for
        await wait_for(lambda: len(provider.suggested) == 2 and host.view.forwarded is not None)
        forwarded = host.view.forwarded
        assert forwarded is not None and forwarded.port == 40001
        assert reported(host, "pf")["port_changed"] is False
        provider.keeps = False  # a gateway that hands out its own port
        publish(host, "connecting", "vpn1")
        publish(host, "connected", "vpn1")
        await wait_for(lambda: len(provider.suggested) == 3 and host.view.forwarded is not None)
        report = reported(host, "pf")
        assert report["port"] == 40001 and report["previous_port"] == 40001
        publish(host, "connected", "vpn2")
        await wait_for(lambda: host.view.forwarded is not None and host.view.forwarded.port == 40002)
        assert reported(host, "pf")["port_changed"] is True
        tg.cancel_scope.cancel()
    assert provider.suggested == [None, 40001, 40001, 40001]
