"""One HTTP exchange with the metrics endpoint's ``answer`` over a socket pair, no network.

Shared by tests/unit/test_metrics.py and the run-path import probe in
tests/unit/test_run_imports.py, which runs it in a fresh interpreter whose modules it counts: so
nothing here imports pytest or more than the endpoint itself needs.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from supervisor.metrics import Snapshot, answer

EXCHANGE_TIMEOUT_S = 10.0


async def exchange(request: bytes, source: Callable[[], Awaitable[Snapshot]]) -> bytes:
    """Send ``request`` to ``answer`` (its snapshots from ``source``) and read the whole response."""
    ours, theirs = socket.socketpair()
    client = await anyio.abc.SocketStream.from_socket(ours)
    server = await anyio.abc.SocketStream.from_socket(theirs)
    async with anyio.create_task_group() as tg:
        tg.start_soon(answer, server, source)
        await client.send(request)
        response = b""
        with anyio.fail_after(EXCHANGE_TIMEOUT_S):
            try:
                while True:
                    response += await client.receive()
            except anyio.EndOfStream:
                pass
    await client.aclose()
    return response
