"""What the control socket's commands do: ``status``, ``rotate``, ``reconnect``.

The socket (``supervisor.control.server``) parses a request and hands it here; the answer
goes back as JSON. The daemon is known only by the little this needs (``Controlled`` and a
status source), so each command is tested with stand-ins. ``status`` is built on request
(``supervisor.status``: the machine's status, the lock read now, the plugins' reports);
``rotate`` and ``reconnect`` queue an event for the machine and answer at once: the client reads
what came of it with ``status``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from supervisor.jsonvalue import JSON
from supervisor.machine import events as ev

COMMANDS = ("status", "rotate", "reconnect")


class StatusView(Protocol):
    def as_json(self) -> dict[str, JSON]:
        """The ``status --json`` contract."""


class Controlled(Protocol):
    """What the commands need of the runtime (``supervisor.runtime.Runtime``)."""

    async def post(self, make: Callable[[float], ev.Event]) -> None:
        """Queue an event for the machine, stamped now."""


class ControlCommands:
    """The control socket's handler: ``await commands(request)`` gives the answer."""

    def __init__(self, runtime: Controlled, status: Callable[[], Awaitable[StatusView]]) -> None:
        """``status``: builds the status now (the lock read for it), for each ``status`` asked."""
        self.runtime = runtime
        self.status = status

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return dict((await self.status()).as_json())
        if command == "rotate":
            await self.runtime.post(lambda now: ev.RotateRequested(now))
            return {"ok": True}
        if command == "reconnect":
            await self.runtime.post(lambda now: ev.ReconnectRequested(now))
            return {"ok": True}
        known = ", ".join(COMMANDS)
        if command is None:
            return {"ok": False, "error": f'no "command" in the request ({known})'}
        return {"ok": False, "error": f"unknown command {command!r} ({known})"}
