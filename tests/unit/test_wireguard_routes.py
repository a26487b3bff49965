"""The policy routing plan: wg-quick's full tunnel, as data."""

from __future__ import annotations

import socket
from ipaddress import ip_network

from supervisor.net.routes import FIB_RULE_INVERT, MAIN_TABLE, FullTunnelRouting, RuleSpec


class DumpedRule:
    """A rule as an rtnetlink dump hands it over (the parts RuleSpec.matches reads)."""

    def __init__(self, family: int, table: int, flags: int = 0, **attrs: int) -> None:
        self._fields = {"family": family, "table": table if table < 256 else 252, "flags": flags}
        self._attrs = {"FRA_TABLE": table, **attrs}

    def __getitem__(self, key: str) -> int:
        return self._fields[key]

    def get_attr(self, name: str) -> int | None:
        return self._attrs.get(name)


ROUTING = FullTunnelRouting("tl0", table=51820, fwmark=0xCA6C, priority=32760)


def test_rules_are_wg_quicks_suppress_then_not_fwmark_for_each_family() -> None:
    assert ROUTING.rules() == [
        RuleSpec(4, 32758, MAIN_TABLE, fwmark=0xCA6C),
        RuleSpec(4, 32760, MAIN_TABLE, suppress_prefixlength=0),
        RuleSpec(4, 32761, 51820, fwmark=0xCA6C, invert=True),
        RuleSpec(6, 32758, MAIN_TABLE, fwmark=0xCA6C),
        RuleSpec(6, 32760, MAIN_TABLE, suppress_prefixlength=0),
        RuleSpec(6, 32761, 51820, fwmark=0xCA6C, invert=True),
    ]


def test_requests_carry_the_invert_flag_and_a_full_mask() -> None:
    suppress, tunnel = ROUTING.rules()[1:3]
    assert tunnel.request() == {
        "family": socket.AF_INET,
        "priority": 32761,
        "table": 51820,
        "action": "to_tbl",
        "fwmark": 0xCA6C,
        "fwmask": 0xFFFFFFFF,
        "flags": FIB_RULE_INVERT,
    }
    assert suppress.request()["suppress_prefixlen"] == 0 and "flags" not in suppress.request()


def test_a_dump_is_recognised_by_content() -> None:
    suppress, tunnel = ROUTING.rules()[1:3]
    ours = DumpedRule(socket.AF_INET, 51820, FIB_RULE_INVERT, FRA_PRIORITY=32761, FRA_FWMARK=0xCA6C)
    assert tunnel.matches(ours)
    assert not suppress.matches(ours)
    not_inverted = DumpedRule(socket.AF_INET, 51820, 0, FRA_PRIORITY=32761, FRA_FWMARK=0xCA6C)
    assert not tunnel.matches(not_inverted)  # "fwmark X lookup T" is another rule altogether
    other_family = DumpedRule(socket.AF_INET6, 51820, FIB_RULE_INVERT, FRA_PRIORITY=32761, FRA_FWMARK=0xCA6C)
    assert not tunnel.matches(other_family)
    dumped_suppress = DumpedRule(socket.AF_INET, MAIN_TABLE, FRA_PRIORITY=32760, FRA_SUPPRESS_PREFIXLEN=0)
    assert suppress.matches(dumped_suppress)
    main_rule = DumpedRule(socket.AF_INET, MAIN_TABLE, FRA_PRIORITY=32766, FRA_SUPPRESS_PREFIXLEN=0xFFFFFFFF)
    assert not suppress.matches(main_rule)


def test_ipv4_only_routing_has_no_ipv6_rules() -> None:
    assert {r.family for r in FullTunnelRouting("tl0", 51820, 1, families=(4,)).rules()} == {4}


OWNED = FullTunnelRouting(
    "tl0",
    table=51820,
    fwmark=0xCA6C,
    priority=32760,
    owned=(ip_network("10.99.0.1/32"), ip_network("fd00:99::/64")),
    sources=(ip_network("10.99.0.2/32"),),
    unreachable=(6,),
)


def test_the_tunnels_own_prefixes_are_routed_into_it_before_the_main_table() -> None:
    """A LAN route holding the tunnel's resolver must not win over the tunnel (issue 21)."""
    rules = OWNED.rules()
    owned = [r for r in rules if r.dst is not None]
    replies = [r for r in rules if r.src is not None]
    assert [(r.family, str(r.src), r.priority, r.table) for r in replies] == [
        (4, "10.99.0.2/32", 32759, 51820)
    ]
    assert [(r.family, str(r.dst)) for r in owned] == [(4, "10.99.0.1/32"), (6, "fd00:99::/64")]
    assert all(r.priority == 32759 and r.table == 51820 and not r.invert and r.fwmark is None for r in owned)
    suppress = next(r for r in rules if r.suppress_prefixlength == 0)
    assert all(r.priority < suppress.priority for r in owned)
    request = owned[0].request()
    assert request["dst"] == "10.99.0.1" and request["dst_len"] == 32 and "flags" not in request
    # WireGuard's own packets are looked up in the main table before any owned prefix.
    marked = [r for r in rules if r.fwmark == 0xCA6C and not r.invert]
    assert [(r.family, r.priority, r.table) for r in marked] == [(f, 32758, MAIN_TABLE) for f in (4, 6)]


def test_a_family_without_a_tunnel_address_gets_an_unreachable_default() -> None:
    v4 = OWNED._default_route(4, 7)
    v6 = OWNED._default_route(6, 7)
    assert v4["oif"] == 7 and "type" not in v4
    assert v6["type"] == "unreachable" and "oif" not in v6
