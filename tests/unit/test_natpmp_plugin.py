"""The NAT-PMP plugin's decisions with a fake gateway: when it maps, refreshes, follows a changed
port, retries, and gives the mapping up. The real exchange is proven in the lab
(tests/lab/test_port_forwarding.py) against the lab's gateway.

The tests run on trio's virtual clock (``MockClock`` with autojump): the driver's leases, refreshes
and retries are timed by the event loop's clock, so seconds of them pass in milliseconds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, ip_address

import anyio
import pytest
from trio.testing import MockClock

from plugins import natpmp
from plugins.forwarding.driver import PortForwarding
from plugins.forwarding.trust import DEFAULT_LISTENERS, grant_refusal
from plugins.natpmp import codec
from plugins.natpmp.client import NatPmpClient
from plugins.sockets import Program, Socket, parse_table
from supervisor.plugins import PluginHost, PluginOptionError, TunnelView
from tests.unit.test_plugin_host import FakeLock, FakeServer, as_object, as_text, publish, reported

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


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


async def nothing_listens(port: int) -> list[tuple[Socket, list[Program]]]:
    return []  # not this machine's own socket table


def plugin_with(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch, **options: object) -> PortForwarding:
    plugin = natpmp.factory({"lifetime_s": 2, **options})
    assert isinstance(plugin, PortForwarding)

    class Client(NatPmpClient):
        """The provider's client, its exchanges answered by ``gateway`` instead of a socket."""

        async def map(
            self, protocol: str, internal_port: int, external_port: int, lifetime_s: int
        ) -> codec.Mapping:
            return await gateway.map(protocol, internal_port, external_port, lifetime_s)

        async def unmap(self, protocol: str, internal_port: int) -> codec.Mapping:
            return await gateway.unmap(protocol, internal_port)

    def client(tunnel: TunnelView, tries: int) -> NatPmpClient:
        return Client(IPv4Address("10.2.0.1"), None)

    monkeypatch.setattr(plugin.provider, "client", client)
    monkeypatch.setattr(plugin, "read_holders", nothing_listens)
    return plugin


async def wait_for(condition: Callable[[], object], timeout: float = 10) -> None:
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
        forwarded = host.view.forwarded
        assert forwarded is not None
        assert forwarded.ports == (40001,)
        assert gateway.calls[:2] == [("udp", 1, 2), ("tcp", 40001, 2)]  # Proton's first request
        # A refresh halfway through the 2 s lease asks for the port it holds.
        await wait_for(lambda: len(gateway.calls) >= 4)
        assert gateway.calls[2] == ("udp", 40001, 2)
        # The gateway hands out another port at a refresh: an ordinary change.
        gateway.port = 40009
        await wait_for(lambda: host.view.forwarded is not None and host.view.forwarded.ports == (40009,))
        assert lock.calls[-1] == frozenset({("tcp", 40009), ("udp", 40009)})
        # A failover: a new connection is mapped afresh, suggesting the port held before.
        gateway.port = 40002
        before = len(gateway.calls)
        publish(host, "connecting", "vpn2")
        publish(host, "connected", "vpn2")
        await wait_for(lambda: host.view.forwarded is not None and host.view.forwarded.ports == (40002,))
        assert gateway.calls[before] == ("udp", 40009, 2)
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
        await wait_for(lambda: "refused" in as_text(reported(host, "natpmp").get("last_error", "")))
        assert host.view.forwarded is None and lock.calls == []
        gateway.refuse = False
        await wait_for(lambda: host.view.forwarded is not None, timeout=15)  # the 2 s retry
        tg.cancel_scope.cancel()
    assert "restarts" not in reported(host, "natpmp"), "a refusal is handled, not a crash"


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
        forwarded = host.view.forwarded
        assert forwarded is not None
        assert forwarded.ports == (40002,) and forwarded.server == "vpn2"
        tg.cancel_scope.cancel()


def test_options_are_checked():
    bad: Mapping[str, object]
    for bad in (
        {"gateway": "x"},
        {"lifetime_s": 0},
        {"tries": 20},
        {"servers": "vpn1"},
        {"nope": 1},
        {"allowed_ports": [22]},
        {"allowed_ports": ["1-65535"]},
        {"allowed_ports": ["50000-40000"]},
        {"allowed_ports": "40000-50000"},
        {"allowed_ports": []},
        {"allowed_ports": [True]},
        {"listeners": "qbittorrent-nox"},
        {"lifetime_s": "60"},
        {"lifetime_s": True},
    ):
        with pytest.raises(PluginOptionError):
            natpmp.factory(bad)

    plugin = natpmp.factory({"allowed_ports": [51413, "40000-49999"], "listeners": ["mytorrent"]})
    assert isinstance(plugin, PortForwarding)
    assert plugin.allowed_ports == (range(51413, 51414), range(40000, 50000))
    assert plugin.listeners == {"mytorrent"}
    default = natpmp.factory({})
    assert isinstance(default, PortForwarding)
    assert default.allowed_ports == (range(1024, 65536),) and default.listeners == set(DEFAULT_LISTENERS)


def held(
    port: int, *names: str, address: str = "0.0.0.0", protocol: str = "tcp"
) -> tuple[Socket, list[Program]]:
    sock = Socket(protocol, ip_address(address), port, 0, 1000 + port)
    return sock, [Program(100 + i, name) for i, name in enumerate(names)]


ANY = (range(1024, 65536),)
TORRENT = frozenset({"qbittorrent-nox"})


def test_a_granted_port_is_refused_when_it_would_expose_a_service_the_user_did_not_choose():
    # A privileged port: refused whatever listens (nothing, here).
    assert "below 1024" in (grant_refusal(22, ANY, [], TORRENT) or "")
    assert "below 1024" in (grant_refusal(1023, ANY, [], TORRENT) or "")
    # Outside the configured range.
    assert grant_refusal(40001, (range(50000, 50100),), [], TORRENT) == (
        "port 40001 is outside allowed_ports (50000-50099)"
    )
    # Held by another program, on any address but loopback, TCP or UDP.
    assert grant_refusal(40001, ANY, [held(40001, "python3.11")], TORRENT) == (
        "port 40001 (tcp) is held by python3.11 (pid 100), not by one of listeners"
    )
    assert "held by sshd" in (grant_refusal(2222, ANY, [held(2222, "sshd", address="::")], TORRENT) or "")
    assert "(udp)" in (grant_refusal(40001, ANY, [held(40001, "dnsd", protocol="udp")], TORRENT) or "")
    # Held by a process tunlock cannot see (another PID namespace): not trusted.
    assert "cannot see" in (grant_refusal(40001, ANY, [held(40001)], TORRENT) or "")
    # ... unless its owner is named (a client in another container runs as a uid of its own).
    assert grant_refusal(40001, ANY, [held(40001)], TORRENT | {"uid:0"}) is None
    # Free, held by the torrent client, or held only on loopback: accepted.
    assert grant_refusal(40001, ANY, [], TORRENT) is None
    assert grant_refusal(40001, ANY, [held(40001, "qbittorrent-nox", address="::")], TORRENT) is None
    assert grant_refusal(40001, ANY, [held(40001, "python3.11", address="127.0.0.1")], TORRENT) is None
    assert grant_refusal(40001, ANY, [held(40001, "x", address="::ffff:127.0.0.1")], TORRENT) is None
    assert grant_refusal(1024, ANY, [], TORRENT) is None


async def test_a_refused_grant_is_given_back_never_accepted_by_the_lock_and_shown(monkeypatch):
    gateway, lock = FakeGateway(22), FakeLock()
    host = PluginHost(
        [("natpmp", plugin_with(gateway, monkeypatch))],
        lock,
        interface="tl0",
        server_of=lambda n: FakeServer(),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        publish(host, "connected", "vpn1")
        await wait_for(lambda: as_object(reported(host, "natpmp").get("refused") or {}).get("port") == 22)
        report = reported(host, "natpmp")
        assert "below 1024" in as_text(as_object(report["refused"])["reason"]) and report["port"] is None
        await wait_for(lambda: ("udp", 0, 0) in gateway.calls)  # given back to the gateway
        assert host.view.forwarded is None and lock.calls == []
        # Asked again (a refresh's time later): a port the user would have is then accepted.
        gateway.port = 40001
        await wait_for(lambda: host.view.forwarded is not None, timeout=15)
        assert lock.calls[-1] == frozenset({("tcp", 40001), ("udp", 40001)})
        assert reported(host, "natpmp")["refused"] is None
        # A refresh that moves the port onto a refused one withdraws the port held.
        gateway.port = 443
        await wait_for(lambda: host.view.forwarded is None, timeout=15)
        assert lock.calls[-1] == frozenset()
        tg.cancel_scope.cancel()


def test_the_socket_table_is_read_with_its_owner_and_only_accepting_sockets():
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534 0 4242 1\n"
        "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1\n"
        "   2: 0200630A:9C41 0100630A:0016 01 00000000:00000000 00:00000000 00000000     0        0 18 1\n"
    )
    assert parse_table(tcp, "tcp") == [
        Socket("tcp", ip_address("127.0.0.1"), 8080, 65534, 4242),
        Socket("tcp", ip_address("0.0.0.0"), 22, 0, 17),
    ]
    tcp6 = (
        "  sl  local_address                         remote_address                        st ...\n"
        "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A "
        "00000000:00000000 00:00000000 00000000   1000        0 99 1\n"
        "   1: 0000000000000000FFFF00000100007F:0035 00000000000000000000000000000000:0000 07 "
        "00000000:00000000 00:00000000 00000000   0        0 98 1\n"
    )
    assert parse_table(tcp6, "tcp") == [Socket("tcp", ip_address("::1"), 8080, 1000, 99)]
    (udp,) = parse_table(tcp6, "udp")
    assert udp.address == ip_address("::ffff:127.0.0.1") and udp.port == 53 and udp.loopback_only


def test_a_listener_of_this_process_is_found_with_its_uid_and_program():
    import os
    import socket
    import sys

    from plugins.sockets import accepting_sockets, programs_of

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        (mine,) = [s for s in accepting_sockets(("tcp",)) if s.port == port]
        assert mine.uid == os.getuid() and mine.loopback_only
        (program,) = programs_of([mine.inode])[mine.inode]
        assert program.pid == os.getpid()
        assert program.name == os.path.basename(os.path.realpath(sys.executable))
