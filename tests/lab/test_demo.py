"""`tunlock demo` as a user runs it: a timeline, the leak count, exit 0, nothing left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supervisor.lab.topology import labs

pytestmark = pytest.mark.lab


def test_demo_shows_leaks_without_the_lock_and_none_with_it():
    before = {s.id for s in labs()}
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "demo"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    no_lock = next(line for line in lines if "no lock:" in line)
    assert "the ISP saw 0 leaked" not in no_lock, "without the lock the observer must see the probes"
    assert "tunlock run: connected to vpn1" in result.stdout and "ISP resolver blocked" in result.stdout
    assert "failed over to vpn2" in result.stdout
    assert "internet unreachable" in result.stdout, "stopped, the lock stays"
    assert lines[-1].endswith("Leaked packets with the lock in place: 0")
    # Compared as a subset: the demo sweeps labs whose owner died (say, a CI run killed earlier), so
    # a stale lab present before may rightly be gone after; what must never happen is a new one left.
    left_behind = {s.id for s in labs()} - before
    assert not left_behind, f"the demo must remove its lab, left {left_behind}"
