"""The daemon as the lab runs it: ``tunlock run`` in the client namespace, asked over its socket.

Used by the demo, the end-to-end tests and the benchmarks. Settings differ from the lab's config
through environment overrides (``TUNLOCK_HEALTH_DEAD_AFTER_S=2``), exactly as a container user
would set them. The process is the lab's child, ended by PID, and the lab's ``down`` ends it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from supervisor.control.client import request
from supervisor.errors import TunlockError
from supervisor.lab.topology import Lab
from supervisor.safety import LAB_ONLY_ENV

POLL_S = 0.01


class LabDaemon:
    """One ``tunlock run`` in a lab's client namespace.

    ``time_scale`` multiplies every wait: a slower machine passes more than 1 (the tests' VM tier
    runs under software emulation, where starting Python alone takes seconds).
    """

    def __init__(
        self,
        lab: Lab,
        env: Mapping[str, str] | None = None,
        config: str | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self.lab = lab
        self.env = dict(env or {})
        self.time_scale = time_scale
        self.config = config or str(lab.config_path)
        self.socket = lab.dir / "control.sock"
        self.process: subprocess.Popen | None = None
        self.log_name = "daemon.log"
        # The descriptor limits the daemon starts with, as prlimit takes them ("1024:" for the
        # soft limit alone, systemd's default; "1024:1024" for both), or None for the caller's.
        self.nofile: str | None = None
        # False for namespace mode: the daemon pins its namespace where everyone sees it (Lab.spawn).
        self.private_mounts = True

    def start(self, wait_for: str | None = "connected", timeout: float = 20.0) -> dict[str, Any] | None:
        """Start the daemon; by default wait until it reports ``connected`` and return that status."""
        env = {**os.environ, LAB_ONLY_ENV: "1", **self.env}
        argv = [
            sys.executable,
            "-m",
            "supervisor.cli",
            "run",
            "--config",
            self.config,
            "--log-format",
            "json",
        ]
        if self.nofile is not None:
            argv = ["prlimit", f"--nofile={self.nofile}", "--", *argv]
        self.process = self.lab.spawn(
            "client", argv, log=self.log_name, env=env, private_mounts=self.private_mounts
        )
        if wait_for is None:
            return None
        return self.wait_for(lambda s: s["state"] == wait_for, timeout, f"state {wait_for}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def status(self) -> dict[str, Any] | None:
        """The daemon's status, or None while it does not answer."""
        try:
            return request(self.socket, "status", timeout=2.0)
        except (TunlockError, ConnectionResetError):  # reset: it died mid-answer (wait_for says why)
            return None

    def ask(self, command: str) -> dict[str, Any]:
        return request(self.socket, command, timeout=5.0)

    def wait_for(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float = 20.0, what: str = "the condition"
    ) -> dict[str, Any]:
        """Poll the status until ``condition`` holds; on timeout say what was seen and the log's tail."""
        timeout *= self.time_scale
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TunlockError(f"the daemon exited ({self.process.returncode}):\n{self.log_tail()}")
            last = self.status()
            if last is not None and condition(last):
                return last
            time.sleep(POLL_S)
        raise TimeoutError(f"no {what} within {timeout} s; last status {last}\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.lab.dir / self.log_name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def log_events(self) -> list[str]:
        return (self.lab.dir / self.log_name).read_text(errors="replace").splitlines()

    def wait_for_log(self, text: str, after: int = 0, timeout: float = 20.0) -> str:
        """Poll the log until a line past its first ``after`` holds ``text``, and give that line
        back; on the daemon's exit or a timeout say so with the log's tail."""
        timeout *= self.time_scale
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.log_events()[after:] if text in line), None)
            if found is not None:
                return found
            if self.process is not None and self.process.poll() is not None:
                raise TunlockError(f"the daemon exited ({self.process.returncode}):\n{self.log_tail()}")
            time.sleep(POLL_S)
        raise TimeoutError(f"no log line with {text!r} within {timeout} s\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the exit status (SIGKILL if it does not end in time)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of the daemon's own clean-up runs."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> LabDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
