"""An nftables held in memory, standing in for ``supervisor.lock.nft`` in unit tests.

nft cannot run without root (nor outside a lab namespace); the lock guard's logic is driven
against this instead: one table rendered as text from the policy, and what was asked of it.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import anyio
import anyio.abc

from supervisor.lock import nft
from supervisor.lock.guard import LockGuard
from supervisor.lock.guarded import GuardedLock
from supervisor.lock.libnftables import OwnerUnavailable
from supervisor.lock.links import AppliedLinks
from supervisor.lock.policy import LockPolicy
from supervisor.servers import Endpoint


class MemoryNft:
    """One table, rendered as text from the policy; counters per name."""

    def __init__(self) -> None:
        self.installed: str | None = None
        self.onlink: tuple[IPv4Network, ...] = (IPv4Network("192.0.2.0/24"),)
        self.applied: list[LockPolicy] = []
        self.swaps: list[tuple[frozenset[Endpoint], frozenset[Endpoint]]] = []
        self.inbound_swaps: list[tuple[frozenset[tuple[str, int]], frozenset[tuple[str, int]]]] = []

    def render(self, policy: LockPolicy) -> str:
        return f"table {policy.table} endpoints {sorted(map(str, policy.endpoints))}"

    def apply(self, policy: LockPolicy) -> AppliedLinks:
        self.applied.append(policy)
        self.installed = self.render(policy)
        return AppliedLinks(onlink=self.onlink)  # what the real one read while applying

    def swap_endpoints(self, policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> None:
        self.swaps.append((old, new))
        self.installed = self.render(policy)

    def swap_tunnel_inbound(
        self, policy: LockPolicy, old: frozenset[tuple[str, int]], new: frozenset[tuple[str, int]]
    ) -> None:
        self.inbound_swaps.append((old, new))
        self.installed = self.render(policy) + f" inbound {sorted(policy.tunnel_inbound)}"

    def listing(self, table: str) -> str:
        if self.installed is None:
            raise nft.LockError(f"no table {table}")
        return self.installed

    def reading(self, table: str) -> tuple[str, dict[str, int]]:
        return self.listing(table), {"refused_out": 12}


def no_owner(table: str) -> Any:
    raise OwnerUnavailable("nft: Error: Could not process rule: Operation not supported")


def no_libnftables() -> Any:
    raise OwnerUnavailable("libnftables.so.1 cannot be loaded (cannot open shared object file)")


class UnwatchedGuard(LockGuard):
    """The real guard (its mutex, its memory of what it installed, its restore) over the
    in-memory nft; its watch (``nft monitor``, which needs root) is not what these tests drive."""

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()


def guarded_lock_over_memory_nft(base: LockPolicy, tg: anyio.abc.TaskGroup) -> GuardedLock:
    """The lock's writer with the real guard (unwatched) over the in-memory nft (the
    ``memory_nft`` fixture), no owner."""

    async def on_tamper(reason: str) -> None:
        pass

    return GuardedLock(
        base, tg, on_tamper, make_guard=UnwatchedGuard, open_owner=no_owner, open_reader=no_libnftables
    )
