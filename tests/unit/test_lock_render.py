"""The renderer, pure: default drop everywhere, and nothing leaves outside the tunnel
except WireGuard carrying the fwmark, link upkeep and (when asked) the LAN."""

from __future__ import annotations

import re
from ipaddress import ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from supervisor.lock.owner import (
    apply_script,
    probe_script,
    remove_script,
    swap_script,
    tunnel_inbound_swap_script,
)
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import (
    ADMIN_MARK_TEXT,
    BRIDGE_LOCAL_RULE,
    EGRESS_COUNTER,
    fingerprint,
    owned_table,
    render,
    render_endpoint_swap,
    render_owned,
    render_tunnel_inbound_swap,
)
from supervisor.servers import Endpoint

ADMIN_OUT = "ct mark 0x746c0022 tcp sport @admin_tcp accept"

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
        'tcp dport 53 counter name "blocked_dns" reject with tcp reset',
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
    assert fingerprint(BASE) == fingerprint(replace(BASE))
    assert fingerprint(BASE) != fingerprint(BASE.with_endpoints({EP1}))


LAN_CHOICES = [
    ip_network(n)
    for n in (
        "192.168.0.0/16",
        "10.0.0.0/8",
        "192.0.2.0/24",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
        "ff02::/16",
    )
]
ONLINK_CHOICES = [
    ip_network(n)
    for n in (
        "192.168.1.0/24",
        "10.0.0.0/8",
        "192.0.2.0/24",
        "203.0.113.0/24",
        "fd00:1::/64",
        "2001:db8:c::/64",
    )
]
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
    lan_ranges=st.lists(st.sampled_from(LAN_CHOICES), max_size=4, unique=True).map(tuple),
    onlink=st.lists(st.sampled_from(ONLINK_CHOICES), max_size=4, unique=True).map(tuple),
    inbound_tcp=st.lists(st.integers(1, 65535), max_size=3, unique=True).map(tuple),
    admin_tcp=st.lists(st.integers(1, 65535), max_size=2, unique=True).map(tuple),
    admin_sources=st.lists(st.sampled_from(ONLINK_CHOICES), max_size=2, unique=True).map(tuple),
    link_upkeep=st.booleans(),
    egress_devices=st.lists(st.sampled_from(("eth0", "eth1", "enp3s0")), max_size=2, unique=True).map(tuple),
    bridges=st.lists(st.sampled_from(("docker0", "br-1a2b")), max_size=2, unique=True).map(tuple),
)

# What may accept packets in output without being bound to the tunnel interface or loopback.
UPKEEP = (
    "ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
    "ip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept",
    "ip6 daddr { fe80::/10, ff02::/16 } icmpv6 type { nd-router-solicit, nd-neighbor-solicit, "
    "nd-neighbor-advert } ip6 hoplimit 255 accept",
    "ip6 daddr @onlink6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
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
            or rule.endswith("jump forward_reject")
            or (policy.allow_lan and rule in ("ip daddr @lan4 accept", "ip6 daddr @lan6 accept"))
            or (
                policy.inbound_tcp
                and "@lan" in rule
                and "tcp sport" in rule
                and "ct state established" in rule
            )
            or (policy.admin_tcp and rule == ADMIN_OUT)
        )
        assert allowed or rule.endswith("jump forward_reject"), (
            f"output rule accepts outside the tunnel: {rule}"
        )
    for name in ("output", "forward"):
        for rule in chain(text, name):
            if "jump to_tunnel" in rule:
                assert rule == f"{tun} jump to_tunnel", f"only the tunnel may reach to_tunnel: {rule}"
            elif rule == BRIDGE_LOCAL_RULE:
                continue  # between two ports of one of the host's own bridges: see below
            elif rule.endswith("accept") and name == "forward":
                assert policy.tunnel_interface in rule, rule
    assert chain(text, "tunnel_dns")[-1].endswith("reject"), "DNS into the tunnel to other resolvers"


# Where a packet leaving on the physical side may go: each accepting rule must name one of these
# destinations. A rule without one (the audit's `udp sport 68 udp dport 67 accept`) lets a
# program with CAP_NET_RAW or CAP_NET_BIND_SERVICE carry data to any address.
DESTINATION_LIMITS = (
    "ip daddr 255.255.255.255 ",
    "ip6 daddr ff02::1:2 ",
    "ip6 daddr { fe80::/10, ff02::/16 } ",
    "ip6 daddr @onlink6 ",
    "ip daddr @lan4 ",
    "ip6 daddr @lan6 ",
)
# The kernel's answer to a forwarded packet that forward refused goes to that packet's sender:
# the only accept without a destination, fenced by conntrack (related to a connection the kernel
# never confirmed, which a program cannot make).
KERNEL_ANSWER = "ct state related ct direction reply ct status & confirmed == 0 "


def _accepting_paths(text: str, name: str) -> list[tuple[str, str]]:
    """(guard rule, accepting rule) for every accept reachable from chain ``name``, one jump deep."""
    paths = []
    for rule in chain(text, name):
        if rule.endswith(" accept") or rule == "accept":
            paths.append(("", rule))
        elif " jump " in rule:
            target = rule.rsplit(" jump ", 1)[1]
            paths += [(rule, r) for r in chain(text, target) if r.endswith("accept")]
    return paths


@settings(max_examples=300, deadline=None)
@given(policies)
def test_no_accept_on_the_physical_side_without_a_destination_limit(policy):
    """Every accept in output and forward that is not into the tunnel or loopback names its
    destination; the only exceptions are WireGuard with the fwmark, to exact endpoints, and the
    kernel's reject of a refused forwarded packet."""
    text = render(policy)
    tun = f'oifname "{policy.tunnel_interface}" jump to_tunnel'
    mark = f"meta mark 0x{policy.fwmark:08x} "
    for name in ("output", "forward"):
        for guard, rule in _accepting_paths(text, name):
            if guard == tun or rule == "oif lo accept":
                continue
            if name == "forward" and rule.startswith(
                f'iifname "{policy.tunnel_interface}" ct state established'
            ):
                continue  # into this host's forward path from the tunnel: replies, not out
            if name == "forward" and rule == BRIDGE_LOCAL_RULE:
                continue  # in and out of the same bridge with no uplink: stays on the host
            if rule.startswith(mark) and (
                "ip daddr . udp dport @endpoints4" in rule or "ip6 daddr . udp dport @endpoints6" in rule
            ):
                continue
            if guard.startswith(KERNEL_ANSWER) and guard.endswith("jump forward_reject"):
                assert name == "output"
                continue
            if name == "output" and policy.admin_tcp and rule == ADMIN_OUT:
                continue  # the administrator's replies: bounded by the mark, not the destination
            assert rule.startswith(DESTINATION_LIMITS), f"{name}: accept without a destination limit: {rule}"


@settings(max_examples=300, deadline=None)
@given(policies)
def test_lan_sets_hold_only_on_link_or_link_scoped_parts_of_the_configured_ranges(policy):
    text = render(policy)
    link_scoped = [ip_network(n) for n in ("169.254.0.0/16", "224.0.0.0/4", "fe80::/10", "ff00::/8")]
    for set_name in ("lan4", "lan6"):
        found = re.search(rf"set {set_name} {{[^}}]*?elements = {{ ([^}}]*) }}", text)
        for element in found.group(1).split(", ") if found else []:
            net = ip_network(element)
            assert any(net.version == r.version and net.subnet_of(r) for r in policy.lan_ranges), net
            assert any(
                net.version == o.version and net.subnet_of(o) for o in (*policy.onlink, *link_scoped)
            ), f"{net} is neither on-link nor link-scoped"


def test_off_link_private_ranges_are_left_out_of_the_lan():
    policy = LockPolicy(
        table="t",
        tunnel_interface="tl0",
        fwmark=1,
        allow_lan=True,
        lan_ranges=tuple(ip_network(n) for n in ("10.0.0.0/8", "192.168.0.0/16", "fc00::/7", "fe80::/10")),
        onlink=tuple(ip_network(n) for n in ("192.168.1.0/24", "2001:db8:c::/64", "fe80::/64")),
    )
    text = render(policy)
    assert "set lan4 { type ipv4_addr; flags interval; elements = { 192.168.1.0/24 } }" in text
    assert "set lan6 { type ipv6_addr; flags interval; elements = { fe80::/10 } }" in text
    assert fingerprint(policy) == fingerprint(replace(policy, onlink=()))


def test_forwarded_dns_is_refused_with_a_reset_and_the_refusal_may_leave():
    rules = chain(render(BASE), "forward")
    assert 'tcp dport 53 counter name "blocked_dns" reject with tcp reset' in rules
    assert chain(render(BASE), "forward_reject") == [
        "ip length 40 tcp flags & rst == rst accept",
        "ip6 length 20 tcp flags & rst == rst accept",
        "icmp type destination-unreachable accept",
        "icmpv6 type destination-unreachable accept",
    ]


def test_tunnel_accepts_only_replies_and_the_ports_asked_for():
    policy = LockPolicy(
        table="tunlock",
        tunnel_interface="tl0",
        fwmark=0xCA6C,
        tunnel_inbound=frozenset({("tcp", 51413), ("udp", 51413)}),
    )
    text = render(policy)
    inbound = chain(text, "input")
    assert 'iifname "tl0" accept' not in inbound
    assert 'iifname "tl0" jump from_tunnel' in inbound
    assert chain(text, "from_tunnel") == [
        "ct state established,related accept",
        "meta l4proto . th dport @tunnel_inbound accept",
        'counter name "blocked_in" drop',
    ]
    assert "elements = { tcp . 51413, udp . 51413 }" in text
    # Each forwarded port counts the connections it got (tunlock_forwarded_port_inbound_packets).
    assert "set tunnel_inbound { type inet_proto . inet_service; counter; elements = {" in text
    assert "set tunnel_inbound { type inet_proto . inet_service; counter;" in render_owned(policy)


def test_tunnel_inbound_swap_is_element_changes_in_one_script():
    script = render_tunnel_inbound_swap("tunlock", {("tcp", 1000), ("udp", 1000)}, {("tcp", 2000)})
    assert script.splitlines() == [
        "add element inet tunlock tunnel_inbound { tcp . 2000 }",
        "delete element inet tunlock tunnel_inbound { tcp . 1000, udp . 1000 }",
    ]
    assert render_tunnel_inbound_swap("tunlock", {("tcp", 1)}, {("tcp", 1)}) == ""


def test_owned_twin_carries_the_same_policy_under_its_own_name_with_the_owner_flag():
    ordinary, owned = render(BASE), render_owned(BASE)
    assert owned_table("tunlock") == "tunlock_owned"
    assert owned.splitlines()[:5] == [
        "add table inet tunlock_owned { flags owner; }",  # the flag here too, or the kernel refuses
        "delete table inet tunlock_owned",
        "table inet tunlock_owned {",
        "\tflags owner",
        f'\tcomment "tunlock lock {fingerprint(BASE)}"',
    ]

    # Same body, line for line: only the header differs.
    def inet_body(text: str) -> str:
        return text.split("\tcomment", 1)[1].split("add table netdev", 1)[0]

    assert inet_body(ordinary) == inet_body(owned)
    assert "flags owner" not in ordinary


def test_owning_context_scripts_change_both_tables_in_one_transaction():
    # The twin registered first, so the ordinary table runs first and its counters count.
    assert apply_script(BASE) == render_owned(BASE) + render(BASE)
    new = frozenset({EP1, Endpoint(ip_address("203.0.113.5"), 51820)})
    swap = swap_script(BASE, BASE.endpoints, new).splitlines()
    assert swap == [
        "add element inet tunlock endpoints4 { 203.0.113.5 . 51820 }",
        "delete element inet tunlock endpoints6 { 2001:db8:100::12 . 51821 }",
        "add element inet tunlock_owned endpoints4 { 203.0.113.5 . 51820 }",
        "delete element inet tunlock_owned endpoints6 { 2001:db8:100::12 . 51821 }",
    ]
    assert swap_script(BASE, BASE.endpoints, BASE.endpoints) == ""
    assert remove_script("tunlock").splitlines() == [
        "add table inet tunlock",
        "delete table inet tunlock",
        "add table netdev tunlock",
        "delete table netdev tunlock",
        "add table inet tunlock_owned { flags owner; }",
        "delete table inet tunlock_owned",
        "add table netdev tunlock_owned { flags owner; }",
        "delete table netdev tunlock_owned",
    ]
    assert tunnel_inbound_swap_script(BASE, frozenset(), frozenset({("tcp", 51413)})).splitlines() == [
        "add element inet tunlock tunnel_inbound { tcp . 51413 }",
        "add element inet tunlock_owned tunnel_inbound { tcp . 51413 }",
    ]
    assert probe_script("tunlock").splitlines() == [
        "add table inet tunlock_ownercheck { flags owner; }",
        "delete table inet tunlock_ownercheck",
    ]


def test_the_tunnels_own_addresses_are_never_lan_even_inside_an_on_link_range():
    """A LAN handing out 10.99.0.0/16 holds the tunnel's resolver and address (issue 21)."""
    policy = LockPolicy(
        table="t",
        tunnel_interface="tl0",
        fwmark=1,
        allow_lan=True,
        lan_ranges=(ip_network("10.0.0.0/8"),),
        onlink=(ip_network("10.99.0.0/16"),),
        tunnel_dns=frozenset({ip_address("10.99.0.1")}),
        tunnel_prefixes=frozenset({ip_network("10.99.0.2/32")}),
        tunnel_targets=frozenset({ip_address("10.99.7.7")}),
    )
    lan4 = re.search(r"set lan4 \{.*elements = \{ (.*) \} \}", render(policy))
    assert lan4 is not None
    lan = [ip_network(n) for n in lan4.group(1).split(", ")]
    for owned in ("10.99.0.1", "10.99.0.2", "10.99.7.7"):
        assert not any(ip_address(owned) in n for n in lan), owned
    assert ip_address("10.99.0.3") in lan[0] or any(ip_address("10.99.0.3") in n for n in lan)
    assert sum(n.num_addresses for n in lan) == 2**16 - 3


def test_nothing_from_the_tunnels_own_addresses_goes_to_the_lan():
    policy = LockPolicy(
        table="t",
        tunnel_interface="tl0",
        fwmark=1,
        allow_lan=True,
        lan_ranges=(ip_network("10.0.0.0/8"),),
        onlink=(ip_network("10.99.0.0/16"),),
        tunnel_prefixes=frozenset({ip_network("10.99.0.2/32"), ip_network("fd00:99::2/128")}),
    )
    rules = chain(render(policy), "output")
    refuse4 = 'ip saddr { 10.99.0.2/32 } counter name "blocked_out" reject'
    refuse6 = 'ip6 saddr { fd00:99::2/128 } counter name "blocked_out" reject'
    assert rules.index(refuse4) < rules.index("ip daddr @lan4 accept")
    assert rules.index(refuse6) < rules.index("ip6 daddr @lan6 accept")
    assert not any("saddr" in r for r in chain(render(replace(policy, allow_lan=False)), "output"))


def test_no_admin_path_unless_asked():
    text = render(BASE)
    assert "admin_" not in text and "ct mark" not in text and "meta mark set" not in text


ADMIN = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C, admin_tcp=(22,))


def test_admin_connections_are_marked_only_when_opened_from_outside_to_an_admin_port():
    marking = chain(render(ADMIN), "admin_mark")
    assert marking == [
        "type filter hook prerouting priority mangle; policy accept;",
        'iifname != { "lo", "tl0" } fib daddr type local tcp dport @admin_tcp '
        "ct direction original ct state new ct mark set 0x746c0022",
        "ct mark 0x746c0022 meta mark set ct mark",
    ]
    assert "set admin_tcp { type inet_service; elements = { 22 } }" in render(ADMIN)


def test_only_marked_replies_from_an_admin_port_leave_and_are_routed_by_their_mark():
    text = render(ADMIN)
    output = chain(text, "output")
    admin_rules = [r for r in output if "0x746c0022" in r or "admin_" in r]
    assert admin_rules == [ADMIN_OUT]
    assert output.index(ADMIN_OUT) > output.index("ct state invalid drop")
    route = chain(text, "admin_route")
    assert route[0] == "type route hook output priority mangle; policy accept;"
    assert route[-1] == "ct mark 0x746c0022 tcp sport @admin_tcp meta mark set ct mark"
    # An administrator's session older than the lock, first seen from this side: root's socket,
    # no SYN (a new connection from port 22 never qualifies).
    pickup = route[1]
    assert "tcp flags & (syn | rst) == 0" in pickup and "meta skuid 0" in pickup
    assert "ct direction original" in pickup and pickup.endswith("ct mark set 0x746c0022")
    assert chain(text, "input")[4:6] == [
        "ct mark 0x746c0022 tcp dport @admin_tcp accept",
        "ct mark 0x746c0022 ct state related meta l4proto { icmp, icmpv6 } accept",
    ]


def test_admin_chains_never_accept_or_drop_on_their_own():
    text = render(LockPolicy(table="t", tunnel_interface="tl0", fwmark=1, admin_tcp=(22, 2222)))
    for name in ("admin_mark", "admin_route"):
        rules = chain(text, name)
        assert rules[0].endswith("policy accept;")
        assert not any(word in r for r in rules[1:] for word in ("accept", "drop", "reject", "jump"))


def test_admin_sources_restrict_each_family_and_a_family_without_sources_gets_none():
    policy = LockPolicy(
        table="t",
        tunnel_interface="tl0",
        fwmark=1,
        admin_tcp=(22,),
        admin_sources=(ip_network("203.0.113.0/24"),),
    )
    text = render(policy)
    marking = [r for r in chain(text, "admin_mark") if "ct mark set" in r]
    assert len(marking) == 1 and "ip saddr @admin_sources4" in marking[0]
    pickup = [r for r in chain(text, "admin_route") if "ct mark set" in r]
    assert len(pickup) == 1 and "ip daddr @admin_sources4" in pickup[0]
    assert "set admin_sources4 { type ipv4_addr; flags interval; elements = { 203.0.113.0/24 } }" in text
    assert "set admin_sources6 { type ipv6_addr; flags interval; }" in text


def test_the_owned_twin_and_the_boot_file_carry_the_admin_path():
    assert chain(render_owned(ADMIN), "admin_mark") == chain(render(ADMIN), "admin_mark")
    assert chain(render_owned(ADMIN), "admin_route") == chain(render(ADMIN), "admin_route")
    assert fingerprint(ADMIN) != fingerprint(BASE)


# The egress chain (netdev family) on the physical uplinks: every frame leaving them passes it,
# a macvlan child's or a bridged VM's included, which never pass the inet hooks.
EGRESS = LockPolicy(
    table="tunlock",
    tunnel_interface="tl0",
    fwmark=0xCA6C,
    endpoints=frozenset({EP1, EP2}),
    egress_devices=("eth0", "eth1"),
)


def test_the_egress_table_goes_in_the_same_transaction_on_every_uplink():
    text = render(EGRESS)
    lines = text.splitlines()
    netdev = lines.index("add table netdev tunlock")
    assert lines[netdev : netdev + 3] == [
        "add table netdev tunlock",
        "delete table netdev tunlock",
        "table netdev tunlock {",
    ]
    rules = chain(text, "egress")
    assert rules[0] == 'type filter hook egress devices = { "eth0", "eth1" } priority filter; policy drop;'
    assert rules[-1] == f'counter name "{EGRESS_COUNTER}" drop'
    assert "meta mark 0x0000ca6c ip daddr . udp dport @endpoints4 accept" in rules
    assert "meta mark 0x0000ca6c ip6 daddr . udp dport @endpoints6 accept" in rules
    assert "elements = { 198.51.100.11 . 51820 }" in text.split("table netdev tunlock {", 1)[1]


def test_without_uplinks_a_stale_egress_table_is_removed_and_none_is_made():
    text = render(BASE)
    assert text.endswith("add table netdev tunlock\ndelete table netdev tunlock\n")
    assert "hook egress" not in text


@settings(max_examples=300, deadline=None)
@given(policies)
def test_egress_accepts_only_arp_wireguard_and_what_output_lets_out_by_destination(policy):
    """Stateless (the netdev family has no conntrack): every accept names a destination the
    output chain also allows, or is ARP, or marked WireGuard to an exact endpoint."""
    text = render(policy)
    if not policy.egress_devices:
        assert "hook egress" not in text
        return
    rules = chain(text, "egress")
    assert rules[0].endswith("policy drop;")
    mark = f"meta mark 0x{policy.fwmark:08x} "
    for rule in rules[1:]:
        if not rule.endswith("accept"):
            continue
        if rule == "meta protocol arp accept":
            continue
        if rule.startswith(mark) and "daddr . udp dport @endpoints" in rule:
            continue
        if rule.startswith(f"meta mark {ADMIN_MARK_TEXT} ") and rule.endswith("tcp sport @admin_tcp accept"):
            continue  # the administrator's replies: the mark output's route chain set on them
        assert rule.startswith(DESTINATION_LIMITS), f"egress: accept without a destination limit: {rule}"
        assert "ct " not in rule
        assert policy.allow_lan or policy.link_upkeep or "tcp sport" in rule, rule


def test_owned_twin_has_its_own_owned_egress_table():
    owned = render_owned(EGRESS)
    assert "add table netdev tunlock_owned { flags owner; }\ndelete table netdev tunlock_owned\n" in owned
    assert "table netdev tunlock_owned {\n\tflags owner\n" in owned


def test_endpoint_swaps_cover_the_egress_sets_when_the_chain_is_there():
    new = frozenset({EP1, Endpoint(ip_address("203.0.113.5"), 51820)})
    assert swap_script(EGRESS, EGRESS.endpoints, new).splitlines() == [
        "add element inet tunlock endpoints4 { 203.0.113.5 . 51820 }",
        "delete element inet tunlock endpoints6 { 2001:db8:100::12 . 51821 }",
        "add element netdev tunlock endpoints4 { 203.0.113.5 . 51820 }",
        "delete element netdev tunlock endpoints6 { 2001:db8:100::12 . 51821 }",
        "add element inet tunlock_owned endpoints4 { 203.0.113.5 . 51820 }",
        "delete element inet tunlock_owned endpoints6 { 2001:db8:100::12 . 51821 }",
        "add element netdev tunlock_owned endpoints4 { 203.0.113.5 . 51820 }",
        "delete element netdev tunlock_owned endpoints6 { 2001:db8:100::12 . 51821 }",
    ]


def test_the_links_read_at_apply_leave_the_fingerprint_alone():
    assert fingerprint(EGRESS) == fingerprint(BASE)
    assert fingerprint(replace(BASE, bridges=("docker0",))) == fingerprint(BASE)


def test_forward_lets_through_traffic_that_stays_on_one_of_the_hosts_bridges():
    """br_netfilter hands a frame bridged between two containers to the inet forward hook, with
    the bridge as input and output: only the same bridge on both sides, never another device."""
    text = render(replace(BASE, bridges=("docker0", "br-1a2b")))
    elements = '{ "br-1a2b" . "br-1a2b", "docker0" . "docker0" }'
    assert f"set bridge_local {{ type ifname . ifname; elements = {elements} }}" in text
    rules = chain(text, "forward")
    assert BRIDGE_LOCAL_RULE == "iifname . oifname @bridge_local accept"
    assert rules.index(BRIDGE_LOCAL_RULE) < rules.index(
        'counter name "blocked_forward" reject with icmpx admin-prohibited'
    )
    assert "set bridge_local { type ifname . ifname; }" in render(BASE)


@settings(max_examples=200, deadline=None)
@given(policies)
def test_every_way_out_of_output_is_also_a_way_out_of_egress(policy):
    """The host's own packets pass output first, then egress: an accept on the physical side in
    output that egress lacks would drop the host's traffic (its SSH replies, its WireGuard). So a
    rule added to output must come to egress too, statelessly (the netdev family has no ct);
    only the kernel's answer to a refused forwarded packet stays behind (see render.py)."""
    if not policy.egress_devices:
        return
    text = render(policy)
    egress = set(chain(text, "egress"))
    tun = f'oifname "{policy.tunnel_interface}" jump to_tunnel'
    for rule in chain(text, "output"):
        if not rule.endswith("accept") or rule == "oif lo accept" or rule == tun:
            continue
        if rule.startswith(f"ct mark {ADMIN_MARK_TEXT} "):
            # Egress has no ct: it knows the administrator's replies by the packet mark that the
            # route chain copies from the connection's mark (and by their destination).
            assert any(
                r.startswith(f"meta mark {ADMIN_MARK_TEXT} ") and r.endswith("tcp sport @admin_tcp accept")
                for r in egress
            ), f"output lets out what egress drops: {rule}"
            continue
        stateless = re.sub(r" ct state [a-z,]+", "", rule)
        assert stateless in egress, f"output lets out what egress drops: {rule}"


def test_the_boot_file_and_the_fallback_do_not_touch_the_netdev_family():
    text = render(replace(BASE, netdev=False))
    assert "netdev" not in text
    assert text.startswith("add table inet tunlock\n")


@settings(max_examples=200, deadline=None)
@given(policies)
def test_the_egress_table_sets_hold_what_the_inet_sets_of_the_same_name_hold(policy):
    """The egress rules name sets of their own table: each must hold what its inet namesake
    holds, or the host's own packets (which pass both) are refused by one of them."""
    if not policy.egress_devices:
        return
    inet, netdev = render(policy).split(f"table netdev {policy.table} {{", 1)
    for name in re.findall(r"\tset (\w+) \{", netdev):
        declared = re.compile(rf"\tset {name} \{{[^\n]*\}}")
        in_netdev, in_inet = declared.search(netdev), declared.search(inet)
        assert in_netdev is not None and in_inet is not None, name
        assert in_netdev.group(0) == in_inet.group(0), name


# As nft 1.0.6 lists it (with tabs; the parsing does not depend on them).
LISTED_INBOUND = """table inet tunlock {
    comment "tunlock lock 0123456789abcdef"
    set tunnel_inbound {
        type inet_proto . inet_service
        counter
        elements = { tcp . 40001 counter packets 3 bytes 180,
                 udp . 40001 counter packets 0 bytes 0 }
    }
    counter blocked_in {
        packets 2 bytes 80
    }
}
"""


def test_a_reading_counts_the_packets_of_each_forwarded_port_apart_from_the_refused_ones():
    from supervisor.lock.nft import parse_reading
    from supervisor.lock.state import LockState

    listed, counters = parse_reading(LISTED_INBOUND)
    assert "packets 3" not in listed, "a tamper check compares the listing with its counters zeroed"
    state = LockState(installed=True, counters=counters)
    assert state.counters == {"blocked_in": 2}
    assert state.inbound == {"40001/tcp": 3, "40001/udp": 0}
