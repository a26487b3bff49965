"""The daemon's signals and its READY=1, without root: real signals to this process, real
sockets in a temp dir, stand-ins for the runtime, the plugins and systemd's notify socket.

``_signals`` installs its handlers before the test sends anything (the test waits until every
task is blocked, the handler task in its ``async for``), so SIGTERM reaches the daemon's code,
not the test runner's default action. The daemon's own process under real signals is tested
in tests/lab/test_daemon_hardening.py and tests/lab/test_daemon_notify.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from anyio import wait_all_tasks_blocked
from pyroute2 import AsyncIPRoute

from supervisor import daemon
from supervisor.config import Config, load_config
from supervisor.control import server as control_server
from supervisor.control.commands import ControlCommands
from supervisor.machine import events as ev
from supervisor.runtime import Reconfiguration
from supervisor.servers import Endpoint

GUARD_S = 10.0  # only stops a broken test from hanging; nothing here measures time


@pytest.fixture(autouse=True)
def default_signal_actions() -> Any:
    """Whatever a test leaves, SIGHUP and SIGTERM act as before it afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, action in saved.items():
        signal.signal(signum, action)


class Trail:
    """What the stand-ins were asked, in order, across all of them."""

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self.changed = anyio.Event()

    def add(self, step: Any) -> None:
        self.steps.append(step)
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: Callable[[list[Any]], bool]) -> None:
        while not predicate(self.steps):
            await self.changed.wait()


class FakeRuntime:
    """The runtime as the signals see it; the reload itself is replaced where a test sends SIGHUP."""

    ifname = "tl-test"

    def __init__(self, trail: Trail) -> None:
        self.trail = trail

    async def post(self, make: Callable[[float], ev.Event]) -> None:
        self.trail.add(make(1.0))

    async def reconfigure(self, change: Reconfiguration) -> bool:
        raise AssertionError("no reload reaches the runtime in these tests")


class FakeWatcher:
    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        raise AssertionError("no reload reaches the path monitor in these tests")

    async def route_socket(self) -> AsyncIPRoute:
        raise AssertionError("no reload reaches the path monitor in these tests")


class FakeNotifier:
    def __init__(self, trail: Trail, enabled: bool = True) -> None:
        self.trail = trail
        self.enabled = enabled

    def stopping(self) -> None:
        self.trail.add("STOPPING=1")

    def ready(self) -> None:
        self.trail.add("READY=1")


class FakePlugins:
    def __init__(self, trail: Trail) -> None:
        self.trail = trail

    async def stopping(self, timeout_s: float) -> None:
        self.trail.add(("plugins stopping", timeout_s))


def test_a_stop_is_heard_while_a_reload_is_still_reading(write_config, monkeypatch) -> None:
    config = load_config(write_config("[plugins]\nstop_timeout_s = 3\n"), {})

    async def main() -> list[Any]:
        trail = Trail()
        release = anyio.Event()

        async def reload_stuck_reading(runtime: Any, current: Config, watcher: Any) -> Config:
            trail.add("reload began")
            await release.wait()  # a file that blocks reading
            return current

        monkeypatch.setattr(daemon, "_reload", reload_stuck_reading)
        notifier, plugins = FakeNotifier(trail), FakePlugins(trail)
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon._signals, FakeRuntime(trail), config, FakeWatcher(), notifier, plugins)
                await wait_all_tasks_blocked()  # the handlers are installed
                os.kill(os.getpid(), signal.SIGHUP)
                await trail.until(lambda steps: "reload began" in steps)
                os.kill(os.getpid(), signal.SIGTERM)
                await trail.until(lambda steps: any(isinstance(s, ev.Stop) for s in steps))
                tg.cancel_scope.cancel()
        return trail.steps

    steps = anyio.run(main)
    # Plugins act on "stopping" while the tunnel still stands, before the machine hears Stop.
    assert steps == ["reload began", "STOPPING=1", ("plugins stopping", 3.0), ev.Stop(1.0)]


def test_a_reload_that_raises_costs_the_reload_not_the_daemon(write_config, monkeypatch) -> None:
    config = load_config(write_config(""), {})

    async def main() -> tuple[list[Any], list[MutableMapping[str, Any]]]:
        trail = Trail()
        calls = 0

        async def reload_with_a_bug(runtime: Any, current: Config, watcher: Any) -> Config:
            nonlocal calls
            calls += 1
            trail.add(f"reload {calls}")
            if calls == 1:
                raise KeyError("a bug")
            return current

        monkeypatch.setattr(daemon, "_reload", reload_with_a_bug)
        with structlog.testing.capture_logs() as logs, anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon._signals, FakeRuntime(trail), config, FakeWatcher(), None, None)
                await wait_all_tasks_blocked()
                os.kill(os.getpid(), signal.SIGHUP)
                await trail.until(lambda steps: "reload 1" in steps)
                await wait_all_tasks_blocked()  # the failed reload logged
                os.kill(os.getpid(), signal.SIGHUP)
                await trail.until(lambda steps: "reload 2" in steps)
                tg.cancel_scope.cancel()
        return trail.steps, logs

    steps, logs = anyio.run(main)
    assert steps == ["reload 1", "reload 2"]
    failed = [entry for entry in logs if entry["log_level"] == "error"]
    assert [entry["event"] for entry in failed] == [
        "reload failed; still running on the configuration before it"
    ]


# --- READY=1 -------------------------------------------------------------------------------------


class BlockedStatus:
    def as_json(self) -> dict[str, Any]:
        return {"state": "blocked", "lock": {"installed": True}}


class AnsweringRuntime(FakeRuntime):
    """Enough of a runtime for the control commands' status."""

    async def status_now(self) -> BlockedStatus:
        self.trail.add("status asked")
        return BlockedStatus()


def test_ready_is_told_once_the_first_status_is_out_and_the_control_socket_answers(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"

    async def main() -> list[Any]:
        trail = Trail()
        first_status = anyio.Event()
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                runtime = AnsweringRuntime(trail)
                commands = ControlCommands(runtime, runtime.status_now)
                await tg.start(control_server.serve, path, commands)
                tg.start_soon(daemon._announce_ready, FakeNotifier(trail), first_status, path)
                await wait_all_tasks_blocked()
                trail.add("first status")
                first_status.set()
                await trail.until(lambda steps: "READY=1" in steps)
                tg.cancel_scope.cancel()
        return trail.steps

    assert anyio.run(main) == ["first status", "status asked", "READY=1"]


def test_no_ready_when_the_control_socket_does_not_answer(tmp_path: Path) -> None:
    async def main() -> tuple[list[Any], list[MutableMapping[str, Any]]]:
        trail = Trail()
        first_status = anyio.Event()
        first_status.set()
        with structlog.testing.capture_logs() as logs, anyio.fail_after(GUARD_S):
            await daemon._announce_ready(FakeNotifier(trail), first_status, tmp_path / "nobody.sock")
        return trail.steps, logs

    steps, logs = anyio.run(main)
    assert steps == []
    [said] = [entry for entry in logs if entry["log_level"] == "error"]
    assert said["event"] == "the control socket does not answer; not telling systemd ready"


def test_without_systemd_nothing_is_announced(tmp_path: Path) -> None:
    async def main() -> list[Any]:
        trail = Trail()
        # Never set: a notifier that is not enabled must not even wait for it.
        with anyio.fail_after(GUARD_S):
            await daemon._announce_ready(FakeNotifier(trail, enabled=False), anyio.Event(), tmp_path / "x")
        return trail.steps

    assert anyio.run(main) == []
