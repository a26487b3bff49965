"""The guard's nftables subscription outlives socket errors (issue #11, item 3c), without root.

Subscribing to nftables' group needs CAP_NET_ADMIN, so a socket pair stands in for the netlink
socket and the errors are raised by a stand-in reader; the table check is counted rather than
run. What is under test is the guard's handling of a failed subscription, which the lab's
daemon tests then prove with the real netlink socket.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator

import anyio
import pytest

from supervisor.lock import guard as guard_module
from supervisor.lock.guard import LockGuard
from supervisor.lock.policy import LockPolicy

pytestmark = pytest.mark.anyio


class CountingGuard(LockGuard):
    """A guard whose table check only counts (there is no table without root)."""

    def __init__(self) -> None:
        super().__init__(LockPolicy("tunlock", "tl0", 0xCA6C))
        self.checks = 0

    async def check(self) -> str | None:
        self.checks += 1
        return None


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOMEM, errno.EBADF])
async def test_a_subscription_that_fails_is_made_again_and_the_table_checked(
    monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    made: list[socket.socket] = []

    def subscribe() -> socket.socket:
        reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        writer.close()
        made.append(reader)
        return reader

    async def failing(sock: socket.socket) -> AsyncIterator[None]:
        raise OSError(err, "a socket error")
        yield  # an async generator

    monkeypatch.setattr(guard_module.subscription, "nftables_changes", subscribe)
    monkeypatch.setattr(guard_module.subscription, "bursts", failing)
    monkeypatch.setattr(guard_module, "WATCH_RESTART_INITIAL_S", 0.01)
    guard = CountingGuard()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(guard.run)
            while guard.watch_restarts < 3:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert guard.checks >= 3, "every new subscription begins with a check: changes in between were unseen"
    assert all(sock.fileno() == -1 for sock in made), "a failed subscription's socket is closed"


async def test_the_backoff_grows_while_the_subscription_keeps_failing_at_once() -> None:
    delays = [guard_module.next_restart_delay(None, lived_s=0.0)]
    for _ in range(12):
        delays.append(guard_module.next_restart_delay(delays[-1], lived_s=0.0))
    assert delays == sorted(delays) and delays[-1] == guard_module.WATCH_RESTART_MAX_S
    assert guard_module.next_restart_delay(delays[-1], lived_s=60.0) == guard_module.WATCH_RESTART_INITIAL_S
