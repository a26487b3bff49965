"""The administrator's replies leave by the main table, ahead of the tunnel's full-tunnel rules.

::

    rule <ADMIN_RULE_PRIORITY>:  fwmark ADMIN_MARK lookup main      (IPv4 and IPv6)

The lock marks the replies of a connection an administrator opened from outside to an admin
port (``lock.admin_tcp``; the mark is copied from the connection's conntrack mark by the lock's
route chain, supervisor/lock/render.py). Without this rule the tunnel's ``not fwmark ... lookup
<table>`` sends them into the tunnel, and the administrator's session hangs the moment the tunnel
comes up. With it they follow the main table out of the interface the session came in by, with
the host's own address.

Kept apart from ``supervisor.net.routes`` (the full-tunnel set-up) because it outlives it: the
tunnel adds it before its own rules (the session never sees the routes without it) and leaves it
in place when it closes or the daemon dies. It is harmless without the routes (the main table is
then all there is) and lets nothing else out: only the lock sets the mark, and the lock accepts
only the marked replies from an admin port. Found again by content, so a restart adopts it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.lock.admin import ADMIN_MARK
from supervisor.log import get_logger
from supervisor.net.links import collect
from supervisor.net.routes import DEFAULT_RULE_PRIORITY, MAIN_TABLE, RoutingError, RuleSpec

log = get_logger(__name__)

# Ahead of the full-tunnel rules (DEFAULT_RULE_PRIORITY and the one after it), with room between.
ADMIN_RULE_PRIORITY = DEFAULT_RULE_PRIORITY - 10
_ADDRESS_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True)
class AdminReplyRouting:
    """The policy rule that sends the administrator's marked replies by the main table."""

    families: tuple[int, ...] = (4, 6)
    priority: int = ADMIN_RULE_PRIORITY
    mark: int = ADMIN_MARK

    def rules(self) -> list[RuleSpec]:
        return [RuleSpec(family, self.priority, MAIN_TABLE, fwmark=self.mark) for family in self.families]

    async def apply(self, ipr: AsyncIPRoute) -> None:
        """Add what is missing (idempotent: a restarted daemon finds its rule and keeps it)."""
        present = await self._present(ipr)
        added = [rule for rule in self.rules() if rule not in present]
        try:
            for rule in added:
                await ipr.rule("add", **rule.request())
        except NetlinkError as err:
            raise RoutingError(f"cannot add the administrator's reply rule: {err}") from None
        if added:
            log.info("administrator's replies routed by the main table", mark=hex(self.mark))

    async def missing(self, ipr: AsyncIPRoute) -> list[str]:
        present = await self._present(ipr)
        return [f"rule {r}" for r in self.rules() if r not in present]

    async def remove(self, ipr: AsyncIPRoute) -> None:
        """Delete the rule (``tunlock`` never does on its own: see the module docstring)."""
        for rule in self.rules():
            if rule in await self._present(ipr):
                await ipr.rule("del", **rule.request())

    async def _present(self, ipr: AsyncIPRoute) -> set[RuleSpec]:
        present: set[RuleSpec] = set()
        for family in self.families:
            for msg in await collect(await ipr.rule("dump", family=_ADDRESS_FAMILY[family])):
                present |= {rule for rule in self.rules() if rule.matches(msg)}
        return present
