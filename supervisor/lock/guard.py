"""Keeping the lock in place while the daemon runs: detect tampering and restore at once.

Another program's ``nft flush ruleset``, ``delete table`` or a rule edit inside
our table must not leave the host open. The guard follows the kernel's
nftables events (its own netlink socket subscribed to the nftables group, no
polling, no child process: supervisor.net.subscription), and after every burst
of changes compares our table with what it last installed; when the table is
missing or differs it re-applies the whole policy in one transaction and
reports the tampering. The messages are not decoded: the guard only needs
"something changed", after which it reads the table back anyway.

The lock's LAN and neighbour-discovery sets hold the on-link subnets read when it
was applied (supervisor.lock.onlink: the prefixes of the interfaces' addresses); the guard
also follows address, route and link changes (rtnetlink's link, address and route groups: an
address without a prefix route makes no route event) and applies the lock again when those
subnets change, so a new lease on another network neither stays closed nor leaves the old
subnet open. The same goes for the physical uplinks that carry the egress chain and the local
bridges (supervisor.lock.links); workloads whose frames skip the host's netfilter (a macvlan
child of the uplink, a bridge with the uplink in it: supervisor.net.bypass) are logged when
they appear.

With an owner (supervisor/lock/owner.py) every change goes through the daemon's own
libnftables context and covers both tables in one transaction: the ordinary one, which outlives
the daemon (a crash, SIGKILL, boot), and its owned twin, which no other program can flush or
delete. After a flush the twin keeps everything closed while the guard restores the ordinary
table. Without one (kernel or nft too old) the ordinary table and this guard are all there is,
and a flush opens the host until the restore (~50 ms; docs/lock.md).

A subscription can fail without the daemon meaning to stop (a socket error the kernel reports).
That must never take the daemon down, nor leave the lock unwatched: the guard subscribes again
after a short pause that grows while subscriptions keep failing at once, and checks the table
straight away, since a change made while nothing watched would otherwise go unseen. (It used to
keep an ``nft monitor`` child, which a signal to the daemon's process group, an admin or the
OOM killer could end; there is no such child any more.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from msgspec.structs import replace

from supervisor.lock import nft
from supervisor.lock.links import AppliedLinks, egress_in_force, read_links
from supervisor.lock.owner import NftContext, OwningContext
from supervisor.lock.policy import LockPolicy
from supervisor.lock.state import LockState
from supervisor.log import get_logger
from supervisor.net import subscription

log = get_logger(__name__)

OnTamper = Callable[[str], Awaitable[None]]

# Pauses before subscribing again: doubled while each subscription fails at once (a broken
# socket must not spin), back to the start once one has lasted a while.
WATCH_RESTART_INITIAL_S = 0.1
WATCH_RESTART_MAX_S = 10.0
WATCH_STEADY_S = 30.0


def next_restart_delay(previous: float | None, lived_s: float) -> float:
    """The pause before the next monitor, given the last pause and how long the monitor lived."""
    if previous is None or lived_s >= WATCH_STEADY_S:
        return WATCH_RESTART_INITIAL_S
    return min(WATCH_RESTART_MAX_S, previous * 2)


class LockGuard:
    """Owns applying the lock while the daemon runs, and restores it after tampering."""

    def __init__(
        self, policy: LockPolicy, on_tamper: OnTamper | None = None, owner: OwningContext | None = None
    ) -> None:
        self.policy = policy
        self.owner = owner
        # Where there is no owner: a libnftables context that only reads (see _reading).
        self.reader: NftContext | None = None
        self._reference: str | None = None
        self._on_tamper = on_tamper
        self._lock = anyio.Lock()
        # The links as read at the last apply (on-link subnets, uplinks, bridges, bypass workloads).
        self.links: AppliedLinks | None = None
        self.restores = 0
        self.relinks = 0
        self.watch_restarts = 0  # times the nftables subscription failed and was made again
        self.link_watch_restarts = 0  # the same for the link, address and route subscription

    async def apply(self, policy: LockPolicy | None = None) -> None:
        """Install ``policy`` (or the current one) and remember what it looks like installed."""
        async with self._lock:
            # Remembered only once installed: a refused transaction leaves the old table in force,
            # and a restore after tampering must put back what is there, not what was refused.
            wanted = self.policy if policy is None else policy
            links = await anyio.to_thread.run_sync(self._apply, wanted)
            self.policy = wanted
            await self._applied(links)
            self._reference = await anyio.to_thread.run_sync(self._listing, self.policy.table)

    def _apply(self, policy: LockPolicy) -> AppliedLinks:
        """Both tables through the owner, else the ordinary one through nft; the links read."""
        return (self.owner or nft).apply(policy)

    async def _applied(self, links: AppliedLinks) -> None:
        """Remember the links the lock was applied to; say so when the bypass workloads change."""
        before = self.links.bypass if self.links is not None else ()
        if self.links is None or self.links.egress_devices != links.egress_devices:
            if egress_in_force(links):
                log.info(
                    "the lock's egress chain holds every frame leaving", devices=list(links.egress_devices)
                )
            elif not links.egress_refused:
                log.warning("no physical uplink found for the lock's egress chain (lock.uplinks names them)")
        self.links = links
        if links.bypass and links.bypass != before:
            log.warning(
                "workloads whose frames skip the host's netfilter: "
                + (
                    "the lock's egress chain on the uplink covers them"
                    if egress_in_force(links)
                    else "NOT covered by the lock (no egress chain here)"
                ),
                bypass=[w.as_dict() for w in links.bypass],
                egress=list(links.egress_devices) if egress_in_force(links) else [],
            )

    def _live(self, policy: LockPolicy) -> LockPolicy:
        """``policy`` with the egress devices the lock was applied with (element swaps cover
        the egress table's sets too when it is there)."""
        devices = self.links.egress_devices if egress_in_force(self.links) and self.links else ()
        return replace(policy, egress_devices=devices)

    # Reads go through a libnftables context (the owner's, else the reader's), not an `nft list`
    # child per read: every status request and every nftables event reads the table, and each
    # child's pipe buffers and listing came from the malloc arena of the worker thread that ran
    # it, which glibc trims only from its top. In the lab that arena grew to 3.8 MB, 94 % of it
    # free in ~300 pieces, after 120 link flaps (~50 status requests each): what
    # test_rss_levels_off_over_link_flaps and ..._over_status_requests caught. A context's thread
    # keeps one arena of ~0.7 MB throughout. The tool reads only where libnftables is missing.
    def _reading(self, table: str) -> tuple[str, dict[str, int]]:
        return (self.owner or self.reader or nft).reading(table)

    def _listing(self, table: str) -> str:
        return (self.owner or self.reader or nft).listing(table)

    async def swap_endpoints(self, policy: LockPolicy) -> None:
        """Move to ``policy``'s endpoints with element changes only (no moment without them)."""
        async with self._lock:
            old = self.policy.endpoints
            await anyio.to_thread.run_sync(
                (self.owner or nft).swap_endpoints, self._live(policy), old, policy.endpoints
            )
            self.policy = policy
            self._reference = await anyio.to_thread.run_sync(self._listing, policy.table)

    async def swap_tunnel_inbound(self, policy: LockPolicy) -> None:
        """Move to ``policy``'s inbound tunnel ports with element changes only."""
        async with self._lock:
            old = self.policy.tunnel_inbound
            await anyio.to_thread.run_sync(
                (self.owner or nft).swap_tunnel_inbound, policy, old, policy.tunnel_inbound
            )
            self.policy = policy
            self._reference = await anyio.to_thread.run_sync(self._listing, policy.table)

    async def check(self) -> str | None:
        """Compare the installed table with the reference; restore it if it differs. Why, or None."""
        async with self._lock:
            try:
                current = await anyio.to_thread.run_sync(self._listing, self.policy.table)
            except nft.LockError:
                current = None
            if current is not None and current == self._reference:
                return None
            reason = "the lock table was deleted" if current is None else "the lock table was changed"
            await self._applied(await anyio.to_thread.run_sync(self._apply, self.policy))
            self._reference = await anyio.to_thread.run_sync(self._listing, self.policy.table)
            self.restores += 1
        log.warning("lock tampered with; restored", reason=reason, table=self.policy.table)
        if self._on_tamper is not None:
            await self._on_tamper(reason)
        return reason

    async def check_links(self) -> bool:
        """Apply the lock again if the links (on-link subnets, uplinks, bridges) changed since it
        was applied; True if so."""
        async with self._lock:
            if self.links is None:
                return False
            now = await anyio.to_thread.run_sync(read_links, self.policy)
            if self.links.same_links(now):
                if now.bypass != self.links.bypass:
                    await self._applied(replace(self.links, bypass=now.bypass))
                return False
            try:
                await self._applied(await anyio.to_thread.run_sync(self._apply, self.policy))
            except nft.LockError as err:  # the old table stays in force; the next change retries
                log.error("applying the lock for new links failed", error=str(err))
                return False
            self._reference = await anyio.to_thread.run_sync(self._listing, self.policy.table)
            self.relinks += 1
        log.info(
            "links changed; lock applied again",
            onlink=[str(n) for n in now.onlink],
            egress=list(now.egress_devices),
            bridges=list(now.bridges),
        )
        return True

    async def follow_links(self) -> None:
        """Check the on-link subnets after every burst of link, address or route changes, until
        cancelled. A subscription that fails is opened again (after the same pauses as the
        nftables one) and the links checked at once: a change in between would go unseen."""
        delay: float | None = None
        first = True
        while True:
            began = anyio.current_time()
            try:
                with subscription.link_changes() as events:
                    # Subscribed before this check: nothing between the last reading and the
                    # subscription goes unseen. Not the first time: the apply that started the
                    # watch has just read the links, and the daemon's first connect waits for the
                    # guard's mutex (``ip monitor`` before had no such check at all).
                    if not first:
                        await self.check_links()
                    first = False
                    async for _ in subscription.bursts(events):
                        await self.check_links()
            except OSError as err:
                log.warning("the route change subscription failed; subscribing again", error=str(err))
            delay = next_restart_delay(delay, anyio.current_time() - began)
            self.link_watch_restarts += 1
            await anyio.sleep(delay)

    async def state(self) -> LockState:
        """The ordinary table installed, identical to what this guard last installed, the owned
        twin in place, and the ordinary table's counters; read without restoring."""
        owned = self.owner is not None and await anyio.to_thread.run_sync(self.owner.owns, self.policy.table)
        try:
            current, counters = await anyio.to_thread.run_sync(self._reading, self.policy.table)
        except nft.LockError:
            return LockState(owned=owned)
        return LockState(installed=True, matching=current == self._reference, owned=owned, counters=counters)

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow nftables events (``run``) and route changes (``follow_links``) until cancelled;
        when ``run`` ends, so does the rest."""
        async with anyio.create_task_group() as links:
            links.start_soon(self.follow_links)
            await self.run(task_status=task_status)
            links.cancel_scope.cancel()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow nftables events until cancelled; every burst of changes triggers a check. A
        subscription that fails is replaced (see the module's docstring); only failing to
        subscribe the first time is an error, since then the guard has never watched."""
        lived_s = await self._follow(task_status.started)
        delay: float | None = None
        while True:
            delay = next_restart_delay(delay, lived_s)
            self.watch_restarts += 1
            log.warning(
                "the nftables subscription ended; the lock guard subscribes again",
                after_s=delay,
                lived_s=round(lived_s, 3),
            )
            await anyio.sleep(delay)
            try:
                lived_s = await self._follow(lambda: None)
            except OSError as err:
                log.error("could not subscribe to nftables changes again; trying again", error=str(err))
                lived_s = 0.0

    async def _follow(self, started: Callable[[], None]) -> float:
        """Subscribe to nftables changes and check the table after each burst, until the
        subscription fails: how long it lived. Failing to subscribe raises OSError."""
        began = anyio.current_time()
        with subscription.nftables_changes() as events:
            # Subscribed before this check: a change made before it is seen by the check, one
            # made after it by the subscription.
            await self.check()
            started()
            try:
                async for _ in subscription.bursts(events):
                    await self.check()
            except OSError as err:
                log.warning("the nftables subscription failed", error=str(err))
        return anyio.current_time() - began
