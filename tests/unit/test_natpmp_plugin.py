"""The NAT-PMP plugin's decisions with a fake gateway: when it maps, refreshes, follows a changed
port, retries, and gives the mapping up. The real exchange is proven in the lab
(tests/lab/test_port_forwarding.py) against the lab's gateway."""

from __future__ import annotations

from ipaddress import IPv4Address

import anyio
import pytest

import plugins.natpmp
from plugins.natpmp import NatPmpPlugin, codec
from supervisor.plugins import PluginHost
from tests.unit.test_plugin_host import FakeLock, FakeServer, publish

pytestmark = pytest.mark.anyio


class FakeGateway:
    def __init__(self, port: int) -> None:
        self.port = port
        self.refuse = False
        self.silent = False
        self.calls: list[tuple[str, int, int]] = []  # (protocol, suggested, lifetime)

    async def map(self, protocol: str, internal: int, suggested: int, lifetime: int) -> codec.Mapping:
        self.calls.append((protocol, suggested, lifetime))
        if self.silent:
            await anyio.sleep_forever()  # a server that died: every retry goes unanswered
        if self.refuse:
            raise codec.NatPmpRefused(2)
        port = self.port if lifetime else 0
        return codec.Mapping(protocol, 1, internal, port, lifetime)

    async def unmap(self, protocol: str, internal: int) -> codec.Mapping:
        return await self.map(protocol, internal, 0, 0)


def plugin_with(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch, **options) -> NatPmpPlugin:
    plugin = NatPmpPlugin({"lifetime_s": 2, **options})

    class Client:
        def __init__(self, *args, **kw) -> None:
            self.gateway = IPv4Address("10.2.0.1")

        map = staticmethod(gateway.map)
        unmap = staticmethod(gateway.unmap)

    monkeypatch.setattr(plugins.natpmp, "NatPmpClient", Client)
    plugin.client = lambda tunnel: Client()  # type: ignore[method-assign]
    return plugin


async def wait_for(condition, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def test_maps_at_each_connection_refreshes_follows_a_change_and_unmaps_at_stop(monkeypatch):
    gateway, lock = FakeGateway(40001), FakeLock()
    host = PluginHost(
        [("natpmp", plugin_with(gateway, monkeypatch))],
        lock,
        interface="tl0",
        server_of=lambda n: FakeServer(),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: host.view.forwarded is not None)
        assert host.view.forwarded.ports == (40001,)
        assert gateway.calls[:2] == [("udp", 1, 2), ("tcp", 40001, 2)]  # Proton's first request
        # A refresh halfway through the 2 s lease asks for the port it holds.
        await wait_for(lambda: len(gateway.calls) >= 4)
        assert gateway.calls[2] == ("udp", 40001, 2)
        # The gateway hands out another port at a refresh: an ordinary change.
        gateway.port = 40009
        await wait_for(lambda: host.view.forwarded is not None and host.view.forwarded.ports == (40009,))
        assert lock.calls[-1] == frozenset({("tcp", 40009), ("udp", 40009)})
        # A failover: a new connection is mapped afresh (suggesting 1 again).
        gateway.port = 40002
        before = len(gateway.calls)
        publish(host, "connecting", "vpn2")
        publish(host, "connected", "vpn2")
        await wait_for(lambda: host.view.forwarded is not None and host.view.forwarded.ports == (40002,))
        assert gateway.calls[before] == ("udp", 1, 2)
        # Stop: the mapping is given up while the tunnel still stands.
        await host.stopping(timeout=5)
        assert gateway.calls[-2:] == [("udp", 0, 0), ("tcp", 0, 0)]
        assert host.view.forwarded is None
        tg.cancel_scope.cancel()


async def test_a_refusing_gateway_is_retried_and_nothing_is_forwarded_meanwhile(monkeypatch):
    gateway, lock = FakeGateway(40001), FakeLock()
    gateway.refuse = True
    host = PluginHost(
        [("natpmp", plugin_with(gateway, monkeypatch))],
        lock,
        interface="tl0",
        server_of=lambda n: FakeServer(),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: "refused" in host.reports.get("natpmp", {}).get("last_error", ""))
        assert host.view.forwarded is None and lock.calls == []
        gateway.refuse = False
        await wait_for(lambda: host.view.forwarded is not None, timeout=15)  # the 2 s retry
        tg.cancel_scope.cancel()
    assert "restarts" not in host.reports["natpmp"], "a refusal is handled, not a crash"


async def test_an_exchange_with_a_server_just_left_is_abandoned_at_the_failover(monkeypatch):
    gateway, lock = FakeGateway(40001), FakeLock()
    gateway.silent = True
    host = PluginHost(
        [("natpmp", plugin_with(gateway, monkeypatch))],
        lock,
        interface="tl0",
        server_of=lambda n: FakeServer(),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: gateway.calls)  # stuck retrying the dead server
        gateway.silent, gateway.port = False, 40002
        publish(host, "connecting", "vpn2")
        publish(host, "connected", "vpn2")
        await wait_for(lambda: host.view.forwarded is not None)
        assert host.view.forwarded.ports == (40002,) and host.view.forwarded.server == "vpn2"
        tg.cancel_scope.cancel()


def test_options_are_checked():
    from supervisor.plugins import PluginOptionError

    for bad in ({"gateway": "x"}, {"lifetime_s": 0}, {"tries": 20}, {"servers": "vpn1"}, {"nope": 1}):
        with pytest.raises(PluginOptionError):
            NatPmpPlugin(bad)
