"""What the control socket's commands do: ``status``, ``rotate``, ``reconnect``.

The socket (``supervisor.control.server``) parses a request and hands it here; the answer
goes back as JSON. The runtime is known only by the little this needs (``Controlled``), so
each command is tested with a stand-in. ``rotate`` and ``reconnect`` queue an event for the
machine and answer at once: the client reads what came of it with ``status``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from supervisor.machine import events as ev

COMMANDS = ("status", "rotate", "reconnect")


class StatusView(Protocol):
    def as_json(self) -> dict[str, Any]:
        """The ``status --json`` contract."""


class Controlled(Protocol):
    """What the commands need of the runtime (``supervisor.runtime.Runtime``)."""

    @property
    def status(self) -> StatusView: ...

    async def refresh_lock_status(self) -> None:
        """Read the lock's state into ``status`` (a status answer reports the lock as it is now)."""

    async def post(self, make: Callable[[float], ev.Event]) -> None:
        """Queue an event for the machine, stamped now."""


class ControlCommands:
    """The control socket's handler: ``await commands(request)`` gives the answer."""

    def __init__(self, runtime: Controlled) -> None:
        self.runtime = runtime

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            await self.runtime.refresh_lock_status()
            return self.runtime.status.as_json()
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
