"""The administrator's reply rule (``AdminReplyPlan`` in ``supervisor.net.routing_plan``, which
says what it is and why) applied, checked and removed over rtnetlink.

Kept apart from ``supervisor.net.routes`` (the full-tunnel set-up) because it outlives it: the
tunnel adds it before its own rules (the session never sees the routes without it) and leaves it
in place when it closes or the daemon dies. It is harmless without the routes (the main table is
then all there is) and lets nothing else out: only the lock sets the mark, and the lock accepts
only the marked replies from an admin port. Found again by content, so a restart adopts it.
"""

from __future__ import annotations

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.log import get_logger
from supervisor.net.links import collect
from supervisor.net.routes import RoutingError
from supervisor.net.routing_plan import ADDRESS_FAMILIES, ADMIN_RULE_PRIORITY, AdminReplyPlan, RuleSpec

# The plan's name that code importing it from here has always found here.
__all__ = ["ADMIN_RULE_PRIORITY", "AdminReplyRouting"]

log = get_logger(__name__)


class AdminReplyRouting(AdminReplyPlan, frozen=True):
    """``AdminReplyPlan`` applied, checked and removed over rtnetlink."""

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
            for msg in await collect(await ipr.rule("dump", family=ADDRESS_FAMILIES[family])):
                present |= {rule for rule in self.rules() if rule.matches(msg)}
        return present
