"""``tunlock status`` and ``health`` while the configuration is broken (issue #11, item 9).

They read the configuration only to find the daemon's socket; a file with errors (the admin is
halfway through an edit, the daemon still runs on the version before) must not stop them. A
listening socket in a temporary directory plays the daemon.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config import ControlSection
from supervisor.control.socket_path import lenient_socket

REPO = Path(__file__).resolve().parents[2]
STATUS = {"state": "connected", "server": "vpn1", "lock": {"installed": True, "matching": True}}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    """A socket that answers every request with ``STATUS``, as a running daemon would."""
    path = tmp_path / "ctl.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def answer() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with client:
                client.makefile("rb").readline()
                client.sendall(json.dumps(STATUS).encode() + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield path
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def tunlock(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNLOCK_CONTROL")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**clean, **(env or {})},
    )


@pytest.mark.parametrize(
    "broken",
    ["[tunnel]\nbogus = 1\n", "[tunnel\nservers = \n"],
    ids=["a-bad-key", "not-even-toml"],
)
def test_status_and_health_still_ask_the_daemon(tmp_path: Path, daemon: Path, broken: str) -> None:
    config = tmp_path / "tunlock.toml"
    config.write_text(f'{broken}\n[control]\nsocket = "ctl.sock"\n')
    status = tunlock("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "connected"
    assert (
        "the configuration has errors" in status.stderr and f"asking the daemon on {daemon}" in status.stderr
    )
    assert tunlock("health", "--config", str(config)).returncode == 0


def test_a_broken_config_without_a_daemon_is_still_not_running(tmp_path: Path) -> None:
    config = tmp_path / "tunlock.toml"
    config.write_text('[tunnel]\nbogus = 1\n[control]\nsocket = "nobody.sock"\n')
    status = tunlock("status", "--config", str(config))
    assert status.returncode == 3, status.stderr
    assert "not running" in status.stderr


def test_lenient_socket_reads_what_it_can(tmp_path: Path) -> None:
    config = tmp_path / "tunlock.toml"
    default = ControlSection().socket
    config.write_text("[tunnel]\nbogus = 1\n")
    assert lenient_socket(config, {}) == (default, "the default")
    config.write_text("[tunnel\n[control]\nsocket = '/run/x.sock'  # ours\n")
    assert lenient_socket(config, {}) == (Path("/run/x.sock"), f"{config}:3")
    config.write_text('[control]\nsocket = "/run/y.sock"\n[lock]\nmode = 3\n')
    assert lenient_socket(config, {}) == (Path("/run/y.sock"), f"[control] socket in {config}")
    env = {"TUNLOCK_CONTROL_SOCKET": "rel.sock"}
    assert lenient_socket(config, env) == (tmp_path / "rel.sock", "env TUNLOCK_CONTROL_SOCKET")
    assert lenient_socket(tmp_path / "missing.toml", {}) == (default, "the default")
