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
(``ip monitor route``) and applies the lock again when those subnets change, so a
new lease on another network neither stays closed nor leaves the old subnet open.

Why not the ``owner`` flag: an owned table is removed by the kernel when the
owning netlink socket closes, so a crashed or SIGKILLed daemon would take the
lock with it. nft 1.0.6 cannot set ``persist`` (which keeps an owned table when
its owner goes), so here the lock stays an ordinary table that outlives the
daemon, and the guard restores it within milliseconds of any change (see
docs/lock.md for the measured figure and the trade-off).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream

from supervisor.lock import nft
from supervisor.lock.onlink import read_onlink
from supervisor.lock.policy import LockPolicy
from supervisor.log import get_logger

log = get_logger(__name__)

OnTamper = Callable[[str], Awaitable[None]]


class LockGuard:
    """Owns applying the lock while the daemon runs, and restores it after tampering."""

    def __init__(self, policy: LockPolicy, on_tamper: OnTamper | None = None) -> None:
        self.policy = policy
        self._reference: str | None = None
        self._on_tamper = on_tamper
        self._lock = anyio.Lock()
        self._onlink: tuple | None = None
        self.restores = 0
        self.relinks = 0

    async def apply(self, policy: LockPolicy | None = None) -> None:
        """Install ``policy`` (or the current one) and remember what it looks like installed."""
        async with self._lock:
            if policy is not None:
                self.policy = policy
            self._onlink = await anyio.to_thread.run_sync(nft.apply, self.policy)
            self._reference = await anyio.to_thread.run_sync(nft.listing, self.policy.table)

    async def swap_endpoints(self, policy: LockPolicy) -> None:
        """Move to ``policy``'s endpoints with element changes only (no moment without them)."""
        async with self._lock:
            old = self.policy.endpoints
            self.policy = policy
            await anyio.to_thread.run_sync(nft.swap_endpoints, policy, old, policy.endpoints)
            self._reference = await anyio.to_thread.run_sync(nft.listing, policy.table)

    async def swap_tunnel_inbound(self, policy: LockPolicy) -> None:
        """Move to ``policy``'s inbound tunnel ports with element changes only."""
        async with self._lock:
            old = self.policy.tunnel_inbound
            self.policy = policy
            await anyio.to_thread.run_sync(nft.swap_tunnel_inbound, policy, old, policy.tunnel_inbound)
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
            self._onlink = await anyio.to_thread.run_sync(nft.apply, self.policy)
            self._reference = await anyio.to_thread.run_sync(nft.listing, self.policy.table)
            self.restores += 1
        log.warning("lock tampered with; restored", reason=reason, table=self.policy.table)
        if self._on_tamper is not None:
            await self._on_tamper(reason)
        return reason

    async def check_links(self) -> bool:
        """Apply the lock again if the on-link subnets changed since it was applied; True if so."""
        async with self._lock:
            onlink = await anyio.to_thread.run_sync(
                functools.partial(read_onlink, exclude=(self.policy.tunnel_interface,))
            )
            if self._onlink is None or onlink == self._onlink:
                return False
            try:
                self._onlink = await anyio.to_thread.run_sync(nft.apply, self.policy)
            except nft.LockError as err:  # the old table stays in force; the next change retries
                log.error("applying the lock for new on-link subnets failed", error=str(err))
                return False
            self._reference = await anyio.to_thread.run_sync(nft.listing, self.policy.table)
            self.relinks += 1
        log.info("on-link subnets changed; lock applied again", onlink=[str(n) for n in onlink])
        return True

    async def follow_links(self) -> None:
        """Check the on-link subnets after every route change, until cancelled."""
        try:
            process = await anyio.open_process(["ip", "monitor", "route"])
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

    async def state(self) -> tuple[bool, bool, dict[str, int]]:
        """(installed, identical to what this guard last installed, its counters), read without
        restoring."""
        try:
            current, counters = await anyio.to_thread.run_sync(nft.reading, self.policy.table)
        except nft.LockError:
            return False, False, {}
        return True, current == self._reference, counters

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow nftables events (``run``) and route changes (``follow_links``) until cancelled;
        when ``run`` ends, so does the rest."""
        async with anyio.create_task_group() as links:
            links.start_soon(self.follow_links)
            await self.run(task_status=task_status)
            links.cancel_scope.cancel()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow nftables events until cancelled; every change triggers a check."""
        async with await anyio.open_process([nft.NFT, "monitor"]) as process:
            assert process.stdout is not None
            # nft monitor subscribes before it prints anything; check once after it is up so a
            # change in between cannot be missed.
            await anyio.sleep(0.05)
            await self.check()
            task_status.started()
            try:
                async for chunk in TextReceiveStream(process.stdout):
                    if chunk.strip():
                        await self.check()
            finally:
                with anyio.CancelScope(shield=True):
                    process.terminate()
                    with anyio.move_on_after(2):
                        await process.wait()
