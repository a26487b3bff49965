"""The tunnel's plumbing as data: the link's state, the administrator's reply rule and the
full-tunnel policy routing, for one server. Nothing here touches the kernel.

Two appliers read it: the daemon's, over rtnetlink (``supervisor.net.links``,
``supervisor.net.admin_route``, ``supervisor.net.routes``: they also find it again by content,
complete it and remove it), and the early start's, which renders it for iproute2's ``ip -batch``
(``supervisor.net.ip_batch``). That is why this module imports the standard library, msgspec (its
records are Structs; the configuration has loaded it already) and our own plain-data modules
only: the early start runs before pyroute2, anyio and structlog are loaded (issue #27), and
whatever it sets up must be exactly what the daemon then adopts.

**The link.** The interface gets exactly the server's addresses and MTU (wg-quick's default,
1420: 1500 minus the worst-case WireGuard overhead over IPv6, 80 bytes) and is brought up.
IPv6 addresses skip duplicate address detection: a tunnel has no neighbours to collide with,
and DAD would only delay the address.

**The administrator's replies leave by the main table, ahead of the tunnel's rules**::

    rule <ADMIN_RULE_PRIORITY>:  fwmark ADMIN_MARK lookup main      (IPv4 and IPv6)

The lock marks the replies of a connection an administrator opened from outside to an admin
port (``lock.admin_tcp``; the mark is copied from the connection's conntrack mark by the lock's
route chain, supervisor/lock/render.py). Without this rule the tunnel's ``not fwmark ... lookup
<table>`` sends them into the tunnel, and the administrator's session hangs the moment the tunnel
comes up. With it they follow the main table out of the interface the session came in by, with
the host's own address.

**Full-tunnel policy routing, as wg-quick sets it up.** For each family::

    table <route_table>:  default dev <tunnel>   (unreachable default: see below)
    rule  <prio - 2>:     fwmark <fwmark> lookup main
    rule  <prio - 1>:     to <owned> lookup <route_table>   (one per owned prefix)
    rule  <prio - 1>:     from <address> lookup <route_table>   (one per tunnel address)
    rule  <prio>:         lookup main suppress_prefixlength 0
    rule  <prio + 1>:     not fwmark <fwmark> lookup <route_table>

Everything without the tunnel's fwmark goes into the tunnel; WireGuard's own
UDP carries the fwmark and so follows the main table out of the physical
interface; ``suppress_prefixlength 0`` lets the main table's more specific
routes (the LAN, the link itself) win over its default route. The main table
is never touched, so removing our table's default and our rules restores the host exactly,
and the routes survive a peer swap (they name the interface, not the server).

**What the tunnel owns goes into the tunnel, whatever the LAN says.** ``suppress_prefixlength
0`` lets every main-table route but the default win, so a LAN (or a hostile DHCP server) that hands
out a 10.0.0.0/16 holding the server's inner 10.x addresses drew the tunnel's resolver, its
NAT-PMP gateway and its probe target onto the physical link. The tunnel's own prefixes (its
addresses, its resolvers, the NAT-PMP gateway, the probe target: ``owned``) get a rule of their
own, consulted before the main table, and so do packets from the tunnel's own addresses (a
reply to a connection that came in through the tunnel from a peer inside the LAN's range went
out of the physical interface).

**A family the server gives no address gets an unreachable default.** A server file with only an
IPv4 ``Address`` and ``AllowedIPs = ::/0`` otherwise sent IPv6 into the tunnel from the host's
global address, which the provider then learns; now a connection of that family fails at once
(EHOSTUNREACH) and nothing of it enters the tunnel or leaves outside it.

The lock never depends on these routes being right: it drops anything that leaves outside the
tunnel regardless.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, Protocol, Self

from msgspec import Struct

from supervisor.servers import IPAddress, IPInterface, IPNetwork, Server


class RoutingSettings(Protocol):
    """What the plan needs of the tunnel's settings (``supervisor.wireguard.tunnel.TunnelSettings``
    has it; the early start may pass anything with these attributes)."""

    @property
    def ifname(self) -> str: ...
    @property
    def fwmark(self) -> int: ...
    @property
    def route_table(self) -> int: ...
    @property
    def rule_priority(self) -> int: ...
    @property
    def owned_targets(self) -> tuple[IPAddress, ...]: ...


MAIN_TABLE = 254
FIB_RULE_INVERT = 0x2  # linux/fib_rules.h: the rule's selector is negated ("not")
# Just before the main table's rule (32766); fixed values so a restart finds its own rules again.
DEFAULT_RULE_PRIORITY = 32760
# Ahead of the full-tunnel rules (DEFAULT_RULE_PRIORITY and the one after it), with room between.
ADMIN_RULE_PRIORITY = DEFAULT_RULE_PRIORITY - 10
# The conntrack mark of an administrator's connection, and the packet mark of its replies. One
# value, not a bit under a mask: the policy rule matches it exactly, as it matches the tunnel's
# fwmark (config refuses a tunnel.fwmark equal to it). "tl" and the SSH port, readable in a dump.
# Defined here, with the rule that routes it, so that the early start reads it without the lock's
# modules; ``supervisor.lock.admin`` (where the lock's users import it) takes it from here.
ADMIN_MARK = 0x746C0022
# wg-quick's default: 1500 minus the worst-case WireGuard overhead over IPv6 (80 bytes).
DEFAULT_MTU = 1420
# The routes in our table are static routes of universe scope, named here rather than left to
# each applier's default (pyroute2's is "proto static", iproute2's "proto boot scope link"), so
# that both create the very same route and neither's ``replace`` ever rewrites the other's.
ROUTE_PROTOCOL = 4  # RTPROT_STATIC
ROUTE_SCOPE = 0  # RT_SCOPE_UNIVERSE ("scope global")

ADDRESS_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


class RuleSpec(Struct, frozen=True):
    """One policy rule, as data: what to add, and what to recognise in a dump."""

    family: int
    priority: int
    table: int
    fwmark: int | None = None
    invert: bool = False
    suppress_prefixlength: int | None = None
    dst: IPNetwork | None = None
    src: IPNetwork | None = None

    def request(self) -> dict[str, Any]:
        """The keyword arguments of ``AsyncIPRoute.rule('add'|'del', ...)``."""
        args: dict[str, Any] = {
            "family": ADDRESS_FAMILIES[self.family],
            "priority": self.priority,
            "table": self.table,
            "action": "to_tbl",
        }
        if self.fwmark is not None:
            args.update(fwmark=self.fwmark, fwmask=0xFFFFFFFF)
        if self.invert:
            args["flags"] = FIB_RULE_INVERT
        if self.suppress_prefixlength is not None:
            args["suppress_prefixlen"] = self.suppress_prefixlength
        if self.dst is not None:
            args.update(dst=str(self.dst.network_address), dst_len=self.dst.prefixlen)
        if self.src is not None:
            args.update(src=str(self.src.network_address), src_len=self.src.prefixlen)
        return args

    def matches(self, msg: Any) -> bool:
        """Whether a rule from a dump (a pyroute2 message) is this one."""
        table = msg.get_attr("FRA_TABLE") or msg["table"]
        suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
        if suppress is not None and suppress in (-1, 0xFFFFFFFF):
            suppress = None  # "not set" in a dump
        return (
            msg["family"] == ADDRESS_FAMILIES[self.family]
            and (msg.get_attr("FRA_PRIORITY") or 0) == self.priority
            and table == self.table
            and msg.get_attr("FRA_FWMARK") == self.fwmark
            and bool(msg["flags"] & FIB_RULE_INVERT) == self.invert
            and suppress == self.suppress_prefixlength
            and rule_prefix(msg, "dst") == self.dst
            and rule_prefix(msg, "src") == self.src
        )


def rule_prefix(msg: Any, which: str) -> IPNetwork | None:
    """A dumped rule's destination (``dst``) or source (``src``) selector, None for 'all'."""
    address = msg.get_attr(f"FRA_{which.upper()}")
    if address is None or not msg[f"{which}_len"]:
        return None
    return ip_network(f"{address}/{msg[f'{which}_len']}")


class DefaultRoute(Struct, frozen=True):
    """The default route of one family in the tunnel's table: into ``ifname``, or, when
    ``ifname`` is None (the server gives that family no address), unreachable."""

    family: int
    table: int
    ifname: str | None

    @property
    def unreachable(self) -> bool:
        return self.ifname is None


class LinkPlan(Struct, frozen=True):
    """The tunnel interface's wanted state: exactly ``addresses``, ``mtu``, and up."""

    ifname: str
    addresses: tuple[IPInterface, ...]
    mtu: int = DEFAULT_MTU

    @classmethod
    def for_server(cls, ifname: str, server: Server, families: tuple[int, ...] = (4, 6)) -> LinkPlan:
        """``server``'s addresses of ``families`` (``routed_families``): an interface with IPv6
        disabled refuses IPv6 addresses, and a dual-stack server must still connect over IPv4."""
        addresses = tuple(a for a in server.addresses if a.version in families)
        return cls(ifname, addresses, server.mtu or DEFAULT_MTU)


class AdminReplyPlan(Struct, frozen=True):
    """The policy rule that sends the administrator's marked replies by the main table."""

    families: tuple[int, ...] = (4, 6)
    priority: int = ADMIN_RULE_PRIORITY
    mark: int = ADMIN_MARK

    def rules(self) -> list[RuleSpec]:
        return [RuleSpec(family, self.priority, MAIN_TABLE, fwmark=self.mark) for family in self.families]


class FullTunnelPlan(Struct, frozen=True):
    """The routes and rules that send everything but WireGuard's own packets into ``ifname``."""

    ifname: str
    table: int
    fwmark: int
    families: tuple[int, ...] = (4, 6)
    priority: int = DEFAULT_RULE_PRIORITY
    # The tunnel's own prefixes (see the module docstring), routed into the tunnel before the
    # main table is consulted.
    owned: tuple[IPNetwork, ...] = ()
    # The tunnel's own addresses: what leaves from them (a reply to a connection that came in
    # through the tunnel, from a peer inside a LAN's range) goes back through the tunnel.
    sources: tuple[IPNetwork, ...] = ()
    # Families the server gives no address: their default in the table is unreachable.
    unreachable: tuple[int, ...] = ()

    @classmethod
    def for_server(
        cls, settings: RoutingSettings, families: tuple[int, ...], server: Server | None = None
    ) -> Self:
        """The routing of ``settings`` while ``server`` is the peer; without a server, only what
        every server shares (enough for ``FullTunnelRouting.remove``, as ``Tunnel.close`` uses it)."""
        s = settings
        if server is None:
            return cls(s.ifname, s.route_table, s.fwmark, families, s.rule_priority)
        return cls(
            s.ifname,
            s.route_table,
            s.fwmark,
            families,
            s.rule_priority,
            owned=owned_prefixes(server, s.owned_targets),
            sources=tuple(ip_network(a.ip) for a in server.addresses),
            unreachable=tuple(f for f in families if f not in server.families),
        )

    def rules(self) -> list[RuleSpec]:
        """The rules, in the order they are added (the catch-all last: what comes before it must
        never be missing while it is there)."""
        out: list[RuleSpec] = []
        for family in self.families:
            # WireGuard's own packets keep the main table, as they would further down: an
            # endpoint inside an owned prefix must never be routed into its own tunnel. (A rule's
            # ``not`` inverts its whole selector, so "not fwmark M to X" cannot say this.)
            out.append(RuleSpec(family, self.priority - 2, MAIN_TABLE, fwmark=self.fwmark))
            for net in sorted({n for n in self.owned if n.version == family}, key=str):
                out.append(self._owned_rule(family, dst=net))
            for net in sorted({n for n in self.sources if n.version == family}, key=str):
                out.append(self._owned_rule(family, src=net))
            out.append(RuleSpec(family, self.priority, MAIN_TABLE, suppress_prefixlength=0))
            out.append(RuleSpec(family, self.priority + 1, self.table, fwmark=self.fwmark, invert=True))
        return out

    def default_routes(self) -> list[DefaultRoute]:
        """The table's default route of each family, in ``families`` order."""
        return [
            DefaultRoute(family, self.table, None if family in self.unreachable else self.ifname)
            for family in self.families
        ]

    def _owned_rule(
        self, family: int, dst: IPNetwork | None = None, src: IPNetwork | None = None
    ) -> RuleSpec:
        return RuleSpec(family, self.priority - 1, self.table, dst=dst, src=src)


class TunnelPlan(Struct, frozen=True):
    """Everything the tunnel sets up around its interface for one server, in the order it is
    applied: the link, the administrator's reply rule, then the full-tunnel routing (the admin
    rule first, so an administrator's session never sees the routes without it)."""

    link: LinkPlan
    admin: AdminReplyPlan
    routing: FullTunnelPlan

    @classmethod
    def for_server(cls, settings: RoutingSettings, server: Server, families: tuple[int, ...]) -> TunnelPlan:
        """``families``: what can be routed into the interface here (``routed_families``)."""
        return cls(
            LinkPlan.for_server(settings.ifname, server, families),
            AdminReplyPlan(families),
            FullTunnelPlan.for_server(settings, families, server),
        )


class ConfiguredRouting(Struct, frozen=True):
    """The routing's settings as a configuration gives them: the one reading of them, for the
    daemon's ``TunnelSettings`` and for the early start, which has nothing else."""

    ifname: str
    fwmark: int
    route_table: int
    owned_targets: tuple[IPAddress, ...]
    rule_priority: int = DEFAULT_RULE_PRIORITY

    @classmethod
    def from_config(cls, settings: Any) -> ConfiguredRouting:
        """From a validated ``supervisor.config.ConfigFile``."""
        return cls(
            ifname=settings.tunnel.interface,
            fwmark=settings.tunnel.fwmark,
            route_table=settings.tunnel.route_table,
            owned_targets=configured_targets(settings),
        )


def configured_targets(settings: Any) -> tuple[IPAddress, ...]:
    """The tunnel-side addresses a ``ConfigFile`` names: ``health.probe_target`` and
    ``[plugins.natpmp] gateway`` (both checked as addresses when the config is loaded)."""
    named = [settings.health.probe_target, settings.plugins.options.get("natpmp", {}).get("gateway")]
    out: list[IPAddress] = []
    for value in named:
        try:
            out.append(ip_address(str(value)))
        except ValueError:
            continue  # None, or a bad value the config check reports
    return tuple(out)


def owned_prefixes(server: Server, targets: Iterable[IPAddress] = ()) -> tuple[IPNetwork, ...]:
    """What belongs to the tunnel while ``server`` is its peer: its address prefixes, its
    resolvers (also the default probe target and NAT-PMP gateway) and ``targets``."""
    nets = {a.network for a in server.addresses}
    nets |= {ip_network(a) for a in (*server.dns, *targets)}
    return tuple(sorted(nets, key=lambda n: (n.version, str(n))))


def ipv6_enabled(ifname: str) -> bool:
    """Whether IPv6 can be routed into ``ifname`` here (this namespace's sysctl tree)."""
    flag = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    try:
        return flag.read_text().strip() == "0"
    except OSError:
        return False


def routed_families(ifname: str) -> tuple[int, ...]:
    """The families routed into ``ifname`` (the interface must exist): IPv6 only where enabled."""
    return (4, 6) if ipv6_enabled(ifname) else (4,)


def enable_src_valid_mark() -> None:
    """Let rp_filter see the fwmark (wg-quick does the same), or strict rp_filter drops replies.

    Needed whenever IPv4 is routed into the tunnel. /proc/sys/net is the sysctl tree of the
    calling thread's network namespace. Raises OSError when it cannot be set.
    """
    path = Path("/proc/sys/net/ipv4/conf/all/src_valid_mark")
    if path.read_text().strip() != "1":
        path.write_text("1\n")


def without_link_local(ifname: str) -> None:
    """Give ``ifname`` no IPv6 link-local address when it goes up (``addr_gen_mode`` none).

    The kernel gives wireguard-go's TUN device one, and then sends router solicitations to
    ff02::2 through the tunnel, with backoff, for good: the server has no use for them, and each
    woke an idle daemon (seven in a 4-minute idle spell in the lab; issue #27). WireGuard needs
    no link-local address: it routes by the peer's allowed IPs. Takes effect only before the
    link first goes up; does nothing where IPv6 is off (no such file).
    """
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/addr_gen_mode").write_text("1\n")
