"""The lockout guard's decision, pure: would the lock cut the SSH session a command runs in?"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest
from msgspec.structs import replace

from supervisor.lock.admin import SshSession, addresses_from_ip_json, lockout
from supervisor.lock.policy import LockPolicy

HERE = {ip_address("192.0.2.2"): "eth0", ip_address("2001:db8:c::2"): "eth0", ip_address("10.99.0.2"): "tl0"}
BASE = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C)
FROM_INTERNET = "203.0.113.10 50000 192.0.2.2 22"


def test_no_session_no_judgement():
    assert lockout(BASE, None, HERE) is None
    assert lockout(BASE, "", HERE) is None


def test_a_session_from_the_internet_is_cut_without_admin_tcp_and_the_reason_names_it():
    reason = lockout(BASE, FROM_INTERNET, HERE)
    assert reason is not None and "lock.admin_tcp" in reason and "203.0.113.10" in reason
    assert "Add 22 to lock.admin_tcp" in reason and "--force" in reason


@pytest.mark.parametrize(
    ("admin_tcp", "sources", "connection", "cut"),
    [
        ((22,), (), FROM_INTERNET, False),
        ((2222,), (), FROM_INTERNET, True),
        ((22,), ("203.0.113.0/24",), FROM_INTERNET, False),
        ((22,), ("198.51.100.0/24",), FROM_INTERNET, True),
        ((22,), ("2001:db8:203::/64",), "2001:db8:203::10 50000 2001:db8:c::2 22", False),
        ((22,), ("203.0.113.0/24",), "2001:db8:203::10 50000 2001:db8:c::2 22", True),
        ((22,), (), "::ffff:203.0.113.10 50000 ::ffff:192.0.2.2 22", False),  # dual-stack socket
    ],
)
def test_admin_ports_and_sources_decide(admin_tcp, sources, connection, cut):
    policy = LockPolicy(
        table="t",
        tunnel_interface="tl0",
        fwmark=1,
        admin_tcp=admin_tcp,
        admin_sources=tuple(ip_network(s) for s in sources),
    )
    assert (lockout(policy, connection, HERE) is not None) is cut


def test_a_lan_session_goes_on_only_where_the_lock_lets_the_lan_in():
    lan = (ip_network("192.0.2.0/24"),)
    from_lan = "192.0.2.9 50000 192.0.2.2 22"
    on_link = LockPolicy(table="t", tunnel_interface="tl0", fwmark=1, lan_ranges=lan, onlink=lan)
    assert lockout(on_link, from_lan, HERE) is not None, "LAN ranges alone let nothing in"
    assert lockout(replace(on_link, allow_lan=True), from_lan, HERE) is None
    assert lockout(replace(on_link, inbound_tcp=(22,)), from_lan, HERE) is None
    off_link = LockPolicy(table="t", tunnel_interface="tl0", fwmark=1, lan_ranges=lan, allow_lan=True)
    assert lockout(off_link, from_lan, HERE) is not None, "a LAN range that is not on-link is the ISP's"


def test_a_session_that_does_not_pass_this_namespace_is_not_judged():
    assert lockout(BASE, "203.0.113.10 50000 198.51.100.99 22", HERE) is None


def test_a_session_through_the_tunnel_goes_on_when_the_tunnel_accepts_its_port():
    through_tunnel = "10.99.0.1 50000 10.99.0.2 22"
    assert lockout(BASE, through_tunnel, HERE) is not None
    assert lockout(BASE.with_tunnel_inbound({("tcp", 22)}), through_tunnel, HERE) is None
    assert lockout(BASE.with_tunnel_inbound({("udp", 22)}), through_tunnel, HERE) is not None


def test_loopback_sessions_are_never_cut():
    assert lockout(BASE, "127.0.0.1 50000 127.0.0.1 22", {ip_address("127.0.0.1"): "lo"}) is None


@pytest.mark.parametrize("text", ["garbage", "1.2.3.4 x 5.6.7.8 22", "203.0.113.10 50000 192.0.2.2"])
def test_a_session_that_cannot_be_read_is_judged_as_cut(text):
    assert SshSession.parse(text) is None
    reason = lockout(BASE, text, HERE)
    assert reason is not None and "cannot be read" in reason and "lock.admin_tcp" in reason


def test_addresses_from_ip_json():
    links = [
        {"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}, {"local": "::1"}]},
        {"ifname": "eth0", "addr_info": [{"local": "192.0.2.2"}, {"local": "fe80::1"}]},
        {"ifname": "odd", "addr_info": [{"local": "not an address"}, {}]},
    ]
    assert addresses_from_ip_json(links) == {
        ip_address("127.0.0.1"): "lo",
        ip_address("::1"): "lo",
        ip_address("192.0.2.2"): "eth0",
        ip_address("fe80::1"): "eth0",
    }
