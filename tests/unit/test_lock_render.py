"""The renderer, pure: default drop everywhere, and nothing leaves outside the tunnel
except WireGuard carrying the fwmark, link upkeep and (when asked) the LAN."""

from __future__ import annotations

import re
from ipaddress import ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import fingerprint, render, render_endpoint_swap
from supervisor.servers import Endpoint

EP1 = Endpoint(ip_address("198.51.100.11"), 51820)
EP2 = Endpoint(ip_address("2001:db8:100::12"), 51821)
BASE = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C, endpoints=frozenset({EP1, EP2}))


def chain(text: str, name: str) -> list[str]:
    body = re.search(rf"\tchain {name} {{\n(.*?)\n\t}}", text, re.S)
    assert body, f"no chain {name}"
    return [line.strip() for line in body.group(1).splitlines()]


def test_replaces_the_table_in_one_transaction():
    text = render(BASE)
    assert text.splitlines()[:3] == [
        "add table inet tunlock",
        "delete table inet tunlock",
        "table inet tunlock {",
    ]


def test_every_chain_drops_by_default_and_ends_in_a_counted_reject_or_drop():
    text = render(BASE)
    for name, last in (("output", "reject"), ("input", "drop"), ("forward", "reject")):
        rules = chain(text, name)
        assert rules[0].endswith("policy drop;"), rules[0]
        assert rules[-1].startswith("counter name") and last in rules[-1]


def test_wireguard_only_with_the_fwmark_to_exact_endpoints():
    text = render(BASE)
    assert "elements = { 198.51.100.11 . 51820 }" in text
    assert "elements = { 2001:db8:100::12 . 51821 }" in text
    endpoint_rules = [r for r in chain(text, "output") if "@endpoints" in r]
    assert endpoint_rules and all(r.startswith("meta mark 0x0000ca6c ") for r in endpoint_rules)


def test_dns_rejected_everywhere_but_the_tunnel_resolvers():
    policy = LockPolicy(
        table="t",
        tunnel_interface="tl0",
        fwmark=1,
        tunnel_dns=frozenset({ip_address("10.64.0.1")}),
        allow_lan=True,
        lan_ranges=(ip_network("192.168.0.0/16"),),
    )
    text = render(policy)
    rules = chain(text, "output")
    dns_reject = next(i for i, r in enumerate(rules) if "th dport 53" in r and "reject" in r)
    lan_accept = next(i for i, r in enumerate(rules) if r == "ip daddr @lan4 accept")
    assert dns_reject < lan_accept, "DNS must be refused before the LAN is let through"
    assert chain(text, "to_tunnel")[0] == "meta l4proto { tcp, udp } th dport 53 jump tunnel_dns"
    assert chain(text, "tunnel_dns") == [
        "ip daddr @tunnel_dns4 accept",
        "ip6 daddr @tunnel_dns6 accept",
        'counter name "blocked_dns" reject',
    ]
    assert "elements = { 10.64.0.1 }" in text


def test_lan_and_inbound_ports_only_when_asked():
    assert "@lan4 accept" not in render(BASE)
    policy = LockPolicy(
        table="t",
        tunnel_interface="tl0",
        fwmark=1,
        lan_ranges=(ip_network("192.0.2.0/24"),),
        inbound_tcp=(8080, 9091),
    )
    inbound = chain(render(policy), "input")
    assert "ip saddr @lan4 tcp dport { 8080, 9091 } accept" in inbound
    assert "ip saddr @lan4 accept" not in inbound


def test_endpoint_swap_adds_before_it_deletes_and_never_widens():
    new = Endpoint(ip_address("198.51.100.12"), 51820)
    lines = render_endpoint_swap("tunlock", {EP1}, {new}).splitlines()
    assert lines == [
        "add element inet tunlock endpoints4 { 198.51.100.12 . 51820 }",
        "delete element inet tunlock endpoints4 { 198.51.100.11 . 51820 }",
    ]
    assert render_endpoint_swap("tunlock", {EP1}, {EP1}) == ""


def test_fingerprint_follows_the_policy():
    assert fingerprint(BASE) == fingerprint(LockPolicy(**{**BASE.__dict__}))
    assert fingerprint(BASE) != fingerprint(BASE.with_endpoints({EP1}))


endpoints = st.builds(
    Endpoint,
    st.one_of(st.ip_addresses(v=4, network="198.51.100.0/24"), st.ip_addresses(v=6, network="2001:db8::/32")),
    st.integers(1, 65535),
)
policies = st.builds(
    LockPolicy,
    table=st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True),
    tunnel_interface=st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True),
    fwmark=st.integers(1, 2**32 - 1),
    endpoints=st.frozensets(endpoints, max_size=5),
    tunnel_dns=st.frozensets(st.ip_addresses(network="10.64.0.0/16"), max_size=3),
    allow_lan=st.booleans(),
    lan_ranges=st.lists(
        st.sampled_from([ip_network("192.168.0.0/16"), ip_network("fc00::/7")]), max_size=2
    ).map(tuple),
    inbound_tcp=st.lists(st.integers(1, 65535), max_size=3, unique=True).map(tuple),
    link_upkeep=st.booleans(),
)

# What may accept packets in output without being bound to the tunnel interface or loopback.
UPKEEP = (
    "udp sport 68 udp dport 67 accept",
    "ip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept",
    "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
)


@settings(max_examples=300, deadline=None)
@given(policies)
def test_no_output_accept_outside_the_tunnel_but_wireguard_upkeep_and_lan(policy):
    text = render(policy)
    for name in ("output", "input", "forward"):
        assert chain(text, name)[0].endswith("policy drop;")
    tun = f'oifname "{policy.tunnel_interface}"'
    for rule in chain(text, "output"):
        if not rule.endswith("accept"):
            continue
        allowed = (
            rule == "oif lo accept"
            or (
                rule.startswith(f"meta mark 0x{policy.fwmark:08x} ")
                and "@endpoints" in rule
                and "udp dport" in rule
            )
            or (policy.link_upkeep and rule in UPKEEP)
            or (policy.allow_lan and rule in ("ip daddr @lan4 accept", "ip6 daddr @lan6 accept"))
            or (
                policy.inbound_tcp
                and "@lan" in rule
                and "tcp sport" in rule
                and "ct state established" in rule
            )
        )
        assert allowed, f"output rule accepts outside the tunnel: {rule}"
    for name in ("output", "forward"):
        for rule in chain(text, name):
            if "jump to_tunnel" in rule:
                assert rule == f"{tun} jump to_tunnel", f"only the tunnel may reach to_tunnel: {rule}"
            elif rule.endswith("accept") and name == "forward":
                assert policy.tunnel_interface in rule, rule
    assert chain(text, "tunnel_dns")[-1].endswith("reject"), "DNS into the tunnel to other resolvers"
