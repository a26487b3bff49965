"""Full-tunnel policy routing, as wg-quick sets it up, applied over rtnetlink.

What the routing is, and why each rule is there, is ``supervisor.net.routing_plan``
(``FullTunnelPlan``): the data lives there, without pyroute2, so that the early start can render
the same plan for iproute2. This module applies it, checks it and removes it.

The rules are found again by content (table, fwmark, flags, priority), which is
what makes a restarted daemon adopt them instead of adding duplicates, whoever added them (this
module, or the early start's ``ip -batch``). The lock never depends on these routes being right:
it drops anything that leaves outside the tunnel regardless.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.errors import TunlockError
from supervisor.log import get_logger
from supervisor.net.links import collect, link_index
from supervisor.net.routing_plan import (
    ADDRESS_FAMILIES,
    DEFAULT_RULE_PRIORITY,
    FIB_RULE_INVERT,
    MAIN_TABLE,
    ROUTE_PROTOCOL,
    ROUTE_SCOPE,
    FullTunnelPlan,
    RuleSpec,
    enable_src_valid_mark,
    rule_prefix,
)

# The plan's names that code importing them from here has always found here.
__all__ = [
    "DEFAULT_RULE_PRIORITY",
    "FIB_RULE_INVERT",
    "MAIN_TABLE",
    "FullTunnelRouting",
    "RoutingError",
    "RuleSpec",
]

log = get_logger(__name__)

_RTN_UNREACHABLE = 7  # linux/rtnetlink.h
_DEFAULT_DST = {4: "0.0.0.0", 6: "::"}


class RoutingError(TunlockError):
    """The policy routing could not be applied or removed."""


class FullTunnelRouting(FullTunnelPlan, frozen=True):
    """``FullTunnelPlan`` applied, checked and removed over rtnetlink."""

    def _default_route(self, family: int, index: int | None) -> dict[str, Any]:
        """The ``AsyncIPRoute.route('replace', ...)`` arguments of ``family``'s default route."""
        (planned,) = (r for r in self.default_routes() if r.family == family)
        route: dict[str, Any] = {
            "dst": _DEFAULT_DST[family],
            "dst_len": 0,
            "family": ADDRESS_FAMILIES[family],
            "table": planned.table,
            "proto": ROUTE_PROTOCOL,
            "scope": ROUTE_SCOPE,
        }
        if planned.unreachable:
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
                        "del",
                        dst=_DEFAULT_DST[family],
                        dst_len=0,
                        family=ADDRESS_FAMILIES[family],
                        table=self.table,
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
            routes = await collect(await ipr.route("dump", family=ADDRESS_FAMILIES[family], table=self.table))
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
            for msg in await collect(await ipr.rule("dump", family=ADDRESS_FAMILIES[family])):
                dst, src = rule_prefix(msg, "dst"), rule_prefix(msg, "src")
                if dst is None and src is None:
                    continue
                rule = self._owned_rule(family, dst=dst, src=src)
                if rule.matches(msg) and rule not in wanted:
                    stale.append(rule)
        return stale

    async def _present(self, ipr: AsyncIPRoute) -> set[RuleSpec]:
        present: set[RuleSpec] = set()
        for family in self.families:
            for msg in await collect(await ipr.rule("dump", family=ADDRESS_FAMILIES[family])):
                present |= {rule for rule in self.rules() if rule.matches(msg)}
        return present


def _enable_src_valid_mark() -> None:
    try:
        enable_src_valid_mark()
    except OSError as err:
        log.warning("cannot enable src_valid_mark; strict rp_filter may drop tunnel replies", error=str(err))
