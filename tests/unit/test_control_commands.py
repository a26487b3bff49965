"""The control commands against a stand-in runtime: what each asks of it and what it answers.

The stand-in records what the commands did (a lock read, events queued with the time they were
stamped with); the real runtime behind the real socket is exercised in tests/lab/test_daemon.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from supervisor.control.commands import ControlCommands
from supervisor.machine import events as ev

NOW = 123.5


class ReportedStatus:
    def __init__(self, runtime: FakeRuntime) -> None:
        self._runtime = runtime

    def as_json(self) -> dict[str, Any]:
        return {"state": "connected", "lock": {"installed": self._runtime.lock_reads > 0}}


class FakeRuntime:
    def __init__(self) -> None:
        self.lock_reads = 0
        self.posted: list[ev.Event] = []

    async def status_now(self) -> ReportedStatus:
        self.lock_reads += 1
        return ReportedStatus(self)

    async def post(self, make: Callable[[float], ev.Event]) -> None:
        self.posted.append(make(NOW))


def ask(request: dict[str, Any]) -> tuple[dict[str, Any], FakeRuntime]:
    runtime = FakeRuntime()
    answer = anyio.run(ControlCommands(runtime, runtime.status_now), request)
    return answer, runtime


def test_status_reads_the_lock_before_answering_with_the_status() -> None:
    answer, runtime = ask({"command": "status"})
    assert answer == {"state": "connected", "lock": {"installed": True}}
    assert runtime.lock_reads == 1 and runtime.posted == []


@pytest.mark.parametrize(
    ("command", "event"),
    [("rotate", ev.RotateRequested(NOW)), ("reconnect", ev.ReconnectRequested(NOW))],
)
def test_rotate_and_reconnect_queue_their_event_and_answer_ok(command: str, event: ev.Event) -> None:
    answer, runtime = ask({"command": command})
    assert answer == {"ok": True}
    assert runtime.posted == [event] and runtime.lock_reads == 0


def test_an_unknown_command_is_answered_with_the_known_ones_and_does_nothing() -> None:
    answer, runtime = ask({"command": "shutdown"})
    assert answer == {"ok": False, "error": "unknown command 'shutdown' (status, rotate, reconnect)"}
    assert runtime.posted == [] and runtime.lock_reads == 0


def test_a_request_without_a_command_says_so_and_does_nothing() -> None:
    # The socket's parser refuses such a request before it gets here; the handler does not
    # rely on that.
    answer, runtime = ask({"verb": "status"})
    assert answer == {"ok": False, "error": 'no "command" in the request (status, rotate, reconnect)'}
    assert runtime.posted == [] and runtime.lock_reads == 0
