"""The daemon's control socket: one JSON request per connection, one JSON answer.

A unix stream socket, mode 0600 (root only: it can make the daemon switch servers), in a
directory the daemon creates 0700 when missing. A socket file that no daemon answers on is a
leftover of a crash and is replaced; one that answers means another daemon runs, and this one
refuses to start rather than take the socket from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from supervisor.errors import TunlockError
from supervisor.log import get_logger

log = get_logger(__name__)

MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT_S = 2.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlSocketBusy(TunlockError):
    """Another daemon answers on the control socket."""


def _claim(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if not path.exists() and not path.is_symlink():
        return
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a crashed daemon's socket
            return
    raise ControlSocketBusy(f"another tunlock daemon answers on {path}; stop it first")


async def serve(
    path: Path, handler: Handler, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer requests on ``path`` until cancelled; the socket file is removed on the way out."""
    _claim(path)
    listener = await anyio.create_unix_listener(path, mode=0o600)
    try:
        async with listener, anyio.create_task_group() as tg:
            task_status.started()
            while True:
                stream = await listener.accept()
                tg.start_soon(_answer, stream, handler)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _answer(stream: anyio.abc.ByteStream, handler: Handler) -> None:
    async with stream:
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                data = b""
                while b"\n" not in data and len(data) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive(MAX_REQUEST_BYTES)
                    data += chunk
            request = json.loads(data.split(b"\n", 1)[0])
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            answer = await handler(request)
        except (TimeoutError, anyio.EndOfStream, ValueError) as err:
            answer = {"ok": False, "error": f"bad request: {err}"}
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(json.dumps(answer).encode() + b"\n")
