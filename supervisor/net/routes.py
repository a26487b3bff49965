"""Full-tunnel policy routing, as wg-quick sets it up, over rtnetlink.

For each family::

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

The rules are found again by content (table, fwmark, flags, priority), which is
what makes a restarted daemon adopt them instead of adding duplicates. The
lock never depends on these routes being right: it drops anything that leaves
outside the tunnel regardless.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.errors import TunlockError
from supervisor.log import get_logger
from supervisor.net.links import collect, link_index
from supervisor.servers import IPNetwork

log = get_logger(__name__)

MAIN_TABLE = 254
_RTN_UNREACHABLE = 7  # linux/rtnetlink.h
FIB_RULE_INVERT = 0x2
# Just before the main table's rule (32766); fixed values so a restart finds its own rules again.
DEFAULT_RULE_PRIORITY = 32760
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT_DST = {4: "0.0.0.0", 6: "::"}


class RoutingError(TunlockError):
    """The policy routing could not be applied or removed."""


@dataclass(frozen=True)
class RuleSpec:
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
            "family": _FAMILIES[self.family],
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
        """Whether a rule from a dump is this one."""
        table = msg.get_attr("FRA_TABLE") or msg["table"]
        suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
        if suppress is not None and suppress in (-1, 0xFFFFFFFF):
            suppress = None  # "not set" in a dump
        return (
            msg["family"] == _FAMILIES[self.family]
            and (msg.get_attr("FRA_PRIORITY") or 0) == self.priority
            and table == self.table
            and msg.get_attr("FRA_FWMARK") == self.fwmark
            and bool(msg["flags"] & FIB_RULE_INVERT) == self.invert
            and suppress == self.suppress_prefixlength
            and _rule_prefix(msg, "dst") == self.dst
            and _rule_prefix(msg, "src") == self.src
        )


def _rule_prefix(msg: Any, which: str) -> IPNetwork | None:
    """A dumped rule's destination (``dst``) or source (``src``) selector, None for 'all'."""
    address = msg.get_attr(f"FRA_{which.upper()}")
    if address is None or not msg[f"{which}_len"]:
        return None
    return ip_network(f"{address}/{msg[f'{which}_len']}")


@dataclass(frozen=True)
class FullTunnelRouting:
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

    def _owned_rule(
        self, family: int, dst: IPNetwork | None = None, src: IPNetwork | None = None
    ) -> RuleSpec:
        return RuleSpec(family, self.priority - 1, self.table, dst=dst, src=src)

    def _default_route(self, family: int, index: int | None) -> dict[str, Any]:
        route: dict[str, Any] = {
            "dst": _DEFAULT_DST[family],
            "dst_len": 0,
            "family": _FAMILIES[family],
            "table": self.table,
        }
        if family in self.unreachable:
            route["type"] = "unreachable"
        else:
            route["oif"] = index
        return route

    async def apply(self, ipr: AsyncIPRoute) -> None:
        """Add whatever is missing; an already complete set-up is left as it is (adoption)."""
        if 4 in self.families:
            _enable_src_valid_mark()
        index = await link_index(ipr, self.ifname)
        if index is None:
            raise RoutingError(f"cannot route into {self.ifname}: the interface does not exist")
        try:
            for family in self.families:
                await ipr.route("replace", **self._default_route(family, index))
            present = await self._present(ipr)
            added = [rule for rule in self.rules() if rule not in present]
            for rule in added:
                await ipr.rule("add", **rule.request())
            # Owned prefixes of an earlier server that this one does not have (after the new
            # ones are in: a prefix both share is never without its rule).
            for stale in await self._stale_owned(ipr):
                await ipr.rule("del", **stale.request())
        except NetlinkError as err:
            raise RoutingError(f"cannot set up routing into {self.ifname}: {err}") from None
        if added:
            log.info("tunnel routing in place", ifname=self.ifname, table=self.table, fwmark=hex(self.fwmark))

    async def remove(self, ipr: AsyncIPRoute) -> None:
        """Delete our rules and our table's default routes; what is already gone is fine."""
        try:
            for rule in reversed(self.rules()):
                if rule in await self._present(ipr):
                    await ipr.rule("del", **rule.request())
            for stale in await self._stale_owned(ipr):
                await ipr.rule("del", **stale.request())
            for family in self.families:
                try:
                    await ipr.route(
                        "del", dst=_DEFAULT_DST[family], dst_len=0, family=_FAMILIES[family], table=self.table
                    )
                except NetlinkError as err:
                    if err.code not in (errno.ESRCH, errno.ENOENT):
                        raise
        except NetlinkError as err:
            raise RoutingError(f"cannot remove the routing into {self.ifname}: {err}") from None
        log.info("tunnel routing removed", ifname=self.ifname, table=self.table)

    async def missing(self, ipr: AsyncIPRoute) -> list[str]:
        """What of the set-up is absent (empty when it is complete), for status and tests."""
        out: list[str] = []
        present = await self._present(ipr)
        out += [f"rule {r}" for r in self.rules() if r not in present]
        index = await link_index(ipr, self.ifname)
        for family in self.families:
            routes = await collect(await ipr.route("dump", family=_FAMILIES[family], table=self.table))
            if family in self.unreachable:
                found = any(m["dst_len"] == 0 and m["type"] == _RTN_UNREACHABLE for m in routes)
            else:
                found = any(m["dst_len"] == 0 and m.get_attr("RTA_OIF") == index for m in routes)
            if not found:
                kind = "unreachable default" if family in self.unreachable else "default route"
                out.append(f"IPv{family} {kind} in table {self.table}")
        return out

    async def _stale_owned(self, ipr: AsyncIPRoute) -> list[RuleSpec]:
        """Our owned-prefix rules (our priority and table, a destination or a source) that ``owned``
        and ``sources`` no longer name: an earlier server's."""
        wanted = set(self.rules())
        stale: list[RuleSpec] = []
        for family in self.families:
            for msg in await collect(await ipr.rule("dump", family=_FAMILIES[family])):
                dst, src = _rule_prefix(msg, "dst"), _rule_prefix(msg, "src")
                if dst is None and src is None:
                    continue
                rule = self._owned_rule(family, dst=dst, src=src)
                if rule.matches(msg) and rule not in wanted:
                    stale.append(rule)
        return stale

    async def _present(self, ipr: AsyncIPRoute) -> set[RuleSpec]:
        present: set[RuleSpec] = set()
        for family in self.families:
            for msg in await collect(await ipr.rule("dump", family=_FAMILIES[family])):
                present |= {rule for rule in self.rules() if rule.matches(msg)}
        return present


def _enable_src_valid_mark() -> None:
    """Let rp_filter see the fwmark (wg-quick does the same), or strict rp_filter drops replies.

    /proc/sys/net is the sysctl tree of the calling thread's network namespace.
    """
    path = Path("/proc/sys/net/ipv4/conf/all/src_valid_mark")
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
    except OSError as err:
        log.warning("cannot enable src_valid_mark; strict rp_filter may drop tunnel replies", error=str(err))
