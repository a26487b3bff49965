"""Full-tunnel policy routing, as wg-quick sets it up, over rtnetlink.

For each family::

    table <route_table>:  default dev <tunnel>
    rule  <prio>:         lookup main suppress_prefixlength 0
    rule  <prio + 1>:     not fwmark <fwmark> lookup <route_table>

Everything without the tunnel's fwmark goes into the tunnel; WireGuard's own
UDP carries the fwmark and so follows the main table out of the physical
interface; ``suppress_prefixlength 0`` lets the main table's more specific
routes (the LAN, the link itself) win over its default route. The main table
is never touched, so removing these three items restores the host exactly, and
the routes survive a peer swap (they name the interface, not the server).

The rules are found again by content (table, fwmark, flags, priority), which is
what makes a restarted daemon adopt them instead of adding duplicates. The
lock never depends on these routes being right: it drops anything that leaves
outside the tunnel regardless.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.errors import TunlockError
from supervisor.log import get_logger
from supervisor.net.links import collect, link_index

log = get_logger(__name__)

MAIN_TABLE = 254
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
        )


@dataclass(frozen=True)
class FullTunnelRouting:
    """The routes and rules that send everything but WireGuard's own packets into ``ifname``."""

    ifname: str
    table: int
    fwmark: int
    families: tuple[int, ...] = (4, 6)
    priority: int = DEFAULT_RULE_PRIORITY

    def rules(self) -> list[RuleSpec]:
        """The rules, in the order they are added (suppress first: it must never be missing)."""
        out: list[RuleSpec] = []
        for family in self.families:
            out.append(RuleSpec(family, self.priority, MAIN_TABLE, suppress_prefixlength=0))
            out.append(RuleSpec(family, self.priority + 1, self.table, fwmark=self.fwmark, invert=True))
        return out

    async def apply(self, ipr: AsyncIPRoute) -> None:
        """Add whatever is missing; an already complete set-up is left as it is (adoption)."""
        if 4 in self.families:
            _enable_src_valid_mark()
        index = await link_index(ipr, self.ifname)
        if index is None:
            raise RoutingError(f"cannot route into {self.ifname}: the interface does not exist")
        try:
            for family in self.families:
                await ipr.route(
                    "replace",
                    dst=_DEFAULT_DST[family],
                    dst_len=0,
                    family=_FAMILIES[family],
                    table=self.table,
                    oif=index,
                )
            present = await self._present(ipr)
            added = [rule for rule in self.rules() if rule not in present]
            for rule in added:
                await ipr.rule("add", **rule.request())
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
            if not any(m["dst_len"] == 0 and m.get_attr("RTA_OIF") == index for m in routes):
                out.append(f"IPv{family} default route in table {self.table}")
        return out

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
