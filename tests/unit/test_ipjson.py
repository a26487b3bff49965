"""The lock's ``ip -j`` readers (supervisor/net/ipjson.py), without root: this machine's own
namespace is only read here, and a stand-in ``ip`` on PATH plays the slow or failing cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.net import ipjson


def test_each_command_gets_its_own_records_and_a_failing_one_reads_as_nothing() -> None:
    links, nothing = ipjson.ip_json_side_by_side(
        ("link", "show"), ("route", "show", "table", "no-such-table")
    )
    assert "lo" in [link["ifname"] for link in links]
    assert nothing == []


def stand_in_ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    program = directory / "ip"
    program.write_text(f"#!/bin/sh\n{body}\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    return directory


def test_the_four_reads_of_the_lock_run_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each stand-in answers only once all four have started (and gives up after 2 s): run one
    # after the other, the first would wait for the others in vain and every read be empty.
    started = tmp_path / "started"
    stand_in_ip(
        tmp_path,
        monkeypatch,
        f'echo "$*" >> {started}\n'
        "i=0\n"
        f'while [ "$(wc -l < {started})" -lt 4 ]; do\n'
        '  i=$((i+1)); [ "$i" -gt 200 ] && exit 1; sleep 0.01\n'
        "done\n"
        'echo "[{\\"args\\": \\"$*\\"}]"',
    )
    state = ipjson.read_ip_state()
    assert state.addresses == [{"args": "-j addr show"}]
    assert state.links == [{"args": "-j -d link show"}]
    assert state.routes == [{"args": "-j -4 route show table main"}, {"args": "-j -6 route show table main"}]


def test_a_read_that_hangs_is_given_up_and_reads_as_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipjson, "_TIMEOUT_S", 0.2)
    stand_in_ip(tmp_path, monkeypatch, 'case "$*" in *link*) exec sleep 30;; esac\necho "[]"')
    state = ipjson.read_ip_state()
    assert (state.addresses, state.links, state.routes) == ([], [], [])


def test_no_ip_program_reads_as_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ipjson.ip_json("link", "show") == []
