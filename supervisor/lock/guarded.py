"""The lock's one owner while the daemon runs: one wanted value, compared with what is installed.

``GuardedLock`` is the runtime's ``Lock`` (supervisor/runtime.py) and the only writer of the
lock table while the daemon runs. What the lock should let through is one frozen value, a
``LockIntent`` (the base policy from the configuration, the servers the machine lets the tunnel
reach, the ports plugins asked the tunnel to accept). Every change, whoever asks for it (the
machine's actions through the runtime, a reload through the runtime's loop, a plugin's port
request), is an edit of that value made under one mutex: the new value is computed from the
current one, compared with what is installed, and installed by the cheapest change that is still
one transaction (an element swap of endpoints or inbound ports, else the whole table). Reading
the wanted value and installing it never interleave with another change, so the table, the
guard's memory of it and the wanted value always agree (the shape of Mullvad's firewall, where
every ``AllowEndpoint`` goes through the tunnel state machine to one ``apply_policy``).

Between changes the guard (supervisor/lock/guard.py) watches the table and restores what was
last installed after tampering.

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
from msgspec import Struct
from msgspec.structs import replace

from supervisor.lock import nft
from supervisor.lock.guard import LockGuard, OnTamper
from supervisor.lock.libnftables import OwnerUnavailable
from supervisor.lock.links import AppliedLinks, egress_in_force
from supervisor.lock.owner import NftContext, OwningContext
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import owned_table
from supervisor.lock.state import LockState
from supervisor.log import get_logger
from supervisor.servers import Server

log = get_logger(__name__)

# At exit, putting the ordinary table back in place may not hold the daemon up longer than this.
LOCK_CLOSE_TIMEOUT_S = 15.0

InboundPorts = frozenset[tuple[str, int]]


class LockIntent(Struct, frozen=True):
    """What the lock should let through now: the one value every change edits."""

    base: LockPolicy  # from the configuration: everything around the endpoints
    servers: tuple[Server, ...] = ()  # the servers the tunnel may reach (the machine's choice)
    tunnel_inbound: InboundPorts = frozenset()  # ports plugins asked the tunnel to accept

    def policy(self) -> LockPolicy:
        """The policy to install for this intent."""
        return self.base.with_servers(self.servers).with_tunnel_inbound(self.tunnel_inbound)


class Guard(Protocol):
    """What ``GuardedLock`` needs of ``LockGuard``."""

    policy: LockPolicy
    owner: OwningContext | None
    links: AppliedLinks | None
    reader: NftContext | None

    @property
    def restores(self) -> int:
        """Times the table was restored after tampering."""

    async def apply(self, policy: LockPolicy) -> None: ...

    async def swap_endpoints(self, policy: LockPolicy) -> None: ...

    async def swap_tunnel_inbound(self, policy: LockPolicy) -> None: ...

    async def state(self) -> LockState: ...

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None: ...


class OrdinaryTable(Protocol):
    """The ordinary table's commands without an owner (``supervisor.lock.nft``)."""

    def apply(self, policy: LockPolicy) -> object: ...

    def remove(self, table: str) -> object: ...


def cheapest_change(installed: LockPolicy | None, wanted: LockPolicy) -> str | None:
    """How to go from ``installed`` to ``wanted`` in one transaction: ``"endpoints"`` or
    ``"inbound"`` (an element swap, when that is all that differs), ``"whole"`` (the table
    replaced: another resolver means other rules), or None when nothing differs."""
    if installed is None:
        return "whole"
    if installed == wanted:
        return None
    if replace(installed, endpoints=wanted.endpoints) == wanted:
        return "endpoints"
    if replace(installed, tunnel_inbound=wanted.tunnel_inbound) == wanted:
        return "inbound"
    return "whole"


class GuardedLock:
    """The lock's one writer while the daemon runs: edits of one ``LockIntent``, each installed
    under one mutex; the guard watches between."""

    def __init__(
        self,
        base: LockPolicy,
        task_group: anyio.abc.TaskGroup,
        on_tamper: OnTamper,
        *,
        make_guard: Callable[[LockPolicy, OnTamper], Guard] = LockGuard,
        open_owner: Callable[[str], OwningContext] = OwningContext.open,
        open_reader: Callable[[], NftContext] = NftContext,
        ordinary: OrdinaryTable = nft,
    ) -> None:
        """``base``: the policy around the endpoints; ``on_tamper``: told why, after each restore;
        the guard's watch runs in ``task_group`` from the first apply on."""
        self.intent = LockIntent(base)
        self.guard = make_guard(base, on_tamper)
        self._task_group = task_group
        self._open_owner_context = open_owner
        self._open_reader_context = open_reader
        self._ordinary = ordinary
        self._watch: anyio.CancelScope | None = None
        self._changing = anyio.Lock()
        self._installed = False  # the intent is in the table (False before the first apply, after remove)
        self._owner_checked = False

    @property
    def servers(self) -> tuple[Server, ...]:
        """The servers the lock lets the tunnel reach."""
        return self.intent.servers

    async def _open_owner(self) -> None:
        self._owner_checked = True
        table = self.intent.base.table
        try:
            self.guard.owner = await anyio.to_thread.run_sync(self._open_owner_context, table)
        except OwnerUnavailable as err:
            log.warning(
                "the nf_tables owner flag is not available here: the lock is the ordinary table and its "
                "guard alone, so another program's `nft flush ruleset` opens it until the guard restores "
                "it (~50 ms)",
                reason=str(err),
            )
            await self._open_reader()
            return
        log.info("the lock is held twice while running", table=table, owned_table=owned_table(table))

    async def _open_reader(self) -> None:
        """Without an owner, a libnftables context for the guard's reads all the same (an ``nft``
        child per read left a worker thread's memory fragmented: LockGuard._reading)."""
        try:
            self.guard.reader = await anyio.to_thread.run_sync(self._open_reader_context)
        except OwnerUnavailable as err:  # no libnftables: the nft tool reads
            log.info("libnftables cannot be loaded; the nft tool reads the lock", reason=str(err))

    async def _change(self, edit: Callable[[LockIntent], LockIntent], *, whole: bool = False) -> None:
        """Edit the intent and install it, all under the one mutex. Until the first apply (and
        after a removal) an edit is only remembered: the next apply installs it."""
        async with self._changing:
            wanted = edit(self.intent)
            if not self._installed and not whole:
                self.intent = wanted
                return
            if not self._owner_checked:
                await self._open_owner()
            policy = wanted.policy()
            change = "whole" if whole or not self._installed else cheapest_change(self.guard.policy, policy)
            if change == "endpoints" or change == "inbound":
                try:
                    if change == "endpoints":
                        await self.guard.swap_endpoints(policy)
                    else:
                        await self.guard.swap_tunnel_inbound(policy)
                except Exception as err:  # a table someone changed: the whole table replaces it
                    log.warning(f"{change} swap failed; applying the whole lock", error=str(err))
                    change = "whole"
            if change == "whole":
                await self.guard.apply(policy)
            self.intent = wanted
            self._installed = True
            if self._watch is None:
                await self._task_group.start(self._guard)

    async def _guard(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.CancelScope() as self._watch:
            await self.guard.watch(task_status=task_status)

    async def apply(self, servers: tuple[Server, ...]) -> None:
        """Install the whole table letting the tunnel reach ``servers`` (at start, after doubt)."""
        await self._change(lambda intent: replace(intent, servers=servers), whole=True)

    async def set_servers(self, servers: tuple[Server, ...]) -> None:
        """Let the tunnel reach ``servers`` instead, by the cheapest single transaction."""
        await self._change(lambda intent: replace(intent, servers=servers))

    async def rebase(self, base: LockPolicy, servers: Mapping[str, Server]) -> None:
        """A reload: the policy around the endpoints (LAN, ports) and the servers as now read.
        The lock keeps letting through the servers it did that are still configured (the
        machine moves off a dropped one next), and is re-applied only where it differs."""

        def rebased(intent: LockIntent) -> LockIntent:
            kept = tuple(servers[s.name] for s in intent.servers if s.name in servers)
            return replace(intent, base=base, servers=kept)

        await self._change(rebased)

    async def set_tunnel_inbound(self, pairs: InboundPorts) -> None:
        """What a plugin may change: the ports accepted through the tunnel (element swap)."""
        await self._change(lambda intent: replace(intent, tunnel_inbound=pairs))

    async def remove(self) -> None:
        async with self._changing:
            if self._watch is not None:
                self._watch.cancel()  # or the guard would put it straight back
            owner = self.guard.owner
            table = self.intent.base.table
            if owner is not None:
                await anyio.to_thread.run_sync(owner.remove, table)  # both tables, one transaction
            else:
                await anyio.to_thread.run_sync(self._ordinary.remove, table)
            self._installed = False

    async def close(self) -> None:
        """At exit: the owned twin goes with the context. Unless the lock was removed, the
        ordinary table is put in place first, so that a flush just before the end cannot leave
        the host open."""
        if self._watch is not None:
            self._watch.cancel()
        async with self._changing:
            reader, self.guard.reader = self.guard.reader, None
            if reader is not None:
                await anyio.to_thread.run_sync(reader.close)
            owner, self.guard.owner = self.guard.owner, None
            if owner is None:
                return
            try:
                if self._installed:
                    with anyio.fail_after(LOCK_CLOSE_TIMEOUT_S):
                        await anyio.to_thread.run_sync(self._ordinary.apply, self.guard.policy)
            except Exception as err:  # exiting anyway: say so, the ordinary table is as it was
                log.error("could not re-apply the lock at exit", error=str(err))
            finally:
                await anyio.to_thread.run_sync(owner.close)

    async def state(self) -> LockState:
        """The lock as the guard reads it now, with the links it was last applied to: the
        uplinks the egress chain is on and the bypass workloads."""
        state = await self.guard.state()
        links = self.guard.links
        if links is None:
            return state
        egress = links.egress_devices if egress_in_force(links) else ()
        return replace(state, egress=tuple(egress), bypass=tuple(w.as_dict() for w in links.bypass))

    @property
    def restores(self) -> int:
        """Times the guard restored the lock after tampering (for the metrics)."""
        return self.guard.restores
