"""`tunlock demo` as a user runs it: a timeline, the leak count, exit 0, nothing left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supervisor.lab.topology import labs

pytestmark = pytest.mark.lab


def test_demo_shows_leaks_without_the_lock_and_none_with_it(tmp_path):
    picture = tmp_path / "timeline.png"
    with subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "demo", "--png", str(picture)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as demo:
        stdout, stderr = demo.communicate(timeout=120)
    result = subprocess.CompletedProcess(demo.args, demo.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    no_lock = next(line for line in lines if "no lock:" in line)
    assert "the ISP saw 0 leaked" not in no_lock, "without the lock the observer must see the probes"
    assert "tunlock run: connected to vpn1" in result.stdout and "ISP resolver blocked" in result.stdout
    assert "failed over to vpn2" in result.stdout
    assert "internet unreachable" in result.stdout, "stopped, the lock stays"
    assert lines[-1].endswith("Leaked packets with the lock in place: 0")
    # The timeline a person can open: a PNG, drawn where it was asked for, and said where.
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"timeline drawn: {picture}" in result.stdout
    # The demo's own labs only (by owner): other runs on the machine may build labs meanwhile.
    left_behind = {s.id for s in labs() if s.owner_pid == demo.pid}
    assert not left_behind, f"the demo must remove its lab, left {left_behind}"
