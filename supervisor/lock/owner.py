"""The owned twin of the lock: one libnftables context, held by the daemon for its whole life.

nf_tables lets a table carry the ``owner`` flag (Linux >= 5.12, nft >= 0.9.9): the table then
belongs to the netlink socket that created it. Checked on this kernel (6.18) and Debian 12's
6.1 (the VM tier): another process's ``nft flush ruleset`` leaves it in place, its ``delete
table`` or any edit gets EPERM, only the owning socket can change it, and the kernel frees it
when that socket closes (the process exits, SIGKILL included).

So while the daemon runs, the lock is held twice: the ordinary table (survives a crash, loads
at boot) and its owned twin with the same rules. A packet must be accepted by both (every base
chain at a hook drops on its own; an accept in one table ends nothing in another), so a flush
of the ordinary table opens nothing, and the guard restores it at leisure.

The owning socket is a libnftables context (``nft_ctx_new``) called through ctypes: the
``nft`` tool opens and closes its socket per run, which would free the table at once. A
context is not thread-safe, and its socket must live in the daemon's network namespace, so it
is created and used in one dedicated thread; callers (worker threads of the event loop) hand
it jobs and wait for their result.

The guard reads the ordinary table through the same context (``NftContext.reading``), and where
the kernel or nft cannot own a table, through a context of its own that only reads: an ``nft
list`` child per read (every status request, every nftables event) left its buffers in the
malloc arena of the worker thread that ran it, which grew for good (docs/supervisor.md, memory).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from supervisor.lock.libnftables import LIBRARY, Libnftables, LockError, OwnerUnavailable
from supervisor.lock.links import AppliedLinks, apply_read
from supervisor.lock.nft import parse_reading
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import (
    owned_table,
    render,
    render_endpoint_swap,
    render_owned,
    render_tunnel_inbound_swap,
)
from supervisor.safety import ensure_safe_to_lock
from supervisor.servers import Endpoint

_CLOSE_TIMEOUT_S = 10.0


def probe_script(table: str) -> str:
    """Create and delete an owned table in one transaction: fails where the flag is unknown
    (nft < 0.9.9: a syntax error; Linux < 5.12: EOPNOTSUPP) and leaves nothing behind."""
    name = f"{table}_ownercheck"
    return f"add table inet {name} {{ flags owner; }}\ndelete table inet {name}\n"


def apply_script(policy: LockPolicy) -> str:
    """Both tables, installed or replaced in one transaction.

    The twin first: of base chains at one hook and priority, the kernel runs the one registered
    last first, so the ordinary table sees every packet and its counters (what status and the
    metrics report) count every refusal; the twin only ever sees what the ordinary one let by.
    """
    return render_owned(policy) + render(policy)


def swap_script(policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> str:
    """The same element changes in both tables, in one transaction ('' when nothing changes)."""
    egress = bool(policy.egress_devices)
    return render_endpoint_swap(policy.table, old, new, egress=egress) + render_endpoint_swap(
        owned_table(policy.table), old, new, egress=egress
    )


def tunnel_inbound_swap_script(
    policy: LockPolicy, old: frozenset[tuple[str, int]], new: frozenset[tuple[str, int]]
) -> str:
    """The same inbound-port changes in both tables, in one transaction ('' when none)."""
    return render_tunnel_inbound_swap(policy.table, old, new) + render_tunnel_inbound_swap(
        owned_table(policy.table), old, new
    )


def remove_script(table: str) -> str:
    """Delete both tables in one transaction, whether or not each is there (``add`` first)."""
    owned = owned_table(table)
    return (
        f"add table inet {table}\ndelete table inet {table}\n"
        f"add table netdev {table}\ndelete table netdev {table}\n"
        f"add table inet {owned} {{ flags owner; }}\ndelete table inet {owned}\n"
        f"add table netdev {owned} {{ flags owner; }}\ndelete table netdev {owned}\n"
    )


_Job = tuple[Callable[[Libnftables], Any], Future]


class NftContext:
    """One libnftables context, in a thread of its own until :meth:`close`; OwnerUnavailable
    where libnftables cannot be loaded.

    Every method blocks its caller until the context's thread has run the job: call them from a
    worker thread (``anyio.to_thread.run_sync``), never on the event loop.
    """

    thread_name = "nft-context"

    def __init__(self, library: str = LIBRARY) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        ready: Future[None] = Future()
        # The thread inherits the caller's network namespace, and the context's socket the thread's.
        self._thread = threading.Thread(
            target=self._serve, args=(library, ready), name=self.thread_name, daemon=True
        )
        self._thread.start()
        ready.result()

    def _serve(self, library: str, ready: Future[None]) -> None:
        try:
            ensure_safe_to_lock()
            nft = Libnftables(library)
        except BaseException as err:  # the constructor re-raises it in the caller's thread
            ready.set_exception(err)
            return
        ready.set_result(None)
        try:
            while (job := self._jobs.get()) is not None:
                work, result = job
                if not result.set_running_or_notify_cancel():
                    continue
                try:
                    result.set_result(work(nft))
                except BaseException as err:
                    result.set_exception(err)
        finally:
            nft.free()

    def _call(self, work: Callable[[Libnftables], Any]) -> Any:
        if not self._thread.is_alive():
            raise LockError("the libnftables context is closed")
        result: Future = Future()
        self._jobs.put((work, result))
        return result.result()

    def run(self, script: str) -> str:
        def checked(nft: Libnftables) -> str:
            ensure_safe_to_lock()
            return nft.run(script)

        return self._call(checked)

    def reading(self, table: str) -> tuple[str, dict[str, int]]:
        """``nft.reading`` through this context: the ordinary table as a tamper check compares it,
        and its counters (LockError when it is not there)."""
        return parse_reading(self.run(f"list table inet {table}"))

    def listing(self, table: str) -> str:
        return self.reading(table)[0]

    def close(self) -> None:
        """Free the context (and with its socket every table it owns)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(_CLOSE_TIMEOUT_S)


class OwningContext(NftContext):
    """The daemon's one libnftables context that holds the owned twin, made by :meth:`open`."""

    thread_name = "nft-owner"

    @classmethod
    def open(cls, table: str, library: str = LIBRARY) -> OwningContext:
        """A context that has shown it can own a table here; OwnerUnavailable (with the reason)
        where the kernel, nft or libnftables cannot."""
        ensure_safe_to_lock()
        owner = cls(library)
        try:
            owner.run(probe_script(table))
        except LockError as err:
            owner.close()
            raise OwnerUnavailable(str(err)) from None
        return owner

    def apply(self, policy: LockPolicy) -> AppliedLinks:
        """Install or replace both tables in one transaction; like ``nft.apply``, filled in with
        the links read now (on-link subnets, uplinks, bridges), which are returned."""

        def install(nft: Libnftables) -> AppliedLinks:
            # In the owning thread: the links are read in the namespace the tables live in.
            ensure_safe_to_lock()
            return apply_read(policy, lambda filled: nft.run(apply_script(filled)))

        return self._call(install)

    def swap_endpoints(self, policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> None:
        script = swap_script(policy, old, new)
        if script:
            self.run(script)

    def swap_tunnel_inbound(
        self, policy: LockPolicy, old: frozenset[tuple[str, int]], new: frozenset[tuple[str, int]]
    ) -> None:
        script = tunnel_inbound_swap_script(policy, old, new)
        if script:
            self.run(script)

    def remove(self, table: str) -> None:
        """Delete both tables (the lock is open after this)."""
        self.run(remove_script(table))

    def owns(self, table: str) -> bool:
        """Whether the owned twin of ``table`` is in place."""
        return f"table inet {owned_table(table)}\n" in self.run("list tables")
