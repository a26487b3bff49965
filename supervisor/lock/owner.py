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

import ctypes
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from supervisor.lock.links import AppliedLinks, apply_read
from supervisor.lock.nft import LockError, parse_reading
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

LIBRARY = "libnftables.so.1"
_NFT_CTX_DEFAULT = 0
_CLOSE_TIMEOUT_S = 10.0


class OwnerUnavailable(LockError):
    """The kernel, nft or libnftables here cannot hold an owned table."""


class Libnftables:
    """One libnftables context (the C API of ``man 3 libnftables``); not thread-safe."""

    def __init__(self, library: str = LIBRARY) -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as err:
            raise OwnerUnavailable(f"{library} cannot be loaded ({err})") from None
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not self._ctx:
            raise OwnerUnavailable("nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(self._ctx) or lib.nft_ctx_buffer_error(self._ctx):
            lib.nft_ctx_free(self._ctx)
            raise OwnerUnavailable("libnftables could not buffer its output")

    def run(self, script: str) -> str:
        """Run ``script`` (one transaction, as ``nft -f``); its output, or LockError with nft's."""
        if not self._ctx:
            raise LockError("the libnftables context is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        # Reading a buffer also empties it for the next command.
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise LockError(f"nft: {condensed(error) or f'error {rc}'}")
        return output

    def free(self) -> None:
        """Close the context's netlink socket: every table it owns is gone after this."""
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def condensed(error: str) -> str:
    """libnftables' error text with each distinct error once, and how often it came.

    It reports an error per netlink message the kernel refused, each as the ``Error:`` line, the
    command and carets under it. A kernel that refuses a whole transaction the same way (the table
    belongs to another process: EPERM for every message) gives ~100 copies, the carets pointing
    anywhere in a command that stands for the batch: a log line no one reads to its end.
    """
    blocks: list[list[str]] = []
    for line in error.strip().splitlines():
        if line.startswith("Error:") or not blocks:
            blocks.append([line])
        else:
            blocks[-1].append(line)
    counts: dict[str, int] = {}
    first: dict[str, list[str]] = {}
    for block in blocks:
        counts[block[0]] = counts.get(block[0], 0) + 1
        first.setdefault(block[0], block)
    out: list[str] = []
    for head, block in first.items():
        times = f" ({counts[head]} times)" if counts[head] > 1 else ""
        out += [head + times, *block[1:]]
    return "\n".join(out)


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
