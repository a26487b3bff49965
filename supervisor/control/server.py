"""The daemon's control socket: one JSON request per connection, one JSON answer.

A unix stream socket, mode 0600 (root only: it can make the daemon switch servers), in a
directory the daemon creates 0700 when missing. A socket file that no daemon answers on is a
leftover of a crash and is replaced; one that answers means another daemon runs, and this one
refuses to start rather than take the socket from it. Anything else at the path (a regular
file, a directory, a link) is refused, never deleted (see ``socket_path``).

Whatever a client sends, the daemon answers ``{"ok": false, "error": "bad request: ..."}`` saying
what was wrong and goes on serving: parsing is a pure function (``parse_request``) with limits
on size and nesting, a client that sends nothing gets told so after ``REQUEST_TIMEOUT_S``, and an
error inside the handler is logged and answered, never raised into the daemon's task group.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from supervisor.connections import Slot, Slots, accept_forever
from supervisor.control import socket_path
from supervisor.errors import TunlockError
from supervisor.log import get_logger

log = get_logger(__name__)

MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT_S = 2.0
# A request is {"command": "..."}: nothing in it nests; deeper than this is not a request (and
# a thousand "[" once crashed the daemon with a RecursionError in the JSON parser).
MAX_NESTING = 16
# Clients open at once; when all are taken, the one idle longest gives way to a newcomer
# (``supervisor.connections``): idle clients cannot keep `status` waiting behind them.
MAX_CLIENTS = 64
# After the answer, what the client still sends is read and dropped for this long, up to this much.
DRAIN_S = 0.5
DRAIN_MAX_BYTES = 1 << 20
EXAMPLE = '{"command": "status"}'

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlSocketBusy(TunlockError):
    """Another daemon answers on the control socket."""


class ControlSocketError(TunlockError):
    """The control socket's path cannot be used (and what is there is left alone)."""


class BadRequest(ValueError):
    """What is wrong with a request, in words for the client."""


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not JSON")


def _nesting(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_request(data: bytes) -> dict[str, Any]:
    """The request in ``data`` (one line of JSON: an object with a string ``command``), or
    ``BadRequest`` saying what is wrong. Pure: no I/O."""
    line = data.split(b"\n", 1)[0].strip()
    if not line:
        raise BadRequest(f"empty; send one JSON object and a newline, such as {EXAMPLE}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("not UTF-8 text") from None
    if _nesting(text) > MAX_NESTING:
        raise BadRequest(f"nested deeper than {MAX_NESTING} levels; a request is {EXAMPLE}")
    try:
        request = json.loads(text, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except json.JSONDecodeError as err:
        raise BadRequest(f"not JSON ({err.msg} at column {err.colno}); a request is {EXAMPLE}") from None
    except (ValueError, RecursionError) as err:  # an integer of 5,000 digits, say
        raise BadRequest(f"not usable JSON ({err}); a request is {EXAMPLE}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"a request is a JSON object such as {EXAMPLE}, not {type(request).__name__}")
    if not isinstance(request.get("command"), str):
        raise BadRequest(f'"command" must be a string (status, rotate, reconnect), as in {EXAMPLE}')
    return request


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _claim(path: Path) -> None:
    """Make ``path`` free for our socket: replace only a socket nobody answers on."""
    why = socket_path.problem(path)
    if why is not None:
        raise ControlSocketError(f"control socket {path}: {why}")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):  # appeared since the look above
        raise ControlSocketError(f"control socket {path}: exists and is {socket_path.kind_of(mode)}")
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # nobody listens: a crashed daemon's socket
            return
        except OSError as err:
            raise ControlSocketError(
                f"control socket {path}: cannot tell whether a daemon answers there ({err.strerror or err}); "
                "remove it if none runs"
            ) from None
    raise ControlSocketBusy(f"another tunlock daemon answers on {path}; stop it first")


async def serve(
    path: Path, handler: Handler, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer requests on ``path`` until cancelled; the socket file is removed on the way out."""
    _claim(path)
    listener = await anyio.create_unix_listener(path, mode=0o600)
    slots = Slots(MAX_CLIENTS)

    async def answer(stream: anyio.abc.ByteStream, slot: Slot) -> None:
        await _answer(stream, handler, slot)

    try:
        async with listener:
            task_status.started()
            await accept_forever(listener, answer, slots, what="control socket")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _read_request(stream: anyio.abc.ByteStream) -> bytes:
    """Bytes up to the first newline, or all a client sent before ending its side."""
    data = b""
    with anyio.move_on_after(REQUEST_TIMEOUT_S) as waited:
        while b"\n" not in data:
            if len(data) > MAX_REQUEST_BYTES:
                raise BadRequest(f"longer than {MAX_REQUEST_BYTES} bytes without a newline")
            try:
                data += await stream.receive(MAX_REQUEST_BYTES)
            except anyio.EndOfStream:
                break
    if waited.cancelled_caught:
        raise BadRequest(
            f"no complete request within {REQUEST_TIMEOUT_S:g} s; send one JSON object and a newline, "
            f"such as {EXAMPLE}"
        )
    return data


async def _drain(stream: anyio.abc.ByteStream) -> None:
    """Read and drop what the client still sends, for a moment: closing a unix socket with
    unread data resets the connection, and the client would lose the answer (to a request too
    long, say) before reading it."""
    dropped = 0
    with anyio.move_on_after(DRAIN_S), contextlib.suppress(anyio.EndOfStream):
        while dropped < DRAIN_MAX_BYTES:
            dropped += len(await stream.receive(65536))


async def _respond(stream: anyio.abc.ByteStream, handler: Handler, slot: Slot | None) -> dict[str, Any]:
    try:
        request = parse_request(await _read_request(stream))
    except BadRequest as err:
        return error(f"bad request: {err}")
    if slot is not None:
        slot.busy()  # a request to answer: no newcomer takes its place now
    try:
        return await handler(request)
    except Exception as err:  # a bug or a failed adapter: answered and logged, never fatal
        log.exception("control request failed", command=request.get("command"))
        return error(f"the daemon could not answer: {err or type(err).__name__} (see its log)")


async def _answer(stream: anyio.abc.ByteStream, handler: Handler, slot: Slot | None = None) -> None:
    async with stream:
        try:
            answer = await _respond(stream, handler, slot)
            reply = json.dumps(answer).encode() + b"\n"
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the client went away mid-request
        except Exception:  # a bug here must cost one answer, not the daemon
            log.exception("control request failed")
            reply = json.dumps(error("the daemon could not answer (see its log)")).encode() + b"\n"
        with (
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
            anyio.move_on_after(REQUEST_TIMEOUT_S),  # a client that reads nothing keeps no slot
        ):
            await stream.send(reply)
            await stream.send_eof()  # the answer is all: a client reading to the end stops here
            if slot is not None:
                slot.idle()  # answered: what follows only waits on the client
            await _drain(stream)
