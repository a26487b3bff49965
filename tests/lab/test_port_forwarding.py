"""Port forwarding end to end: NAT-PMP through the tunnel, the narrowed lock, the port delivered.

Real parts only: each VPN server namespace runs the lab's NAT-PMP gateway
(supervisor/lab/natpmp.py), which forwards the port it hands out from the server's public
address through the tunnel to the client, as a provider does; Debian's ``natpmpc`` checks that
gateway independently of tunlock's client. The internet host then opens TCP connections to the
server's public address, and the ISP's observer counts every packet outside the tunnel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from supervisor.lab import faults
from supervisor.lab.topology import CLIENT_V4
from tests.lab.conftest import LabUnderTest
from tests.lab.seedbox import (
    GATEWAY,
    QUICK,
    connect,
    gateway_state,
    listen,
    set_gateway,
    start_gateways,
    wait_until,
    write_config,
)
from tests.lab.torrent_clients import QBT_WEBUI_PORT, listening_ports, start_qbittorrent

pytestmark = pytest.mark.lab(servers=2, per_test=True)

# The lab's listeners are Python programs that stand for the torrent client: named in the
# natpmp plugin's ``listeners`` so that a port they already hold may be forwarded.
PYTHON = os.path.basename(os.path.realpath(sys.executable))


def assert_no_leaks(lab: LabUnderTest, mark: int) -> None:
    leaks = lab.observer.leaks(since=mark)
    assert not leaks, f"the ISP saw {len(leaks)} packets outside the tunnel"


def natpmpc(lab: LabUnderTest, *args: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", lab.lab.ns("client"), "natpmpc", "-g", GATEWAY, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


def test_natpmpc_gets_the_port_from_the_lab_gateway_through_the_tunnel(lab: LabUnderTest) -> None:
    """The lab's gateway against an independent client: Debian's natpmpc (libnatpmp)."""
    start_gateways(lab.lab, {1: 40001})
    with lab.daemon(env=QUICK) as daemon:  # no plugins: natpmpc does the asking
        daemon.start()
        out = natpmpc(lab, "-a", "1", "0", "udp", "60")  # Proton's documented command
        assert "Mapped public port 40001 protocol UDP to local port 0 liftime 60" in out, out
        assert "Public IP address : 198.51.100.6" in natpmpc(lab)
        assert gateway_state(lab.lab, 1)["maps"][-1] == {
            "op": 1,
            "port": 40001,
            "lifetime": 60,
            "from": "10.99.0.2",
            "suggested": 1,
        }
        set_gateway(lab.lab, 1, "refuse", 40001)
        out = natpmpc(lab, "-a", "1", "0", "tcp", "60")
        assert "Mapped public port" not in out and "failed : not authorized" in out, out
        set_gateway(lab.lab, 1, "ok", 40001)
        out = natpmpc(lab, "-a", "1", "0", "udp", "0")
        assert "Mapped public port 0" in out, out
        assert gateway_state(lab.lab, 1)["unmaps"] == 1


def test_forwarded_port_reaches_a_listener_through_the_tunnel_and_follows_failover_and_changes(
    lab: LabUnderTest,
) -> None:
    start_gateways(lab.lab, {1: 40001, 2: 40002})
    # A provider that hands out a whole address: port 2222 reaches the client too, and the
    # lock must keep it out.
    set_gateway(lab.lab, 1, "ok", 40001, extra=(2222,))
    set_gateway(lab.lab, 2, "ok", 40002, extra=(2222,))
    port_file = lab.lab.dir / "forwarded_port"
    hook_log = lab.lab.dir / "hook.log"
    config = write_config(
        lab.lab,
        f"""
        [plugins]
        enabled = ["natpmp", "portfile", "hooks"]

        [plugins.natpmp]
        lifetime_s = 4
        tries = 3
        listeners = ["{PYTHON}"]

        [plugins.portfile]
        path = "{port_file}"

        [plugins.hooks]
        on_port = ["sh", "-c", "echo port $0 $1 $2 $3 >> {hook_log}",
                   "{{port}}", "{{ports}}", "{{interface}}", "{{server}}"]
        on_connected = ["sh", "-c", "echo up $0 >> {hook_log}", "{{server}}"]
        """,
    )
    for port in (40001, 40002, 40003, 2222):
        listen(lab.lab, port)
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=config) as daemon:
        daemon.start()
        status = daemon.wait_for(lambda s: s["forwarded_port"] == 40001, what="forwarded port 40001")
        assert status["server"] == "vpn1" and status["plugins"]["natpmp"]["port"] == 40001
        vpn1, vpn2 = (s.endpoint_v4 for s in lab.lab.servers)
        assert connect(lab.lab, "inet", vpn1, 40001) == "seedbox 40001"
        assert connect(lab.lab, "inet", vpn1, 2222) == "no answer", "only the forwarded port comes in"
        # The physical interface accepts nothing of the kind, from the ISP or the internet.
        assert connect(lab.lab, "inet", CLIENT_V4, 40001) == "no answer"
        assert connect(lab.lab, "isp", CLIENT_V4, 40001) == "no answer"
        assert port_file.read_text() == "40001\n"

        failed_over_at = time.monotonic()
        faults.kill_server(lab.lab, "1")
        daemon.wait_for(lambda s: s["server"] == "vpn2" and s["forwarded_port"] == 40002, 30, "vpn2's port")
        print(f"\nfailover to the new port accepted: {time.monotonic() - failed_over_at:.2f} s (noisy)")
        assert connect(lab.lab, "inet", vpn2, 40002) == "seedbox 40002"
        assert connect(lab.lab, "inet", vpn2, 2222) == "no answer"
        assert wait_until(lambda: port_file.read_text() == "40002\n", "the new port in the file")

        # The provider changes the port mid-session: picked up at the next refresh.
        set_gateway(lab.lab, 2, "ok", 40003, extra=(2222,))
        daemon.wait_for(lambda s: s["forwarded_port"] == 40003, 20, "the changed port")
        assert connect(lab.lab, "inet", vpn2, 40003) == "seedbox 40003"
        assert wait_until(lambda: port_file.read_text() == "40003\n", "the changed port in the file")

        # A gateway that refuses, then goes silent: once the lease has run out unrenewed the port
        # is no longer announced (status, port file); the daemon stays connected throughout.
        set_gateway(lab.lab, 2, "refuse", 40003)
        daemon.wait_for(
            lambda s: "refused" in (s["plugins"]["natpmp"].get("last_error") or ""), 20, "refusal"
        )
        daemon.wait_for(lambda s: s["forwarded_port"] is None, 20, "the expired port withdrawn")
        assert wait_until(lambda: not port_file.exists(), "the port file removed")
        set_gateway(lab.lab, 2, "silent", 40003)
        daemon.wait_for(
            lambda s: "no NAT-PMP answer" in (s["plugins"]["natpmp"].get("last_error") or ""), 30, "silence"
        )
        now = daemon.status()
        assert now is not None and now["state"] == "connected"
        set_gateway(lab.lab, 2, "ok", 40003)
        daemon.wait_for(lambda s: s["forwarded_port"] == 40003, 60, "the port back")
        assert connect(lab.lab, "inet", vpn2, 40003) == "seedbox 40003"
        unmaps_before = gateway_state(lab.lab, 2)["unmaps"]
        assert daemon.stop() == 0
    assert not port_file.exists(), "the port file is removed at stop"
    assert gateway_state(lab.lab, 2)["unmaps"] > unmaps_before, "the mapping is given up at stop"
    hooks = hook_log.read_text().splitlines()
    tl = lab.lab.client_ifname
    assert hooks[:2] == ["up vpn1", f"port 40001 40001 {tl} vpn1"]
    assert f"port 40002 40002 {tl} vpn2" in hooks and f"port 40003 40003 {tl} vpn2" in hooks
    assert_no_leaks(lab, mark)


def test_misbehaving_plugins_do_not_stop_failover_or_touch_the_lock(lab: LabUnderTest) -> None:
    start_gateways(lab.lab, {1: 40001, 2: 40002})
    config = write_config(
        lab.lab,
        f"""
        [plugins]
        enabled = [
            "tests.lab.misbehaving:raises",
            "tests.lab.misbehaving:hangs",
            "tests.lab.misbehaving:floods",
            "natpmp",
        ]
        stall_timeout_s = 1
        backoff_initial_s = 0.2
        backoff_max_s = 1

        [plugins.natpmp]
        listeners = ["{PYTHON}"]
        """,
    )
    listen(lab.lab, 40002)
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=config) as daemon:
        daemon.start()
        daemon.wait_for(lambda s: s["forwarded_port"] == 40001, what="forwarded port 40001")
        faults.kill_server(lab.lab, "1")
        status = daemon.wait_for(
            lambda s: s["server"] == "vpn2" and s["forwarded_port"] == 40002, 30, "failover"
        )
        plugins = status["plugins"]
        assert plugins["tests.lab.misbehaving:raises"]["restarts"] >= 1
        daemon.wait_for(
            lambda s: "hung" in (s["plugins"]["tests.lab.misbehaving:hangs"].get("last_error") or ""),
            10,
            "a hang",
        )
        assert connect(lab.lab, "inet", lab.lab.servers[1].endpoint_v4, 40002) == "seedbox 40002"
        # The flood asked for many ports; it can only ever reach the tunnel's inbound set.
        answer = json.loads(
            lab.lab.run("client", "nft", "-j", "list", "set", "inet", "tunlock", "tunnel_inbound")
        )
        elements = [e for item in answer["nftables"] if "set" in item for e in item["set"].get("elem", [])]
        assert len(elements) <= 2 * 16
        rules = lab.lab.run("client", "nft", "list", "chain", "inet", "tunlock", "input")
        assert f'iifname "{lab.lab.client_ifname}" jump from_tunnel' in rules
        assert f'iifname "{lab.lab.client_ifname}" accept' not in rules
    assert not any("lock tampered" in line for line in daemon.log_events())
    assert_no_leaks(lab, mark)


def tunnel_inbound(lab: LabUnderTest) -> set[int]:
    answer = json.loads(
        lab.lab.run("client", "nft", "-j", "list", "set", "inet", "tunlock", "tunnel_inbound")
    )
    elements = [e for item in answer["nftables"] if "set" in item for e in item["set"].get("elem", [])]
    # Each element carries its counter: {"elem": {"val": {"concat": [...]}, "counter": {...}}}.
    return {e["elem"]["val"]["concat"][1] for e in elements}


def test_a_gateway_granting_ssh_or_a_busy_port_exposes_nothing_the_torrent_clients_port_works(
    lab: LabUnderTest,
) -> None:
    """Issue #21 item 2: the gateway, not the user, picks the port. A hostile (or broken) gateway
    grants 22 while a service listens on 22 in the client (a Python listener stands for sshd),
    then a high port another program holds: neither reaches the client from the internet
    although the gateway goes on forwarding them, the status shows the refusal, and the grant is
    given back. The torrent client's own port is then forwarded as usual, though qBittorrent
    already listens on it."""
    start_gateways(lab.lab, {1: 22})
    set_gateway(lab.lab, 1, "ok", 22, keep=True)  # it goes on forwarding 22 after the unmap
    listen(lab.lab, 22)
    listen(lab.lab, 40001)  # a program of another user's choosing, not the torrent client
    config = write_config(
        lab.lab,
        """
        [plugins]
        enabled = ["natpmp"]

        [plugins.natpmp]
        lifetime_s = 4
        tries = 3
        """,
    )
    vpn1 = lab.lab.servers[0].endpoint_v4
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=config) as daemon:
        daemon.start()
        status = daemon.wait_for(
            lambda s: (s["plugins"]["natpmp"].get("refused") or {}).get("port") == 22, 20, "22 refused"
        )
        assert "below 1024" in status["plugins"]["natpmp"]["refused"]["reason"]
        assert status["forwarded_port"] is None and status["plugins"]["natpmp"]["port"] is None
        assert wait_until(lambda: gateway_state(lab.lab, 1)["unmaps"] >= 1, "the grant given back")
        assert gateway_state(lab.lab, 1)["forwarded"] == [22, "10.99.0.2"], "the gateway still forwards 22"
        assert connect(lab.lab, "inet", vpn1, 22) == "no answer", "the host's SSH is not exposed"
        assert 22 not in tunnel_inbound(lab)

        set_gateway(lab.lab, 1, "ok", 40001, keep=True)
        status = daemon.wait_for(
            lambda s: (s["plugins"]["natpmp"].get("refused") or {}).get("port") == 40001, 20, "40001 refused"
        )
        assert f"held by {PYTHON}" in status["plugins"]["natpmp"]["refused"]["reason"]
        assert connect(lab.lab, "inet", vpn1, 40001) == "no answer"
        assert status["forwarded_port"] is None and 40001 not in tunnel_inbound(lab)

        # qBittorrent already listens on the port the gateway grants next (started once the
        # tunnel is up: it binds each address it finds at start, the tunnel's among them).
        qbittorrent = start_qbittorrent(lab.lab, port=40003)
        wait_until(
            lambda: listening_ports(lab.lab, qbittorrent.pid, QBT_WEBUI_PORT) == {40003}, "qBittorrent", 30
        )
        set_gateway(lab.lab, 1, "ok", 40003)
        status = daemon.wait_for(lambda s: s["forwarded_port"] == 40003, 20, "the torrent client's port")
        assert status["plugins"]["natpmp"]["refused"] is None
        assert connect(lab.lab, "inet", vpn1, 40003) == "connected", "a peer reaches qBittorrent"
        assert tunnel_inbound(lab) == {40003}
    refusals = [e for e in daemon.log_events() if "granted port refused" in e]
    assert any("port=22" in e or '"port": 22' in e for e in refusals), refusals
    assert_no_leaks(lab, mark)


def test_a_static_port_is_accepted_through_the_tunnel_at_each_connection_and_judged_like_a_grant(
    lab: LabUnderTest,
) -> None:
    """The second port-forwarding provider (issue #22 item 2): ``[plugins.static_port]`` for a
    port the provider assigned for good. The server forwards it (here the lab's gateway, told once
    by natpmpc, as a provider's own set-up would); tunlock asks nobody, but the lock accepts the
    port through the tunnel at each connection, the status shows it, and a port another program
    holds is refused like a gateway's grant."""
    start_gateways(lab.lab, {1: 40005, 2: 40006})
    set_gateway(lab.lab, 1, "ok", 40005, keep=True)
    listen(lab.lab, 40005)  # the torrent client, by the program name in listeners
    config = write_config(
        lab.lab,
        f"""
        [plugins]
        enabled = ["static_port"]

        [plugins.static_port]
        ports = [40005]
        listeners = ["{PYTHON}"]
        """,
    )
    vpn1 = lab.lab.servers[0].endpoint_v4
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=config) as daemon:
        daemon.start()
        status = daemon.wait_for(lambda s: s["forwarded_port"] == 40005, 20, "the static port")
        report = status["plugins"]["static_port"]
        assert report["provider"] == "static" and report["lifetime_s"] is None and report["refused"] is None
        assert tunnel_inbound(lab) == {40005}
        assert "Mapped public port 40005" in natpmpc(lab, "-a", "40005", "0", "tcp", "60")
        assert connect(lab.lab, "inet", vpn1, 40005) == "seedbox 40005", "a peer reaches the client"

        # Another server is a new connection: the port is judged and accepted again there.
        assert daemon.ask("rotate") == {"ok": True}
        daemon.wait_for(lambda s: s["server"] == "vpn2" and s["forwarded_port"] == 40005, 30, "on vpn2")
        assert tunnel_inbound(lab) == {40005}
    assert_no_leaks(lab, mark)


def test_a_static_port_another_program_holds_is_never_accepted(lab: LabUnderTest) -> None:
    start_gateways(lab.lab, {1: 40005})
    set_gateway(lab.lab, 1, "ok", 40005, keep=True)
    listen(lab.lab, 40005)  # not in listeners (the defaults: the torrent clients)
    plugins = '[plugins]\nenabled = ["static_port"]\n[plugins.static_port]\nports = [40005]\n'
    config = write_config(lab.lab, plugins)
    vpn1 = lab.lab.servers[0].endpoint_v4
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=config) as daemon:
        daemon.start()
        status = daemon.wait_for(
            lambda s: (s["plugins"]["static_port"].get("refused") or {}).get("port") == 40005, 20, "refused"
        )
        assert f"held by {PYTHON}" in status["plugins"]["static_port"]["refused"]["reason"]
        assert "Mapped public port 40005" in natpmpc(lab, "-a", "40005", "0", "tcp", "60")
        assert status["forwarded_port"] is None and 40005 not in tunnel_inbound(lab)
        assert connect(lab.lab, "inet", vpn1, 40005) == "no answer", "the other program is not exposed"
    assert_no_leaks(lab, mark)
