"""`tunlock check` as a user runs it: exit code, summary, file:line errors, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .samples import PRIVATE_KEY

REPO = Path(__file__).resolve().parents[2]


def tunlock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_the_shipped_example_passes():
    result = tunlock("check", "--config", "configs/tunlock.toml")
    assert result.returncode == 0, result.stderr
    assert "ok: 2 servers, 2 endpoints over IPv4+IPv6" in result.stdout


def test_broken_files_give_every_problem_and_exit_1(write_config, write_server):
    path = write_config("[lock]\ninbound_tcp = [0]\n")
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}:2: lock.inbound_tcp" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_server_errors_and_warnings_are_printed_without_keys(write_config, write_server):
    path = write_config("")
    write_server(
        f"[Interface]\nPrivateKey = {PRIVATE_KEY}\nAddress = 10.0.0.2/32\nPostUp = x\n[Peer]\n", "b.conf"
    )
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert "b.conf:5: [Peer] has no PublicKey" in result.stderr
    assert PRIVATE_KEY not in result.stderr + result.stdout


def test_warnings_do_not_fail_the_check(write_config, write_server):
    path = write_config("")
    (path.parent / "servers" / "vpn1.conf").chmod(0o644)
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 0
    assert "vpn1.conf: warning: holds a private key but is readable" in result.stderr


def test_missing_config_is_an_error_not_a_traceback(tmp_path):
    result = tunlock("check", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    assert "absent.toml: no such file" in result.stderr and "Traceback" not in result.stderr
