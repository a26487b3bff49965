"""Accepting connections on the daemon's listeners (metrics, control) without letting a crowd
cost the daemon or its answers.

Two rules, shared by every listener:

- **Bounded, and the idle give way.** At most ``limit`` connections are open at once. When a
  newcomer arrives and the bound is reached, the connection that has waited longest *without
  sending its request* is closed for it: a crowd of idle clients (an unprivileged user holding
  1,500 connections to the metrics port, 200 idle clients on the control socket) cycles through
  the slots, and a client that sends its request at once (a scrape, ``tunlock status``) is
  answered behind them instead of after all of them have timed out. Only while every slot is
  busy answering does accepting wait (answers are bounded in time).
- **Accepting never ends the daemon.** ``accept()`` fails for reasons that are not the
  listener's: out of descriptors (EMFILE, ENFILE), of memory (ENOBUFS, ENOMEM), a connection
  reset before it was taken (ECONNABORTED)... Each is logged once per spell and accepting
  resumes after a short, growing pause; the daemon goes on.

anyio's ``Listener.serve`` has neither: it accepts without bound and ends on the first error,
taking the daemon's task group with it ("tunlock crashed" on EMFILE), hence this module.
"""

from __future__ import annotations

import errno
import resource
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from supervisor.log import get_logger

log = get_logger(__name__)

# The descriptors the daemon may need: the listeners' bounds (64 control, 32 metrics), plugins'
# connections, netlink and UAPI sockets, pipes to nft and hooks come to a few hundred; this
# leaves room to spare. systemd's default soft limit, 1024, is raised to it at start (and the
# unit sets it: LimitNOFILE).
DESCRIPTORS_WANTED = 4096
ACCEPT_PAUSE_S = 0.05  # the first pause after a failed accept; doubled up to ACCEPT_PAUSE_MAX_S
ACCEPT_PAUSE_MAX_S = 1.0


def raise_descriptor_limit(wanted: int = DESCRIPTORS_WANTED) -> tuple[int, int]:
    """Raise the soft limit on open descriptors to ``wanted`` (or the hard limit, if lower);
    never lower it. The limits before and after, for the log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


class Slot:
    """One accepted connection's place; ``busy()`` once its request is read (it then keeps the
    place until answered), and it can no longer be closed for a newcomer."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self.scope = anyio.CancelScope()

    def busy(self) -> None:
        """The request is in: answer it, whoever comes next."""
        self._slots._idle.pop(self, None)

    def idle(self) -> None:
        """Only waiting on the client again (reading what it still sends): closable for a newcomer."""
        if self in self._slots._open:
            self._slots._idle[self] = None


class Slots:
    """At most ``limit`` connections open; the oldest idle one gives way to a newcomer."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._open: set[Slot] = set()
        self._idle: dict[Slot, None] = {}  # insertion-ordered: the longest waiting first
        self._freed = anyio.Event()
        self.displaced = 0  # idle connections closed for a newcomer, for the log

    @property
    def open(self) -> int:
        return len(self._open)

    async def room(self) -> None:
        """Return once a newcomer can be taken: a free slot, or an idle one to close for it."""
        while len(self._open) >= self.limit and not self._idle:
            self._freed = anyio.Event()
            await self._freed.wait()

    def take(self) -> Slot:
        """A slot for a connection just accepted, closing the oldest idle one if none is free."""
        if len(self._open) >= self.limit and self._idle:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.scope.cancel()
            self.displaced += 1
        slot = Slot(self)
        self._open.add(slot)
        self._idle[slot] = None
        return slot

    def release(self, slot: Slot) -> None:
        self._open.discard(slot)
        self._idle.pop(slot, None)
        self._freed.set()


Handler = Callable[[Any, Slot], Awaitable[None]]


async def accept_forever(
    listener: anyio.abc.SocketListener, handle: Handler, slots: Slots, *, what: str
) -> None:
    """Accept on ``listener`` until cancelled (or the listener is closed), each connection
    handled by ``handle(stream, slot)`` in a task of its own, inside ``slots``."""
    pause = ACCEPT_PAUSE_S
    failed = 0
    async with anyio.create_task_group() as tg:
        while True:
            await slots.room()
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as err:
                # (anyio's unix listener wraps the OSError in BrokenResourceError.)
                cause = err if isinstance(err, OSError) else err.__cause__
                if failed == 0:
                    log.warning(
                        f"{what}: cannot accept connections; pausing and trying again",
                        error=_errno_name(cause) or str(err),
                        open=slots.open,
                    )
                failed += 1
                await anyio.sleep(pause)
                pause = min(pause * 2, ACCEPT_PAUSE_MAX_S)
                continue
            if failed:
                log.info(f"{what}: accepting again", failed_accepts=failed)
                failed, pause = 0, ACCEPT_PAUSE_S
            tg.start_soon(_run, handle, stream, slots.take(), slots)


async def _run(handle: Handler, stream: anyio.abc.AsyncResource, slot: Slot, slots: Slots) -> None:
    try:
        with slot.scope:
            async with stream:
                await handle(stream, slot)
    finally:
        slots.release(slot)


def _errno_name(err: BaseException | None) -> str | None:
    """``EMFILE (Too many open files)`` for an OSError that has an errno."""
    if isinstance(err, OSError) and err.errno is not None:
        return f"{errno.errorcode.get(err.errno, err.errno)} ({err.strerror})"
    return None
