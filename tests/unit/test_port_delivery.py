"""Delivering the forwarded port: the port file, hook commands and the torrent-client formats."""

from __future__ import annotations

import os
import sys
from ipaddress import ip_address, ip_interface
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from plugins import hooks, portfile, torrent
from supervisor.plugins import (
    Forwarded,
    InboundLock,
    Plugin,
    PluginContext,
    PluginHost,
    PluginOptionError,
    TunnelView,
    View,
)
from tests.unit.test_plugin_host import as_object, reported


def as_pusher(plugin: Plugin) -> torrent.PortPusher:
    """A torrent factory's plugin, which the factories promise only as a Plugin, for the tests
    that look at its client and settings."""
    assert isinstance(plugin, torrent.PortPusher)
    return plugin


def test_port_file_is_written_whole_and_removed_when_no_port(tmp_path: Path):
    path = tmp_path / "forwarded_port"
    portfile.write_port_file(path, (51413,))
    assert path.read_text() == "51413\n"
    portfile.write_port_file(path, (40000, 40001))
    assert path.read_text() == "40000\n40001\n"
    assert os.stat(path).st_mode & 0o777 == 0o644
    portfile.write_port_file(path, None)
    assert not path.exists()
    portfile.write_port_file(path, None)  # already gone: fine
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def test_port_file_leaves_the_old_file_when_a_write_fails(tmp_path: Path, monkeypatch):
    path = tmp_path / "forwarded_port"
    portfile.write_port_file(path, (1000,))

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        portfile.write_port_file(path, (2000,))
    assert path.read_text() == "1000\n"
    assert os.listdir(tmp_path) == ["forwarded_port"]


def test_port_file_needs_an_absolute_path():
    with pytest.raises(PluginOptionError, match="absolute"):
        portfile.factory({"path": "relative"})
    with pytest.raises(PluginOptionError, match="mode"):
        portfile.factory({"path": "/x", "mode": 1})


VIEW = View(
    TunnelView("connected", "vpn2", "tl0", (ip_interface("10.2.0.2/32"),), session=3),
    Forwarded((40000, 40001), "vpn2", 0.0),
)


def test_hook_placeholders_are_filled_per_argument_without_a_shell():
    values = hooks.placeholders(VIEW)
    assert values == {"port": "40000", "ports": "40000,40001", "interface": "tl0", "server": "vpn2"}
    argv = hooks.expand(["echo", "{port}", "--on={interface}", "{server};rm -rf /", "{{literal}}"], values)
    assert argv == ["echo", "40000", "--on=tl0", "vpn2;rm -rf /", "{literal}"]


def test_a_hook_with_an_unknown_placeholder_is_refused_at_start():
    with pytest.raises(PluginOptionError, match="placeholder"):
        hooks.factory({"on_port": "echo {prot}"})
    with pytest.raises(PluginOptionError, match="at least one"):
        hooks.factory({})


@pytest.mark.anyio
async def test_a_hook_gets_its_arguments_and_a_hanging_one_is_killed_at_its_timeout(tmp_path: Path):
    out = tmp_path / "out"
    status, _ = await hooks.run_hook(
        [
            sys.executable,
            "-c",
            f"import sys; open({str(out)!r}, 'w').write(' '.join(sys.argv[1:]))",
            "40000",
            "tl0",
        ],
        timeout=10,
    )
    assert status == 0 and out.read_text() == "40000 tl0"
    status, _ = await hooks.run_hook([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.3)
    assert status is None  # killed at the timeout, not waited for


class NoLock(InboundLock):
    async def set_tunnel_inbound(self, pairs: frozenset[tuple[str, int]]) -> None:
        pass


@pytest.mark.anyio
async def test_hooks_plugin_runs_on_port_for_every_new_port_not_only_the_first(tmp_path: Path):
    record = tmp_path / "record"
    script = f"import sys; open({str(record)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')"
    plugin = hooks.factory(
        {
            "on_port": [sys.executable, "-c", script, "port", "{port}", "{ports}", "{server}"],
            "on_connected": [sys.executable, "-c", script, "up", "{server}", "{interface}"],
            "on_disconnected": [sys.executable, "-c", script, "down"],
        }
    )
    host = PluginHost([], NoLock(), interface="tl0", server_of=lambda n: None)
    ctx = PluginContext(host, "hooks")

    def show(view: View) -> None:
        host.view, host.version = view, host.version + 1
        ctx._notify()

    async with anyio.create_task_group() as tg:
        tg.start_soon(plugin.run, ctx)
        for view in (
            View(TunnelView("connected", "vpn1", "tl0", session=1)),
            View(TunnelView("connected", "vpn1", "tl0", session=1), Forwarded((1000,), "vpn1", 0)),
            View(TunnelView("connected", "vpn1", "tl0", session=1), Forwarded((2000,), "vpn1", 0)),
            View(TunnelView("connecting", "vpn2", "tl0", session=1)),
            View(TunnelView("connected", "vpn2", "tl0", session=2), Forwarded((3000,), "vpn2", 0)),
        ):
            show(view)
            with anyio.fail_after(20):
                while not (ctx._waiting and ctx._seen == host.version):
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert record.read_text().splitlines() == [
        "up vpn1 tl0",
        "port 1000 1000 vpn1",
        "port 2000 2000 vpn1",
        "down",
        "up vpn2 tl0",
        "port 3000 3000 vpn2",
    ]


def test_torrent_wire_formats():
    assert torrent.qbittorrent_set_body(40000) == {"json": '{"listen_port": 40000}'}
    assert torrent.qbittorrent_port({"listen_port": 40000, "upnp": False}) == 40000
    with pytest.raises(torrent.PushError):
        torrent.qbittorrent_port({})
    assert torrent.transmission_request("session-set", {"peer-port": 5}) == {
        "method": "session-set",
        "arguments": {"peer-port": 5},
    }
    assert torrent.transmission_port({"result": "success", "arguments": {"peer-port": 51413}}) == 51413
    with pytest.raises(torrent.PushError, match="denied"):
        torrent.transmission_port({"result": "denied"})


def test_binding_to_the_tunnel_wire_formats():
    body = torrent.qbittorrent_interface_body("tunlock0")
    assert body == {"json": '{"current_network_interface": "tunlock0"}'}
    assert torrent.qbittorrent_interface({"current_network_interface": ""}) == ""
    with pytest.raises(torrent.PushError, match="current_network_interface"):
        torrent.qbittorrent_interface({"listen_port": 1})
    reply = {"result": "success", "arguments": {"bind-address-ipv4": "10.2.0.2"}}
    assert torrent.transmission_bind_address(reply) == "10.2.0.2"
    assert torrent.transmission_bind_address({"result": "success", "arguments": {}}) is None, "3.00"
    with pytest.raises(torrent.PushError, match="denied"):
        torrent.transmission_bind_address({"result": "denied"})
    assert (
        as_pusher(torrent.transmission({})).bind_to_tunnel
        and not as_pusher(torrent.transmission({"bind_to_tunnel": False})).bind_to_tunnel
    )


def test_deluge_wire_formats():
    assert torrent.deluge_request(3, "core.get_config_value", "listen_ports") == {
        "method": "core.get_config_value",
        "params": ["listen_ports"],
        "id": 3,
    }
    assert torrent.deluge_set_config(40001) == {"listen_ports": [40001, 40001], "random_port": False}
    assert torrent.deluge_port([40001, 40001]) == 40001
    assert torrent.deluge_port([6881, 6891]) == 0, "a range is not the forwarded port"
    assert torrent.deluge_result({"result": True, "error": None, "id": 1}, "auth.login") is True
    with pytest.raises(torrent.DelugeNotAuthenticated):
        torrent.deluge_result({"result": None, "error": {"message": "Not authenticated", "code": 1}}, "x")
    with pytest.raises(torrent.PushError, match="Unknown method"):
        torrent.deluge_result({"result": None, "error": {"message": "Unknown method", "code": 2}}, "x")
    hosts = [["a1", "127.0.0.1", 58846, "localclient"], ["b2", "192.0.2.9", 58846, ""]]
    assert torrent.deluge_host_id(hosts, "192.0.2.9:58846") == "b2"
    with pytest.raises(torrent.PushError, match=r"no daemon at 127.0.0.1:1 \(its hosts: 127.0.0.1:58846"):
        torrent.deluge_host_id(hosts, "127.0.0.1:1")
    with pytest.raises(PluginOptionError, match="password"):
        torrent.deluge({})
    assert as_pusher(torrent.deluge({"password_env": "X"})).verify_listening


def test_qbittorrent_needs_credentials_and_reads_them_from_a_file_or_the_environment(tmp_path, monkeypatch):
    with pytest.raises(PluginOptionError, match="password"):
        torrent.qbittorrent({})
    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n")
    assert torrent.read_secret(str(secret), None) == "s3cret"
    monkeypatch.setenv("QBT_PW", "from-env")
    assert torrent.read_secret(None, "QBT_PW") == "from-env"
    with pytest.raises(torrent.PushError, match="not set"):
        torrent.read_secret(None, "NOT_THERE_AT_ALL")


PROC_NET_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid timeout
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1
   1: 00000000:9C41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2
   2: 0200630A:9C42 0A01630A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3
"""


def test_listening_ports_come_from_the_kernels_socket_table_in_listen_state_only():
    assert torrent.listening_tcp_ports(PROC_NET_TCP) == {8080, 40001}  # not 40002: established


def test_listening_is_verified_by_default_only_for_a_client_on_loopback():
    secret = {"password_env": "X"}
    assert as_pusher(torrent.qbittorrent(secret)).verify_listening
    assert not as_pusher(torrent.qbittorrent({**secret, "url": "http://192.0.2.9:8080"})).verify_listening
    assert as_pusher(torrent.transmission({"verify_listening": False})).verify_listening is False
    with pytest.raises(PluginOptionError):
        torrent.transmission({"verify_listening": "yes"})


@pytest.mark.anyio
async def test_a_shell_hook_reads_the_values_from_its_environment_as_plain_data(tmp_path: Path):
    """A ``sh -c`` script that reads "$TUNLOCK_SERVER" gets the text, never runs it: even a name
    that the server-file reader would refuse stays inert here."""
    out = tmp_path / "out"
    view = View(TunnelView("connected", "s2$(echo INJECTED)", "tl0", session=1), Forwarded((40000,), "s2", 0))
    plugin = hooks.factory(
        {"on_connected": ["sh", "-c", f'echo "up $TUNLOCK_SERVER $TUNLOCK_PORT $TUNLOCK_INTERFACE" > {out}']}
    )
    host = PluginHost([], NoLock(), interface="tl0", server_of=lambda n: None)
    ctx = PluginContext(host, "hooks")
    host.view, host.version = view, 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(plugin.run, ctx)
        with anyio.fail_after(20):
            while "on_connected" not in reported(host, "hooks"):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert as_object(reported(host, "hooks")["on_connected"])["status"] == 0
    assert out.read_text() == "up s2$(echo INJECTED) 40000 tl0\n"


@pytest.mark.anyio
async def test_a_server_file_named_with_shell_code_never_reaches_a_shell_hook(tmp_path: Path):
    """The attack of issue #21 item 7: ``s2$(echo INJECTED).conf`` beside a hook
    ``sh -c "echo connected to {server}"``. The daemon's config loader refuses the file, naming
    it, so no server of that name ever connects; before, the hook ran the substitution."""
    from supervisor.config import load_config
    from supervisor.errors import ConfigError

    from .test_check_pipeline import server, write_tree

    config = write_tree(tmp_path, "", {"servers/s2$(echo INJECTED).conf": server()})
    out = tmp_path / "hook.log"
    try:
        names = [s.name for s in load_config(config, {}).servers]
        refusal = ""
    except ConfigError as err:
        names, refusal = [], str(err)
    for name in names:  # what the daemon would hand the hook at each connection
        view = View(TunnelView("connected", name, "tl0", session=1))
        argv = hooks.expand(["sh", "-c", f"echo connected to {{server}} >> {out}"], hooks.placeholders(view))
        await hooks.run_hook(argv, timeout=10)
    assert not out.exists() or "INJECTED" not in out.read_text().replace("$(echo INJECTED)", "")
    assert "s2$(echo INJECTED).conf: server name 's2$(echo INJECTED)' is refused" in refusal


def _listener(address: str, port: int, uid: int) -> torrent.sockets.Socket:
    return torrent.sockets.Socket("tcp", ip_address(address), port, uid, 1)


def test_the_api_listener_is_the_one_on_its_address_or_a_wildcard_and_must_be_trusted():
    from ipaddress import IPv4Address

    table = [
        _listener("127.0.0.1", 8080, 65534),
        _listener("::", 8080, 0),
        _listener("::ffff:127.0.0.1", 8080, 1000),
        _listener("127.0.0.2", 8080, 1001),  # another address: never takes a connection to .1
        _listener("0.0.0.0", 9091, 0),  # another port
    ]
    found = torrent.api_listeners(table, [IPv4Address("127.0.0.1")], 8080)
    assert [s.uid for s in found] == [65534, 0, 1000]
    refusal = torrent.api_owner_refusal(found, frozenset({0}), "127.0.0.1:8080")
    assert refusal is not None and refusal.startswith("127.0.0.1:8080 is held by uid 65534 (nobody)")
    assert "not sent" in refusal
    assert torrent.api_owner_refusal(found, frozenset({0, 1000, 65534}), "x") is None
    assert "nothing listens" in (torrent.api_owner_refusal([], frozenset({0}), "127.0.0.1:8080") or "")


def test_api_user_names_the_clients_user_by_name_or_uid():
    base = {"password_env": "X"}
    trusted = as_pusher(torrent.qbittorrent({**base, "api_user": "nobody"})).client.guard.trusted
    assert trusted == {0, os.geteuid(), 65534}
    assert 1234 in as_pusher(torrent.transmission({"api_user": 1234})).client.guard.trusted
    for bad in ("no-such-user-here", True, -1, ""):
        with pytest.raises(PluginOptionError, match="api_user"):
            torrent.transmission({"api_user": bad})
    assert as_pusher(torrent.qbittorrent({**base, "url": "http://192.0.2.9:8080"})).client.guard.hosts == ()


@pytest.mark.anyio
async def test_no_credentials_reach_an_api_listener_of_an_untrusted_user(tmp_path: Path):
    """A real listener in this process stands for the API port; this process's uid is made
    untrusted, as a listener of another user is: the login is not sent, and the error says why."""
    received: list[bytes] = []

    async def record(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(2):
                received.append(await stream.receive())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    secret = tmp_path / "pw"
    secret.write_text("s3cret-password\n")
    for plugin in (
        torrent.qbittorrent({"url": f"http://127.0.0.1:{port}", "password_file": str(secret)}),
        torrent.transmission(
            {"url": f"http://127.0.0.1:{port}/rpc", "username": "u", "password_file": str(secret)}
        ),
    ):
        pusher = as_pusher(plugin)
        pusher.client.guard.trusted = frozenset({os.geteuid() + 1})
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, record)
            async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
                refused = f"127.0.0.1:{port} is held by uid {os.geteuid()}"
                with pytest.raises(torrent.PushError, match=refused):
                    await pusher.client.port(http)
            tg.cancel_scope.cancel()
    await listener.aclose()
    assert received == [], "nothing at all was sent to the untrusted listener"
