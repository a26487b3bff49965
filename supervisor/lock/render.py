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
  6. a reject this host generated for a forwarded packet (see below).
  7. link upkeep, each bound to a destination that never leaves the link:
     DHCPv4 requests only to 255.255.255.255, DHCPv6 only to ff02::1:2,
     router/neighbour solicitations and neighbour advertisements (hop limit
     255) only to link-local (fe80::/10), link-scope multicast (ff02::/16) and
     the physical links' own on-link subnets (``onlink6``).
  8. with allow_lan: the LAN ranges that are on-link (``lan4``/``lan6``: the
     configured ranges intersected, when the lock is applied, with the on-link
     subnets of the host's interfaces; link-local and multicast ranges are
     on-link by nature), less the tunnel's own addresses (``tunnel_owned``),
     and nothing from the tunnel's own addresses (``tunnel_prefixes``);
     with inbound_tcp: replies from those ports to them.
  9. the rest is rejected (a program fails fast instead of hanging) and counted.

The holes link upkeep leaves, and why each is needed (a program with
CAP_NET_RAW, CAP_NET_BIND_SERVICE or a low ``ip_unprivileged_port_start`` can
put data in any of them, so each is limited to where the data stays on the link):

* DHCPv4 (UDP 68 -> 67, to 255.255.255.255): getting and keeping a lease on the
  physical link. Unicast renewal (RFC 2131 RENEWING, to the lease's server) is
  not let through: the lock does not know the lease's server, and a rule for
  "any unicast :67" is the hole the audit used. A client whose unicast renewal
  fails broadcasts a REBIND at T2 (7/8 of the lease), which keeps the lease; a
  limited broadcast is never forwarded by a router. Still allowed: data in a
  broadcast datagram, seen by every host on the link, and by nothing beyond it.
* DHCPv6 (UDP 546 -> 547, to ff02::1:2): RFC 8415 clients send every message
  to that link-scope multicast address unless the server offered unicast
  (rare; not let through). Still allowed: data to the link's DHCP agents.
* NDP (RS, NS, NA; hop limit 255): without neighbour discovery no IPv6 packet,
  the tunnel's own included, reaches the router. Solicitations and answers go to
  multicast, to link-local addresses, and (unreachability detection and answers
  to a router that solicits from its global address) to on-link unicast
  addresses. Still allowed: data in an ICMPv6 ND message to a neighbour on the
  link. A packet to an off-link address would be routed onward by the gateway,
  which is what the destination limit forbids.

input mirrors it (replies from endpoints as established; DHCP offers; DHCPv6
replies from link-local sources; router advertisements, neighbour messages and
redirects with hop limit 255, which a router never forwards so they can only
come from the link; from the tunnel only replies and the (protocol, port) pairs of
the ``tunnel_inbound`` set, which a forwarded port joins and leaves by element
changes, the rest counted and dropped; the on-link LAN with allow_lan; inbound_tcp
ports from it) and drops the rest; input lets nothing leave, so its holes do
not carry data out. forward lets traffic out only through the tunnel and replies
back in, so a host routing for containers or a LAN cannot leak their packets
either.

With ``admin_tcp`` (the administrator's SSH on a server, ``_admin_*`` below): a TCP connection
from outside (``admin_sources``, default any) to an admin port of this host, arriving on a
non-tunnel interface, gets the conntrack mark ``ADMIN_MARK`` in prerouting; input accepts the
packets of marked connections to the admin ports; output accepts, on any non-tunnel interface,
only packets of marked connections from the admin ports; a route chain copies the mark to the
packet mark of those replies, which a policy rule (supervisor.net.admin_route) sends by the main
table, not into the tunnel. The mark is only ever set on a connection the other side opened: a
local program's own connection, to port 22 elsewhere or from a port it bound, carries no mark,
and neither does UDP. One exception, bounded: a session older than the lock that conntrack first
sees from this side (the lock is applied from inside it) is marked in output when its socket is
root's and its packet is no SYN, which only a connection already open can send.

Bridge-local traffic: with ``br_netfilter`` loaded (and ``bridge-nf-call-iptables`` on, the
default), a frame bridged between two ports of a bridge (two containers on one bridge) passes
the ``inet`` forward hook with the bridge as both input and output interface. forward lets it
through for the host's bridges that hold no uplink (``bridge_local``: read when the lock is
applied), so containers on one bridge still talk to each other; a bridge that holds an uplink is
left out, since bridging onto it is going out.

egress (``netdev`` family, one table of the same name, Linux >= 5.16): a chain on each physical
uplink (``egress_devices``, found when the lock is applied) that every frame leaving the device
passes, whoever sent it: the host's own (which already passed output), and those of a macvlan or
ipvlan child or of a VM bridged onto the uplink, which never pass the host's ``inet`` hooks. It
accepts what output accepts on the physical side, without connection tracking (``ct`` is not
available in the netdev family): ARP, WireGuard (the fwmark and an endpoint), link upkeep, the
on-link LAN with allow_lan, replies from the inbound_tcp ports to the on-link LAN; it drops the
rest and counts it (``blocked_egress``). Not carried over: the reject of a forwarded packet
(stateless, anything could be written in it), so a LAN host that routes through this host gets
a time-out instead of a refusal.

The reject of a forwarded packet (DNS from a container, say) is a packet this
host generates: the kernel sends it through the output hook, with the
connection of the packet it answers attached as ``related``. Without rule 6 the
output chain rejected the reject, and the container waited for a time-out
instead of failing at once. Rule 6 lets through only a TCP reset or an ICMP
destination-unreachable, related to a forwarded connection (``ct status`` not
``confirmed`` is how a connection refused in forward looks: it never got past
the hooks), so what leaves is an answer, with no payload of a local program's
choosing, to the host that sent the refused packet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from msgspec.structs import replace

from supervisor.lock.admin import ADMIN_MARK
from supervisor.lock.endpoint_sets import ENDPOINT_SETS, endpoint_element
from supervisor.lock.onlink import onlink_lan, widest
from supervisor.lock.policy import LockPolicy, exclude
from supervisor.servers import Endpoint, IPNetwork

# Named counters, read back by `tunlock lock status` and the metrics.
COUNTERS = ("blocked_out", "blocked_in", "blocked_forward", "blocked_dns")
# The egress chain's counter, in the netdev table of the same name (when it is in force).
EGRESS_COUNTER = "blocked_egress"
# Bridged between two ports of one of the host's own bridges (br_netfilter, see above).
BRIDGE_LOCAL_SET = "bridge_local"
BRIDGE_LOCAL_RULE = f"iifname . oifname @{BRIDGE_LOCAL_SET} accept"
TUNNEL_INBOUND_SET = "tunnel_inbound"

# Link upkeep in output, each rule bound to a destination that stays on the link (see above).
UPKEEP_OUT = (
    "ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
    "ip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept",
    "ip6 daddr { fe80::/10, ff02::/16 } icmpv6 type { nd-router-solicit, nd-neighbor-solicit, "
    "nd-neighbor-advert } ip6 hoplimit 255 accept",
    "ip6 daddr @onlink6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
)
# The answer to a forwarded packet that forward refused (see above): a bare reset or an
# unreachable, related to a connection the kernel never confirmed.
# Protocol names nft knows by itself (tcp, icmp, icmpv6): `ipv6-icmp` needs /etc/protocols,
# which minimal systems lack (Debian minbase, containers), and the boot lock would not load.
FORWARD_REJECT_RULE = (
    "ct state related ct direction reply ct status & confirmed == 0 "
    "meta l4proto { tcp, icmp, icmpv6 } jump forward_reject"
)
# A TCP connection refused with a reset fails at once; Linux takes an ICMPv6 unreachable in
# SYN-SENT as a soft error and retries after a second.
DNS_REJECT_TCP = 'tcp dport 53 counter name "blocked_dns" reject with tcp reset'


def _quote(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


def _elements(items: Iterable[str]) -> str:
    items = sorted(items)
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def fingerprint(policy: LockPolicy) -> str:
    """A short digest of the rendered policy, stored in the table's comment.

    The on-link subnets are left out: they are what the host's links looked like when the lock
    was applied, not what the config asks, and `tunlock lock status` compares with the config.
    """
    return hashlib.sha256(_table_body(replace(policy, onlink=(), bridges=())).encode()).hexdigest()[:16]


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
    ) + render_egress(policy, name)


def owned_table(table: str) -> str:
    """The name of the owned twin of ``table`` (held by the running daemon, see supervisor/lock/owner.py)."""
    return f"{table}_owned"


def render_owned(policy: LockPolicy) -> str:
    """The same policy as :func:`render`, in the owned twin table (``flags owner``).

    Only the daemon's own netlink socket can change or delete an owned table, and another
    program's ``nft flush ruleset`` leaves it alone. Its ``add table`` must carry the flag too:
    the kernel refuses to change an existing table's owner flag (EOPNOTSUPP).
    """
    name = owned_table(policy.table)
    return (
        f"add table inet {name} {{ flags owner; }}\n"
        f"delete table inet {name}\n"
        f"table inet {name} {{\n"
        f"\tflags owner\n"
        f"\tcomment {_quote('tunlock lock ' + fingerprint(policy))}\n"
        f"{_table_body(policy)}"
        f"}}\n"
    ) + render_egress(policy, name, owner=True)


def render_egress(policy: LockPolicy, name: str, *, owner: bool = False) -> str:
    """The ``netdev`` table ``name`` with the egress chain on ``policy.egress_devices``, or
    only its removal when there are none (the uplinks went away, or the kernel has no egress
    hook): part of the same transaction as the ``inet`` table."""
    if not policy.netdev:
        return ""
    flags = " { flags owner; }" if owner else ""
    head = f"add table netdev {name}{flags}\ndelete table netdev {name}\n"
    if not policy.egress_devices:
        return head
    return (
        f"{head}table netdev {name} {{\n"
        + ("\tflags owner\n" if owner else "")
        + f"\tcomment {_quote('tunlock egress ' + fingerprint(policy))}\n"
        f"{_egress_body(policy)}"
        f"}}\n"
    )


def render_endpoint_swap(
    table: str, old: Iterable[Endpoint], new: Iterable[Endpoint], *, egress: bool = False
) -> str:
    """Add ``new`` and drop ``old`` endpoints in one transaction: no gap, never a wildcard.
    ``egress``: the same in the ``netdev`` table of that name (when the egress chain is in force)."""
    old, new = set(old), set(new)
    lines = []
    for nft_family in ("inet", "netdev") if egress else ("inet",):
        for family, set_name in ENDPOINT_SETS.items():
            add = [endpoint_element(e) for e in new - old if e.family == family]
            drop = [endpoint_element(e) for e in old - new if e.family == family]
            if add:
                lines.append(f"add element {nft_family} {table} {set_name} {{ {', '.join(sorted(add))} }}")
            if drop:
                lines.append(
                    f"delete element {nft_family} {table} {set_name} {{ {', '.join(sorted(drop))} }}"
                )
    return "\n".join(lines) + ("\n" if lines else "")


def _inbound_element(item: tuple[str, int]) -> str:
    return f"{item[0]} . {item[1]}"


def render_tunnel_inbound_swap(
    table: str, old: Iterable[tuple[str, int]], new: Iterable[tuple[str, int]]
) -> str:
    """Open ``new`` and close ``old`` inbound ports on the tunnel in one transaction."""
    old, new = set(old), set(new)
    lines = []
    if new - old:
        items = ", ".join(sorted(map(_inbound_element, new - old)))
        lines.append(f"add element inet {table} {TUNNEL_INBOUND_SET} {{ {items} }}")
    if old - new:
        items = ", ".join(sorted(map(_inbound_element, old - new)))
        lines.append(f"delete element inet {table} {TUNNEL_INBOUND_SET} {{ {items} }}")
    return "\n".join(lines) + ("\n" if lines else "")


def _lan(policy: LockPolicy) -> tuple[IPNetwork, ...]:
    """The LAN the lock lets through: the on-link part of the LAN ranges, less the tunnel's own
    addresses, which are never LAN even inside a LAN range (issue 21, item 4)."""
    return exclude(onlink_lan(policy.lan_ranges, policy.onlink), policy.tunnel_owned)


def _table_body(policy: LockPolicy) -> str:
    tun = _quote(policy.tunnel_interface)
    v4 = [e for e in policy.endpoints if e.family == 4]
    v6 = [e for e in policy.endpoints if e.family == 6]
    dns4 = [str(a) for a in policy.tunnel_dns if a.version == 4]
    dns6 = [str(a) for a in policy.tunnel_dns if a.version == 6]
    lan = _lan(policy)
    lan4 = [str(n) for n in lan if n.version == 4]
    lan6 = [str(n) for n in lan if n.version == 6]
    onlink6 = [str(n) for n in widest(policy.onlink) if n.version == 6]
    ports = ", ".join(str(p) for p in sorted(policy.inbound_tcp))
    mark = f"0x{policy.fwmark:08x}"

    out: list[str] = []
    add = out.append
    add(f"\tset endpoints4 {{ type ipv4_addr . inet_service;{_elements(map(endpoint_element, v4))} }}")
    add(f"\tset endpoints6 {{ type ipv6_addr . inet_service;{_elements(map(endpoint_element, v6))} }}")
    add(f"\tset tunnel_dns4 {{ type ipv4_addr;{_elements(dns4)} }}")
    add(f"\tset tunnel_dns6 {{ type ipv6_addr;{_elements(dns6)} }}")
    inbound = map(_inbound_element, policy.tunnel_inbound)
    # A counter per forwarded port: the packets that opened a connection to it (the later ones
    # pass as established before the set is consulted), so that a port nobody reaches shows.
    add(f"\tset {TUNNEL_INBOUND_SET} {{ type inet_proto . inet_service; counter;{_elements(inbound)} }}")
    add(f"\tset lan4 {{ type ipv4_addr; flags interval;{_elements(lan4)} }}")
    add(f"\tset lan6 {{ type ipv6_addr; flags interval;{_elements(lan6)} }}")
    add(f"\tset onlink6 {{ type ipv6_addr; flags interval;{_elements(onlink6)} }}")
    out += _admin_sets(policy)
    bridged = (f"{_quote(b)} . {_quote(b)}" for b in policy.bridges)
    add(f"\tset {BRIDGE_LOCAL_SET} {{ type ifname . ifname;{_elements(bridged)} }}")
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
    add(f"\t\t{DNS_REJECT_TCP}")
    add('\t\tcounter name "blocked_dns" reject')
    add("\t}")

    add("\tchain forward_reject {")
    # The kernel's reset is bare: 20 bytes of TCP header, no options, no data.
    add("\t\tip length 40 tcp flags & rst == rst accept")
    add("\t\tip6 length 20 tcp flags & rst == rst accept")
    add("\t\ticmp type destination-unreachable accept")
    add("\t\ticmpv6 type destination-unreachable accept")
    add("\t}")

    # Through the tunnel only replies and the ports asked for: checked before the LAN rules,
    # whose private ranges would otherwise take in the tunnel's own 10.x addresses.
    add("\tchain from_tunnel {")
    add("\t\tct state established,related accept")
    add(f"\t\tmeta l4proto . th dport @{TUNNEL_INBOUND_SET} accept")
    add('\t\tcounter name "blocked_in" drop')
    add("\t}")

    out += _admin_chains(policy)

    add("\tchain output {")
    add("\t\ttype filter hook output priority filter; policy drop;")
    add("\t\toif lo accept")
    add(f"\t\toifname {tun} jump to_tunnel")
    add("\t\tct state invalid drop")
    out += _admin_output_rules(policy)
    add(f"\t\tmeta mark {mark} ip daddr . udp dport @endpoints4 accept")
    add(f"\t\tmeta mark {mark} ip6 daddr . udp dport @endpoints6 accept")
    add('\t\tmeta l4proto { tcp, udp } th dport 53 counter name "blocked_dns" reject')
    add(f"\t\t{FORWARD_REJECT_RULE}")
    if policy.link_upkeep:
        for rule in UPKEEP_OUT:
            add(f"\t\t{rule}")
    if policy.allow_lan or ports:
        # From the tunnel's own addresses nothing goes to the LAN (a reply to a connection that
        # came in through the tunnel from a peer inside an overlapping LAN's range, say).
        for family, match in ((4, "ip"), (6, "ip6")):
            sources = [str(n) for n in widest(policy.tunnel_prefixes) if n.version == family]
            if sources:
                add(f'\t\t{match} saddr {{ {", ".join(sources)} }} counter name "blocked_out" reject')
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
    add(f"\t\tiifname {tun} jump from_tunnel")
    add("\t\tct state invalid drop")
    out += _admin_input_rules(policy)
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
    add(f"\t\t{BRIDGE_LOCAL_RULE}")
    add(f"\t\t{DNS_REJECT_TCP}")
    add('\t\tmeta l4proto { tcp, udp } th dport 53 counter name "blocked_dns" reject')
    add('\t\tcounter name "blocked_forward" reject with icmpx admin-prohibited')
    add("\t}")
    return "\n".join(out) + "\n"


# --- the administrator's way in (lock.admin_tcp): one rule group, apart from the rest ---------------

ADMIN_MARK_TEXT = f"0x{ADMIN_MARK:08x}"


def _admin_sets(policy: LockPolicy) -> list[str]:
    if not policy.admin_tcp:
        return []
    ports = (str(p) for p in policy.admin_tcp)
    v4 = [str(n) for n in widest(policy.admin_sources) if n.version == 4]
    v6 = [str(n) for n in widest(policy.admin_sources) if n.version == 6]
    return [
        f"\tset admin_tcp {{ type inet_service;{_elements(ports)} }}",
        f"\tset admin_sources4 {{ type ipv4_addr; flags interval;{_elements(v4)} }}",
        f"\tset admin_sources6 {{ type ipv6_addr; flags interval;{_elements(v6)} }}",
    ]


def _admin_sources(policy: LockPolicy, direction: str) -> list[str]:
    """The address match of the admin sources (``saddr`` coming in, ``daddr`` going out): none
    for any source, else one per family that has sources (a family without none gets no rule)."""
    if not policy.admin_sources:
        return [""]
    families = {n.version for n in policy.admin_sources}
    return [f"{'ip' if v == 4 else 'ip6'} {direction} @admin_sources{v} " for v in sorted(families)]


def _admin_chains(policy: LockPolicy) -> list[str]:
    """Prerouting marks the administrator's connections; the route chain routes their replies."""
    if not policy.admin_tcp:
        return []
    mark = ADMIN_MARK_TEXT
    not_here = f'{{ "lo", {_quote(policy.tunnel_interface)} }}'
    out = ["\tchain admin_mark {", "\t\ttype filter hook prerouting priority mangle; policy accept;"]
    # A connection the other side opens to an admin port of this host (a session older than the
    # lock, first seen from the other side, is new to conntrack too and is marked the same way).
    for match in _admin_sources(policy, "saddr"):
        out.append(
            f"\t\tiifname != {not_here} fib daddr type local tcp dport @admin_tcp "
            f"{match}ct direction original ct state new ct mark set {mark}"
        )
    # Its incoming packets carry the mark too, so that reverse-path filtering (src_valid_mark)
    # checks their source by the main table, where it is reachable, not by the tunnel's.
    out.append(f"\t\tct mark {mark} meta mark set ct mark")
    out.append("\t}")
    out += ["\tchain admin_route {", "\t\ttype route hook output priority mangle; policy accept;"]
    # A session older than the lock that conntrack first sees from this side: only a socket that
    # is root's, sending no SYN (so a connection already open), from an admin port.
    for match in _admin_sources(policy, "daddr"):
        out.append(
            f"\t\tct state new ct direction original ct mark != {mark} tcp sport @admin_tcp "
            f"tcp flags & (syn | rst) == 0 meta skuid 0 {match}ct mark set {mark}"
        )
    # The replies: the packet mark makes the kernel route them again, by the policy rule
    # fwmark ADMIN_MARK lookup main (supervisor.net.admin_route).
    out.append(f"\t\tct mark {mark} tcp sport @admin_tcp meta mark set ct mark")
    out.append("\t}")
    return out


def _admin_input_rules(policy: LockPolicy) -> list[str]:
    if not policy.admin_tcp:
        return []
    return [
        f"\t\tct mark {ADMIN_MARK_TEXT} tcp dport @admin_tcp accept",
        # Path MTU and unreachables about the session, so that it does not stall on a smaller MTU.
        f"\t\tct mark {ADMIN_MARK_TEXT} ct state related meta l4proto {{ icmp, icmpv6 }} accept",
    ]


def _admin_egress_rules(policy: LockPolicy) -> list[str]:
    """The same replies at the uplink's egress, where ``ct`` is not available: the packet mark
    the route chain set on them (host packets keep their mark down to the device), never the
    source port alone, which a macvlan child or a bridged VM could send from."""
    if not policy.admin_tcp:
        return []
    return [
        f"\t\tmeta mark {ADMIN_MARK_TEXT} {match}tcp sport @admin_tcp accept"
        for match in _admin_sources(policy, "daddr")
    ]


def _admin_output_rules(policy: LockPolicy) -> list[str]:
    """Only the packets of marked connections, from an admin port, leave outside the tunnel."""
    if not policy.admin_tcp:
        return []
    return [f"\t\tct mark {ADMIN_MARK_TEXT} tcp sport @admin_tcp accept"]


def _egress_body(policy: LockPolicy) -> str:
    """The netdev table: what output lets out on the physical side, stateless (see above).

    The host's own packets pass output, then this chain: a rule that output gains on the
    physical side must be added here as well, or the host's own traffic is dropped (a unit test
    compares the two). A rule that needs ``ct`` to be safe (replies only) becomes wider here,
    for the children and bridged workloads too: weigh that before adding one."""
    v4 = [e for e in policy.endpoints if e.family == 4]
    v6 = [e for e in policy.endpoints if e.family == 6]
    lan = _lan(policy)
    lan4 = [str(n) for n in lan if n.version == 4]
    lan6 = [str(n) for n in lan if n.version == 6]
    onlink6 = [str(n) for n in widest(policy.onlink) if n.version == 6]
    ports = ", ".join(str(p) for p in sorted(policy.inbound_tcp))
    mark = f"0x{policy.fwmark:08x}"
    devices = ", ".join(_quote(d) for d in sorted(policy.egress_devices))

    out: list[str] = []
    add = out.append
    add(f"\tset endpoints4 {{ type ipv4_addr . inet_service;{_elements(map(endpoint_element, v4))} }}")
    add(f"\tset endpoints6 {{ type ipv6_addr . inet_service;{_elements(map(endpoint_element, v6))} }}")
    add(f"\tset lan4 {{ type ipv4_addr; flags interval;{_elements(lan4)} }}")
    add(f"\tset lan6 {{ type ipv6_addr; flags interval;{_elements(lan6)} }}")
    add(f"\tset onlink6 {{ type ipv6_addr; flags interval;{_elements(onlink6)} }}")
    out += _admin_sets(policy)
    add(f"\tcounter {EGRESS_COUNTER} {{ }}")
    add("\tchain egress {")
    add(f"\t\ttype filter hook egress devices = {{ {devices} }} priority filter; policy drop;")
    # Neighbour resolution of the host and of its children; an ARP packet stays on the link.
    add("\t\tmeta protocol arp accept")
    add(f"\t\tmeta mark {mark} ip daddr . udp dport @endpoints4 accept")
    add(f"\t\tmeta mark {mark} ip6 daddr . udp dport @endpoints6 accept")
    if policy.link_upkeep:
        for rule in UPKEEP_OUT:
            add(f"\t\t{rule}")
    if policy.allow_lan:
        add("\t\tip daddr @lan4 accept")
        add("\t\tip6 daddr @lan6 accept")
    if ports:
        add(f"\t\tip daddr @lan4 tcp sport {{ {ports} }} accept")
        add(f"\t\tip6 daddr @lan6 tcp sport {{ {ports} }} accept")
    out += _admin_egress_rules(policy)
    add(f'\t\tcounter name "{EGRESS_COUNTER}" drop')
    add("\t}")
    return "\n".join(out) + "\n"
