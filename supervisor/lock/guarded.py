"""The lock as the daemon's runtime drives it: a guard that applies, swaps and watches between.

``GuardedLock`` is the runtime's ``Lock`` (supervisor/runtime.py). It knows which servers the
lock lets through now, and chooses the cheapest change that is still one transaction: moving
to other servers swaps the endpoint elements when their tunnel DNS stays the same, and applies
the whole table when it does not (another resolver means other rules). Between changes the
guard (supervisor/lock/guard.py) watches the table and restores it after tampering.

While the daemon runs, the lock is also held in an owned twin table that no other program can
flush or delete (supervisor/lock/owner.py), when the kernel and nft here allow it; the first
apply finds out and says so once, either way. At exit the twin goes with its context; the
ordinary table stays unless the lock was removed.

The guard, the owning context and the ordinary table's commands are passed in (by default the
real ones) so that these decisions are tested without root, against stand-ins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import anyio
import anyio.abc

from supervisor.lock import nft
from supervisor.lock.guard import LockGuard, OnTamper
from supervisor.lock.links import AppliedLinks, egress_in_force
from supervisor.lock.owner import OwnerUnavailable, OwningContext
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import owned_table
from supervisor.log import get_logger
from supervisor.servers import Server

log = get_logger(__name__)

# At exit, putting the ordinary table back in place may not hold the daemon up longer than this.
LOCK_CLOSE_TIMEOUT_S = 15.0


class Guard(Protocol):
    """What ``GuardedLock`` needs of ``LockGuard``."""

    policy: LockPolicy
    owner: OwningContext | None
    links: AppliedLinks | None

    @property
    def restores(self) -> int:
        """Times the table was restored after tampering."""

    async def apply(self, policy: LockPolicy) -> None: ...

    async def swap_endpoints(self, policy: LockPolicy) -> None: ...

    async def swap_tunnel_inbound(self, policy: LockPolicy) -> None: ...

    async def state(self) -> tuple[bool, bool, bool, dict[str, int]]: ...

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None: ...


class OrdinaryTable(Protocol):
    """The ordinary table's commands without an owner (``supervisor.lock.nft``)."""

    def apply(self, policy: LockPolicy) -> object: ...

    def remove(self, table: str) -> object: ...


class GuardedLock:
    """The lock as the runtime drives it: the guard applies and swaps, and watches between."""

    def __init__(
        self,
        base: LockPolicy,
        task_group: anyio.abc.TaskGroup,
        on_tamper: OnTamper,
        *,
        make_guard: Callable[[LockPolicy, OnTamper], Guard] = LockGuard,
        open_owner: Callable[[str], OwningContext] = OwningContext.open,
        ordinary: OrdinaryTable = nft,
    ) -> None:
        """``base``: the policy around the endpoints; ``on_tamper``: told why, after each restore;
        the guard's watch runs in ``task_group`` from the first apply on."""
        self.base = base
        self.servers: tuple[Server, ...] = ()
        self.guard = make_guard(base, on_tamper)
        self._task_group = task_group
        self._open_owner_context = open_owner
        self._ordinary = ordinary
        self._watch: anyio.CancelScope | None = None
        # Ports plugins asked the tunnel to accept (a forwarded port): kept across whole applies.
        self.tunnel_inbound: frozenset[tuple[str, int]] = frozenset()
        self._owner_checked = False
        self._removed = False

    def _policy(self, servers: tuple[Server, ...]) -> LockPolicy:
        return self.base.with_servers(servers).with_tunnel_inbound(self.tunnel_inbound)

    async def _open_owner(self) -> None:
        self._owner_checked = True
        table = self.base.table
        try:
            self.guard.owner = await anyio.to_thread.run_sync(self._open_owner_context, table)
        except OwnerUnavailable as err:
            log.warning(
                "the nf_tables owner flag is not available here: the lock is the ordinary table and its "
                "guard alone, so another program's `nft flush ruleset` opens it until the guard restores "
                "it (~50 ms)",
                reason=str(err),
            )
            return
        log.info("the lock is held twice while running", table=table, owned_table=owned_table(table))

    async def apply(self, servers: tuple[Server, ...]) -> None:
        if not self._owner_checked:
            await self._open_owner()
        self._removed = False
        self.servers = servers
        await self.guard.apply(self._policy(servers))
        if self._watch is None:
            await self._task_group.start(self._guard)

    async def _guard(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.CancelScope() as self._watch:
            await self.guard.watch(task_status=task_status)

    async def set_servers(self, servers: tuple[Server, ...]) -> None:
        policy = self._policy(servers)
        if policy.tunnel_dns != self.guard.policy.tunnel_dns:
            await self.guard.apply(policy)  # another resolver too: the whole table at once
        else:
            await self.guard.swap_endpoints(policy)
        self.servers = servers

    async def rebase(self, base: LockPolicy, servers: Mapping[str, Server]) -> None:
        """A reload: the policy around the endpoints (LAN, ports) and the servers as now read.
        The lock keeps letting through the servers it did that are still configured (the
        machine moves off a dropped one next), and is re-applied only where it differs."""
        self.base = base
        self.servers = tuple(servers[s.name] for s in self.servers if s.name in servers)
        if self._policy(self.servers) != self.guard.policy:
            await self.apply(self.servers)

    async def set_tunnel_inbound(self, pairs: frozenset[tuple[str, int]]) -> None:
        """What a plugin may change: the ports accepted through the tunnel (element swap)."""
        self.tunnel_inbound = pairs
        await self.guard.swap_tunnel_inbound(self._policy(self.servers))

    async def remove(self) -> None:
        if self._watch is not None:
            self._watch.cancel()  # or the guard would put it straight back
        owner = self.guard.owner
        if owner is not None:
            await anyio.to_thread.run_sync(owner.remove, self.base.table)  # both tables, one transaction
        else:
            await anyio.to_thread.run_sync(self._ordinary.remove, self.base.table)
        self._removed = True

    async def close(self) -> None:
        """At exit: the owned twin goes with the context. Unless the lock was removed, the
        ordinary table is put in place first, so that a flush just before the end cannot leave
        the host open."""
        if self._watch is not None:
            self._watch.cancel()
        owner, self.guard.owner = self.guard.owner, None
        if owner is None:
            return
        try:
            if not self._removed:
                with anyio.fail_after(LOCK_CLOSE_TIMEOUT_S):
                    await anyio.to_thread.run_sync(self._ordinary.apply, self.guard.policy)
        except Exception as err:  # exiting anyway: say so, the ordinary table is as it was
            log.error("could not re-apply the lock at exit", error=str(err))
        finally:
            await anyio.to_thread.run_sync(owner.close)

    async def state(self) -> tuple[bool, bool, bool, dict[str, int]]:
        return await self.guard.state()

    def exposure(self) -> tuple[list[str], list[dict[str, str]]]:
        """The uplinks the egress chain is on and the bypass workloads, as last applied."""
        links = self.guard.links
        if links is None:
            return [], []
        egress = list(links.egress_devices) if egress_in_force(links) else []
        return egress, [w.as_dict() for w in links.bypass]

    @property
    def restores(self) -> int:
        """Times the guard restored the lock after tampering (for the metrics)."""
        return self.guard.restores
