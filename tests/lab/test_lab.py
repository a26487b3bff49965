"""The lab as an instrument: it catches leaks, does not cry wolf, and its faults do what they say."""

from __future__ import annotations

import time

import pytest

from supervisor.lab import faults
from supervisor.lab.probes import ContinuousPing, Observer, Probes, describe
from supervisor.lab.topology import INTERNET_V4, Lab, process_alive, sh
from tests.lab.hand_tunnel import FWMARK, hand_tunnel

pytestmark = pytest.mark.lab

# What each probe kind must look like at the ISP when nothing blocks it.
EXPECTED_KIND = {
    "icmp4": ("icmp", "203.0.113.10"),
    "icmp6": ("icmpv6", "2001:db8:203::10"),
    "icmp4-bound-to-wan0": ("icmp", "203.0.113.10"),
    "dns-udp-isp": ("dns-udp", "192.0.2.1"),
    "dns-tcp-isp": ("dns-tcp", "192.0.2.1"),
    "dns-udp-lan": ("dns-udp", "192.0.2.3"),
    "tcp4": ("tcp", "203.0.113.10"),
    "tcp6": ("tcp", "2001:db8:203::10"),
    "udp4": ("udp", "203.0.113.10"),
    "udp6": ("udp", "2001:db8:203::10"),
    "udp-to-endpoint": ("udp-to-endpoint-not-wireguard", None),
}

# A minimal correct lock, written by hand so the instrument is checked independently of tunlock's.
HAND_LOCK = f"""table inet handlock {{
  chain output {{
    type filter hook output priority filter; policy drop;
    oif lo accept
    meta mark {FWMARK} udp dport 51820 accept
    oifname "{{ifname}}" accept
    icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} accept
    reject
  }}
}}
"""


def test_observer_catches_every_probe_kind_without_a_lock(lab):
    mark = lab.observer.mark()
    answered = lab.probes.every_kind()
    leaks = lab.observer.leaks(since=mark)
    assert all(answered[k] for k in answered if k != "udp-to-endpoint"), answered
    for probe, (kind, dst) in EXPECTED_KIND.items():
        if dst is None:
            dst = lab.lab.servers[0].endpoint_v4
        assert any(e["kind"] == kind and e["dst"] == dst for e in leaks), (
            f"{probe}: the observer saw no {kind} to {dst}:\n{describe(leaks)}"
        )


def test_observer_counts_zero_with_a_correct_lock_and_a_tunnel(lab):
    with hand_tunnel(lab.lab, server=1) as ifname:
        sh(
            "ip",
            "netns",
            "exec",
            lab.lab.ns("client"),
            "nft",
            "-f",
            "-",
            input=HAND_LOCK.replace("{ifname}", ifname),
        )
        try:
            mark = lab.observer.mark()
            through_tunnel = [lab.probes.ping(INTERNET_V4), lab.probes.tcp(INTERNET_V4), lab.probes.udp()]
            blocked = lab.probes.dns_udp("192.0.2.1") or lab.probes.ping(INTERNET_V4, interface="wan0")
            leaks = lab.observer.leaks(since=mark)
        finally:
            sh("ip", "netns", "exec", lab.lab.ns("client"), "nft", "delete", "table", "inet", "handlock")
    assert through_tunnel == [True, True, True], "traffic must flow through the tunnel"
    assert not blocked
    assert leaks == [], f"the observer cried wolf:\n{describe(leaks)}"


def test_blackholed_server_receives_nothing_and_restores(lab):
    with hand_tunnel(lab.lab, server=2):
        assert lab.probes.ping(INTERNET_V4)
        faults.blackhole_server(lab.lab, "2")
        try:
            assert not lab.probes.ping(INTERNET_V4)
            before = _server_rx(lab.lab, 2)
            for _ in range(3):
                lab.probes.ping(INTERNET_V4)
            assert _server_rx(lab.lab, 2) == before, "a blackholed server must receive nothing"
        finally:
            faults.restore_server(lab.lab, "2")
        assert _eventually(lambda: lab.probes.ping(INTERNET_V4))


def test_loss_drops_some_but_not_all(lab):
    faults.loss(lab.lab, "50")
    try:
        out = sh(
            "ip",
            "netns",
            "exec",
            lab.lab.ns("client"),
            "ping",
            "-n",
            "-q",
            "-c",
            "40",
            "-i",
            "0.01",
            "-W",
            "1",
            INTERNET_V4,
            check=False,
        )
    finally:
        faults.clear_loss(lab.lab)
    received = int(out.split(" received")[0].rsplit(" ", 1)[1])
    assert 0 < received < 40, out


def test_link_down_and_up(lab):
    faults.link_down(lab.lab)
    try:
        link = sh("ip", "-n", lab.lab.ns("client"), "link", "show", "wan0")
        assert "NO-CARRIER" in link
        assert not lab.probes.ping(INTERNET_V4)
    finally:
        faults.link_up(lab.lab)
    assert _eventually(lambda: lab.probes.ping(INTERNET_V4))


def test_default_route_deleted_and_restored(lab):
    faults.delete_default_route(lab.lab)
    try:
        assert "default" not in sh("ip", "-n", lab.lab.ns("client"), "route")
        assert not lab.probes.ping(INTERNET_V4)
    finally:
        faults.restore_default_route(lab.lab)
    assert lab.probes.ping(INTERNET_V4)


def test_client_side_faults(lab):
    with hand_tunnel(lab.lab, server=3) as ifname:
        pid = faults.client_wireguard_pid(lab.lab)
        assert pid
        faults.kill_client_wireguard_go(lab.lab)
        assert _eventually(lambda: faults.client_wireguard_pid(lab.lab) is None)
    with hand_tunnel(lab.lab, server=3) as ifname:
        faults.delete_tunnel_interface(lab.lab)
        assert ifname not in sh("ip", "-n", lab.lab.ns("client"), "link")
    sh("ip", "netns", "exec", lab.lab.ns("client"), "nft", "add", "table", "inet", "something")
    faults.flush_client_ruleset(lab.lab)
    assert sh("ip", "netns", "exec", lab.lab.ns("client"), "nft", "list", "ruleset").strip() == ""


def test_kill_server(lab):
    server = lab.lab.servers[2]
    faults.kill_server(lab.lab, "3")
    assert _eventually(lambda: not process_alive(server.wg_pid))


def test_two_labs_side_by_side_do_not_interfere(lab):
    with Lab.up(servers=1) as other:
        other_observer = Observer.start(other, time_scale=lab.time_scale)
        mark_here, mark_there = lab.observer.mark(), other_observer.mark()
        assert Probes(other).ping(INTERNET_V4)
        here, there = lab.observer.leaks(since=mark_here), other_observer.leaks(since=mark_there)
        assert here == [], f"one lab's observer saw another's traffic:\n{describe(here)}"
        assert [e["kind"] for e in there] == ["icmp"], describe(there)
    assert lab.probes.ping(INTERNET_V4), "tearing one lab down must leave the other working"


def _server_rx(lab: Lab, index: int) -> int:
    server = lab.servers[index - 1]
    out = sh("ip", "netns", "exec", server.ns, "wg", "show", server.ifname, "transfer")
    return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def _eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_continuous_ping_measures_the_outage_across_a_fault(lab):
    pinger = ContinuousPing(lab.lab)
    pinger.wait_for_answers(15)
    faults.delete_default_route(lab.lab)
    time.sleep(0.5)  # the outage itself, not a wait for something
    faults.restore_default_route(lab.lab)
    pinger.wait_for_answers(10, after=time.time())
    record = pinger.stop()
    assert record.answered > 20
    assert 0.4 < record.longest_outage_s < 1.5, record
