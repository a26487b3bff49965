"""A ``[control] socket`` naming something that is not a socket (issue #11, item 7).

The daemon once deleted whatever the path named, a regular file included, and ``check`` said
ok. Now ``check`` and ``run`` report it as ``file:line`` and leave it alone. (``run`` stops at
this check, before any lock or namespace business, so it is safe to run here without root; the
lab-only guard would stop it otherwise.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.control.socket_path import problem

REPO = Path(__file__).resolve().parents[2]


def tunlock(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_check_and_run_refuse_a_regular_file_and_keep_it(write_config, tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("do not delete")
    path = write_config(f'[tunnel]\n\n[control]\nsocket = "{precious}"\n')
    checked = tunlock("check", "--config", str(path))
    assert checked.returncode == 1, checked
    assert (
        f"{path}:4: control.socket {precious}: exists and is a regular file, not a socket" in checked.stderr
    )
    ran = tunlock("run", "--config", str(path), "--log-format", "console")
    assert ran.returncode == 2, ran
    assert "exists and is a regular file, not a socket" in ran.stderr and "Traceback" not in ran.stderr
    assert precious.read_text() == "do not delete"


def test_check_names_the_environment_when_the_path_comes_from_it(write_config, tmp_path: Path) -> None:
    path = write_config("")
    checked = tunlock("check", "--config", str(path), env={"TUNLOCK_CONTROL_SOCKET": str(tmp_path)})
    assert checked.returncode == 1
    assert (
        f"env TUNLOCK_CONTROL_SOCKET: control.socket {tmp_path}: exists and is a directory" in checked.stderr
    )


def test_a_socket_or_nothing_is_fine(tmp_path: Path) -> None:
    assert problem(tmp_path / "absent" / "deeper" / "control.sock") is None
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "control.sock"))
        assert problem(tmp_path / "control.sock") is None


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_anything_else_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "control.sock"
    make: dict[str, Callable[[], object]] = {
        "file": lambda: path.write_text(""),
        "directory": path.mkdir,
        "symlink": lambda: path.symlink_to(tmp_path),
    }
    make[kind]()
    why = problem(path)
    assert why is not None and why.startswith("exists and is a")
    assert kind.replace("symlink", "symbolic link").replace("file", "regular file") in why
