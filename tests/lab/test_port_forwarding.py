"""Port forwarding end to end: NAT-PMP through the tunnel, the narrowed lock, the port delivered.

Real parts only: each VPN server namespace runs the lab's NAT-PMP gateway
(supervisor/lab/natpmp.py), which forwards the port it hands out from the server's public
address through the tunnel to the client, as a provider does; Debian's ``natpmpc`` checks that
gateway independently of tunlock's client. The internet host then opens TCP connections to the
server's public address, and the ISP's observer counts every packet outside the tunnel.
"""

from __future__ import annotations

import json
import subprocess
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

pytestmark = pytest.mark.lab(servers=2, per_test=True)


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
        assert daemon.status()["state"] == "connected"
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
        """
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
