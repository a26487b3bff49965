"""Rendering a LockPolicy into one nft transaction (pure: text in, text out).

One ``inet`` table holds IPv4 and IPv6 together. Every base chain drops by
default; what is accepted, in order:

output
  1. loopback.
  2. into the tunnel interface (matched by name, so the rule holds before the
     interface exists and after it is recreated): its own chain, which accepts
     everything but DNS to anything other than the tunnel's resolvers.
  3. invalid conntrack state: dropped.
  4. WireGuard itself: UDP to an allowed endpoint's exact address and port, and
     only from packets carrying the tunnel's fwmark (set by the tunnel on its
     own socket; setting a mark needs CAP_NET_ADMIN, so an ordinary program
     cannot forge it).
  5. DNS (UDP and TCP port 53) anywhere else, the LAN included: rejected and
     counted, so a program's fallback resolver fails at once instead of leaking.
  6. link upkeep: DHCPv4/DHCPv6 client requests; router and neighbour
     solicitations and neighbour advertisements with hop limit 255 (link-local
     by construction).
  7. with allow_lan: the LAN ranges; with inbound_tcp: replies from those ports
     to the LAN.
  8. the rest is rejected (a program fails fast instead of hanging) and counted.

input mirrors it (replies from endpoints as established; DHCP offers; router
advertisements, neighbour messages and redirects with hop limit 255; the tunnel;
the LAN with allow_lan; inbound_tcp ports from the LAN) and drops the rest;
forward lets traffic out only through the tunnel and replies back in, so a host
routing for containers or a LAN cannot leak their packets either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from supervisor.lock.policy import LockPolicy
from supervisor.servers import Endpoint

# Named counters, read back by `tunlock lock status` and the metrics.
COUNTERS = ("blocked_out", "blocked_in", "blocked_forward", "blocked_dns")
ENDPOINT_SETS = {4: "endpoints4", 6: "endpoints6"}


def _quote(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


def _elements(items: Iterable[str]) -> str:
    items = sorted(items)
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def _endpoint_element(ep: Endpoint) -> str:
    return f"{ep.host} . {ep.port}"


def fingerprint(policy: LockPolicy) -> str:
    """A short digest of the rendered policy, stored in the table's comment."""
    return hashlib.sha256(_table_body(policy).encode()).hexdigest()[:16]


def render(policy: LockPolicy) -> str:
    """One nft transaction that installs or replaces the table; nothing in between.

    ``add table`` makes the ``delete`` valid when the table is absent; the kernel applies
    the three statements as one transaction, so the old table is in force until the new
    one is, and a failure leaves the old table untouched.
    """
    name = policy.table
    return (
        f"add table inet {name}\n"
        f"delete table inet {name}\n"
        f"table inet {name} {{\n"
        f"\tcomment {_quote('tunlock lock ' + fingerprint(policy))}\n"
        f"{_table_body(policy)}"
        f"}}\n"
    )


def render_endpoint_swap(table: str, old: Iterable[Endpoint], new: Iterable[Endpoint]) -> str:
    """Add ``new`` and drop ``old`` endpoints in one transaction: no gap, never a wildcard."""
    old, new = set(old), set(new)
    lines = []
    for family, set_name in ENDPOINT_SETS.items():
        add = [_endpoint_element(e) for e in new - old if e.family == family]
        drop = [_endpoint_element(e) for e in old - new if e.family == family]
        if add:
            lines.append(f"add element inet {table} {set_name} {{ {', '.join(sorted(add))} }}")
        if drop:
            lines.append(f"delete element inet {table} {set_name} {{ {', '.join(sorted(drop))} }}")
    return "\n".join(lines) + ("\n" if lines else "")


def _table_body(policy: LockPolicy) -> str:
    tun = _quote(policy.tunnel_interface)
    v4 = [e for e in policy.endpoints if e.family == 4]
    v6 = [e for e in policy.endpoints if e.family == 6]
    dns4 = [str(a) for a in policy.tunnel_dns if a.version == 4]
    dns6 = [str(a) for a in policy.tunnel_dns if a.version == 6]
    lan4 = [str(n) for n in policy.lan_ranges if n.version == 4]
    lan6 = [str(n) for n in policy.lan_ranges if n.version == 6]
    ports = ", ".join(str(p) for p in sorted(policy.inbound_tcp))
    mark = f"0x{policy.fwmark:08x}"

    out: list[str] = []
    add = out.append
    add(f"\tset endpoints4 {{ type ipv4_addr . inet_service;{_elements(map(_endpoint_element, v4))} }}")
    add(f"\tset endpoints6 {{ type ipv6_addr . inet_service;{_elements(map(_endpoint_element, v6))} }}")
    add(f"\tset tunnel_dns4 {{ type ipv4_addr;{_elements(dns4)} }}")
    add(f"\tset tunnel_dns6 {{ type ipv6_addr;{_elements(dns6)} }}")
    add(f"\tset lan4 {{ type ipv4_addr; flags interval;{_elements(lan4)} }}")
    add(f"\tset lan6 {{ type ipv6_addr; flags interval;{_elements(lan6)} }}")
    for counter in COUNTERS:
        add(f"\tcounter {counter} {{ }}")

    # Traffic into the tunnel is nearly all of it: one name check sends it to its own chain,
    # where only DNS to a non-tunnel resolver is refused (bulk throughput pays ~1 % for the lock).
    add("\tchain to_tunnel {")
    add("\t\tmeta l4proto { tcp, udp } th dport 53 jump tunnel_dns")
    add("\t\taccept")
    add("\t}")
    add("\tchain tunnel_dns {")
    add("\t\tip daddr @tunnel_dns4 accept")
    add("\t\tip6 daddr @tunnel_dns6 accept")
    add('\t\tcounter name "blocked_dns" reject')
    add("\t}")

    add("\tchain output {")
    add("\t\ttype filter hook output priority filter; policy drop;")
    add("\t\toif lo accept")
    add(f"\t\toifname {tun} jump to_tunnel")
    add("\t\tct state invalid drop")
    add(f"\t\tmeta mark {mark} ip daddr . udp dport @endpoints4 accept")
    add(f"\t\tmeta mark {mark} ip6 daddr . udp dport @endpoints6 accept")
    add('\t\tmeta l4proto { tcp, udp } th dport 53 counter name "blocked_dns" reject')
    if policy.link_upkeep:
        add("\t\tudp sport 68 udp dport 67 accept")
        add("\t\tip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept")
        add(
            "\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } "
            "ip6 hoplimit 255 accept"
        )
    if policy.allow_lan:
        add("\t\tip daddr @lan4 accept")
        add("\t\tip6 daddr @lan6 accept")
    if ports:
        add(f"\t\tip daddr @lan4 tcp sport {{ {ports} }} ct state established accept")
        add(f"\t\tip6 daddr @lan6 tcp sport {{ {ports} }} ct state established accept")
    add('\t\tcounter name "blocked_out" reject with icmpx admin-prohibited')
    add("\t}")

    add("\tchain input {")
    add("\t\ttype filter hook input priority filter; policy drop;")
    add("\t\tiif lo accept")
    add(f"\t\tiifname {tun} accept")
    add("\t\tct state invalid drop")
    add("\t\tip saddr . udp sport @endpoints4 ct state established accept")
    add("\t\tip6 saddr . udp sport @endpoints6 ct state established accept")
    if policy.link_upkeep:
        add("\t\tudp sport 67 udp dport 68 accept")
        add("\t\tip6 saddr fe80::/10 udp sport 547 udp dport 546 accept")
        add(
            "\t\ticmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } "
            "ip6 hoplimit 255 accept"
        )
    if policy.allow_lan:
        add("\t\tip saddr @lan4 accept")
        add("\t\tip6 saddr @lan6 accept")
    if ports:
        add(f"\t\tip saddr @lan4 tcp dport {{ {ports} }} accept")
        add(f"\t\tip6 saddr @lan6 tcp dport {{ {ports} }} accept")
    add('\t\tcounter name "blocked_in" drop')
    add("\t}")

    add("\tchain forward {")
    add("\t\ttype filter hook forward priority filter; policy drop;")
    add(f"\t\toifname {tun} jump to_tunnel")
    add("\t\tct state invalid drop")
    add(f"\t\tiifname {tun} ct state established,related accept")
    add('\t\tmeta l4proto { tcp, udp } th dport 53 counter name "blocked_dns" reject')
    add('\t\tcounter name "blocked_forward" reject with icmpx admin-prohibited')
    add("\t}")
    return "\n".join(out) + "\n"
