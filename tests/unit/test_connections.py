"""Accepting connections: the bound, the idle giving way, and accept errors that end nothing.

Real listeners on real sockets (no root needed); the accept errors come from a listener that
fails as the kernel does when out of descriptors (a fake: the process's own limit cannot be
lowered here without starving the test runner).
"""

from __future__ import annotations

import errno
import functools
import resource
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from supervisor import connections
from supervisor.connections import Slot, Slots, accept_forever, raise_descriptor_limit

pytestmark = pytest.mark.anyio


async def test_the_oldest_idle_slot_gives_way_and_busy_ones_never_do() -> None:
    slots = Slots(2)
    first, second = slots.take(), slots.take()
    first.busy()
    third = slots.take()  # full: the idle `second` is closed for it, not the busy `first`
    assert second.scope.cancel_called and not first.scope.cancel_called
    assert slots.displaced == 1
    slots.release(second)
    third.busy()
    assert slots.open == 2


async def test_room_waits_only_while_every_slot_is_busy() -> None:
    slots = Slots(1)
    busy = slots.take()
    busy.busy()
    with anyio.move_on_after(0.05) as waited:
        await slots.room()
    assert waited.cancelled_caught, "all busy: wait"
    slots.release(busy)
    with anyio.fail_after(1):
        await slots.room()
    idle = slots.take()
    with anyio.fail_after(1):
        await slots.room()  # an idle one can give way: no wait
    assert not idle.scope.cancel_called


async def test_idle_clients_cannot_keep_a_request_waiting(tmp_path: Path) -> None:
    """200 idle clients, a bound of 8: the client that sends its request is answered at once."""
    path = tmp_path / "s.sock"
    listener = await anyio.create_unix_listener(path)

    async def echo(stream: anyio.abc.ByteStream, slot: Slot) -> None:
        data = await stream.receive()
        slot.busy()
        await stream.send(data)

    idle = []
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(accept_forever, listener, echo, Slots(8), what="test"))
        for _ in range(200):
            idle.append(await anyio.connect_unix(path))
        with anyio.fail_after(5):
            async with await anyio.connect_unix(path) as client:
                await client.send(b"ping")
                assert await client.receive() == b"ping"
        tg.cancel_scope.cancel()
    for stream in idle:
        await stream.aclose()


class Connection:
    """What the fake listener hands out: only closed."""

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class FailingListener:
    """Fails ``accept`` with each of ``errors`` in turn, then hands out one connection."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.handed = False

    async def accept(self) -> Connection:
        await anyio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        if self.handed:
            await anyio.sleep_forever()
        self.handed = True
        return Connection()


@pytest.mark.parametrize(
    "code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO]
)
async def test_an_accept_error_pauses_and_accepting_goes_on(
    code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "ACCEPT_PAUSE_S", 0.001)
    served = anyio.Event()

    async def handle(_stream: object, _slot: Slot) -> None:
        served.set()

    # (anyio's unix listener raises BrokenResourceError from the OSError)
    unix_style = anyio.BrokenResourceError()
    unix_style.__cause__ = OSError(code, "x")
    listener = FailingListener([OSError(code, "x")] * 3 + [unix_style])
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(accept_forever, listener, handle, Slots(4), what="test"))  # type: ignore[arg-type]
        with anyio.fail_after(5):
            await served.wait()
        tg.cancel_scope.cancel()


def test_the_soft_descriptor_limit_is_raised_never_lowered() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        before, after = raise_descriptor_limit(min(512, hard))
        assert (before, after) == (min(256, hard), min(512, hard))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(512, hard)
        assert raise_descriptor_limit(100) == (min(512, hard), min(512, hard)), "never lowered"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
