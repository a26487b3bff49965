"""Keeping the lock in place while the daemon runs: detect tampering and restore at once.

Another program's ``nft flush ruleset``, ``delete table`` or a rule edit inside
our table must not leave the host open. The guard follows the kernel's
nftables events (``nft monitor``, one line per change, no polling), and after
every change compares our table with what it last installed; when the table is
missing or differs it re-applies the whole policy in one transaction and
reports the tampering.

``nft monitor`` rather than our own nfnetlink subscription: its event stream is
the reference decoder of nftables messages, and the guard only needs "something
changed", after which it reads the table back anyway.

The lock's LAN and neighbour-discovery sets hold the on-link subnets read when it
was applied (supervisor.lock.onlink); the guard also follows route changes
(``ip monitor route link``) and applies the lock again when those subnets change, so a
new lease on another network neither stays closed nor leaves the old subnet open. The same
goes for the physical uplinks that carry the egress chain and the local bridges
(supervisor.lock.links); workloads whose frames skip the host's netfilter (a macvlan child of
the uplink, a bridge with the uplink in it: supervisor.net.bypass) are logged when they appear.

With an owner (supervisor/lock/owner.py) every change goes through the daemon's own
libnftables context and covers both tables in one transaction: the ordinary one, which outlives
the daemon (a crash, SIGKILL, boot), and its owned twin, which no other program can flush or
delete. After a flush the twin keeps everything closed while the guard restores the ordinary
table. Without one (kernel or nft too old) the ordinary table and this guard are all there is,
and a flush opens the host until the restore (~50 ms; docs/lock.md).

The ``nft monitor`` child can die without the daemon meaning to stop: killed by an admin or
the OOM killer, or by a SIGTERM/SIGINT sent to the daemon's whole process group (systemd's
stop, Ctrl-C). That must never take the daemon down (its death once crashed it with
ProcessLookupError), nor leave the lock unwatched: the guard starts a new monitor after a
short pause that grows while monitors keep dying at once, and checks the table straight away,
since a change made while nothing watched would otherwise go unseen.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import replace

import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream

from supervisor.lock import nft
from supervisor.lock.links import AppliedLinks, egress_in_force, read_links
from supervisor.lock.owner import OwningContext
from supervisor.lock.policy import LockPolicy
from supervisor.log import get_logger

log = get_logger(__name__)

OnTamper = Callable[[str], Awaitable[None]]

# Pauses before starting a new ``nft monitor``: doubled while each dies at once (a broken nft
# must not spin), back to the start once one has run for a while.
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
        self._reference: str | None = None
        self._on_tamper = on_tamper
        self._lock = anyio.Lock()
        # The links as read at the last apply (on-link subnets, uplinks, bridges, bypass workloads).
        self.links: AppliedLinks | None = None
        self.restores = 0
        self.relinks = 0
        self.watch_restarts = 0  # times ``nft monitor`` died under us and was started again

    async def apply(self, policy: LockPolicy | None = None) -> None:
        """Install ``policy`` (or the current one) and remember what it looks like installed."""
        async with self._lock:
            if policy is not None:
                self.policy = policy
            await self._applied(await anyio.to_thread.run_sync(self._apply, self.policy))
            self._reference = await anyio.to_thread.run_sync(nft.listing, self.policy.table)

    def _apply(self, policy: LockPolicy) -> AppliedLinks:
        """Both tables through the owner, else the ordinary one through nft; the links read."""
        return (self.owner or nft).apply(policy)

    async def _applied(self, links: AppliedLinks) -> None:
        """Remember the links the lock was applied to; say so when the bypass workloads change."""
        before = self.links.bypass if self.links is not None else ()
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

    async def swap_endpoints(self, policy: LockPolicy) -> None:
        """Move to ``policy``'s endpoints with element changes only (no moment without them)."""
        async with self._lock:
            old = self.policy.endpoints
            self.policy = policy
            await anyio.to_thread.run_sync(
                (self.owner or nft).swap_endpoints, self._live(policy), old, policy.endpoints
            )
            self._reference = await anyio.to_thread.run_sync(nft.listing, policy.table)

    async def swap_tunnel_inbound(self, policy: LockPolicy) -> None:
        """Move to ``policy``'s inbound tunnel ports with element changes only."""
        async with self._lock:
            old = self.policy.tunnel_inbound
            self.policy = policy
            await anyio.to_thread.run_sync(
                (self.owner or nft).swap_tunnel_inbound, policy, old, policy.tunnel_inbound
            )
            self._reference = await anyio.to_thread.run_sync(nft.listing, policy.table)

    async def check(self) -> str | None:
        """Compare the installed table with the reference; restore it if it differs. Why, or None."""
        async with self._lock:
            try:
                current = await anyio.to_thread.run_sync(nft.listing, self.policy.table)
            except nft.LockError:
                current = None
            if current is not None and current == self._reference:
                return None
            reason = "the lock table was deleted" if current is None else "the lock table was changed"
            await self._applied(await anyio.to_thread.run_sync(self._apply, self.policy))
            self._reference = await anyio.to_thread.run_sync(nft.listing, self.policy.table)
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
            self._reference = await anyio.to_thread.run_sync(nft.listing, self.policy.table)
            self.relinks += 1
        log.info(
            "links changed; lock applied again",
            onlink=[str(n) for n in now.onlink],
            egress=list(now.egress_devices),
            bridges=list(now.bridges),
        )
        return True

    async def follow_links(self) -> None:
        """Check the on-link subnets after every route change, until cancelled."""
        try:
            process = await anyio.open_process(["ip", "monitor", "route", "link"])
        except OSError as err:  # no iproute2: the sets stay as applied (the LAN may stay closed)
            log.warning("cannot follow route changes; on-link subnets read at apply only", error=str(err))
            return
        async with process:
            assert process.stdout is not None
            try:
                async for chunk in TextReceiveStream(process.stdout):
                    if chunk.strip():
                        await self.check_links()
            finally:
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(ProcessLookupError):  # it may have gone already
                        process.terminate()
                    with anyio.move_on_after(2):
                        await process.wait()

    async def state(self) -> tuple[bool, bool, bool, dict[str, int]]:
        """(ordinary table installed, identical to what this guard last installed, owned twin
        in place, the ordinary table's counters), read without restoring."""
        owned = self.owner is not None and await anyio.to_thread.run_sync(self.owner.owns, self.policy.table)
        try:
            current, counters = await anyio.to_thread.run_sync(nft.reading, self.policy.table)
        except nft.LockError:
            return False, False, owned, {}
        return True, current == self._reference, owned, counters

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow nftables events (``run``) and route changes (``follow_links``) until cancelled;
        when ``run`` ends, so does the rest."""
        async with anyio.create_task_group() as links:
            links.start_soon(self.follow_links)
            await self.run(task_status=task_status)
            links.cancel_scope.cancel()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow nftables events until cancelled; every change triggers a check. A monitor that
        dies is replaced (see the module's docstring); only failing to start the first is an
        error, since then the guard has never watched."""
        lived_s = await self._follow(task_status.started)
        delay: float | None = None
        while True:
            delay = next_restart_delay(delay, lived_s)
            self.watch_restarts += 1
            log.warning(
                "nft monitor ended; the lock guard restarts it", after_s=delay, lived_s=round(lived_s, 3)
            )
            await anyio.sleep(delay)
            try:
                lived_s = await self._follow(lambda: None)
            except OSError as err:
                log.error("could not restart nft monitor; trying again", error=str(err))
                lived_s = 0.0

    async def _follow(self, started: Callable[[], None]) -> float:
        """Run one ``nft monitor`` and check the table on each change, until it ends: how long
        it lived. Cancelled, it ends the child."""
        began = anyio.current_time()
        process = await anyio.open_process(
            [nft.NFT, "monitor"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        async with process:
            assert process.stdout is not None
            try:
                # nft monitor subscribes before it prints anything; check once after it is up so
                # a change in between cannot be missed.
                await anyio.sleep(0.05)
                await self.check()
                started()
                async for chunk in TextReceiveStream(process.stdout):
                    if chunk.strip():
                        await self.check()
            finally:
                with anyio.CancelScope(shield=True):
                    if process.returncode is None:
                        # Gone already (and reaped) is fine: that is what ended the loop.
                        with contextlib.suppress(ProcessLookupError):
                            process.terminate()
                    with anyio.move_on_after(2):
                        await process.wait()
        return anyio.current_time() - began
