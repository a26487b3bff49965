"""The runtime's inbox: events posted before the runtime exists reach the machine once it runs.

The daemon makes the inbox first, so that the tunnel backend and the lock guard can report into
it from the moment they exist (before, a report that came too early was dropped). The stand-in
world and clock are those of test_runtime.py.
"""

from __future__ import annotations

import anyio
import pytest

from supervisor.machine import events as ev
from supervisor.runtime import Inbox, Runtime, Status

from .test_runtime import GUARD_S, Clock, World, make_runtime


def test_a_report_queued_before_the_runtime_exists_is_handled_first_stamped_when_posted() -> None:
    clock = Clock()
    published: list[Status] = []

    async def main() -> Runtime:
        world = World()
        inbox = Inbox(clock)
        # The backend died while the daemon was still adopting the tunnel.
        await inbox.post(lambda now: ev.BackendDown(now, "wireguard-go exited (status 2)"))
        runtime = make_runtime(world, published.append, inbox=inbox)
        assert runtime.clock is clock
        clock.now += 5.0  # the runtime came later
        await runtime.post(lambda now: ev.Start(now, 7, None))
        await runtime.post(lambda now: ev.Stop(now))
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await runtime.run(tg)
                tg.cancel_scope.cancel()
        assert world.calls[0][0] == "apply"  # the lock comes first all the same
        return runtime

    runtime = anyio.run(main)
    failure = runtime.machine.context.last_failure
    assert failure is not None and failure.at == 100.0  # stamped when it was posted
    first = published[0]
    assert first.last_failure is not None
    assert first.last_failure.reason == "the WireGuard backend died: wireguard-go exited (status 2)"
    assert published[-1].state == "stopped"


def test_a_runtime_takes_a_clock_or_an_inbox_not_both() -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="give the clock to the inbox"):
            make_runtime(World(), lambda status: None, clock=Clock(), inbox=Inbox(Clock()))

    anyio.run(main)


def test_events_are_stamped_on_a_clock_that_counts_a_suspend() -> None:
    """Issue #21, item 9b: CLOCK_MONOTONIC stops while the machine is suspended, so a suspend
    left no gap for the machine to see, while the handshake's (wall-clock) age jumped by all of
    it. The inbox stamps with CLOCK_BOOTTIME, which counts it."""
    import time

    from supervisor.runtime import boottime

    assert Inbox().clock is boottime
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= boottime() <= time.clock_gettime(time.CLOCK_BOOTTIME)
