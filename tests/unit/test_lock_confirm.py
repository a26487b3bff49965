"""`tunlock lock confirm` against the confirmation's state file: in time, too late, nothing
pending. The reverter itself, which changes a lock, runs in the lab (tests/lab/test_admin_confirm.py)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from supervisor.lock.confirm import ConfirmError, Pending, confirm, locked


def write(path: Path, **fields: object) -> None:
    pending = Pending(table="tunlock", previous=None, seconds=30, deadline=time.time() + 30)
    path.write_text(json.dumps({**asdict(pending), **fields}))


def test_nothing_pending_is_said_so(tmp_path: Path) -> None:
    with pytest.raises(ConfirmError, match="no lock change waits"):
        confirm("tunlock", tmp_path / "none.json")


def test_a_pending_change_is_marked_confirmed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, reverter_pid=0)
    assert confirm("tunlock", path).status == "confirmed"
    assert json.loads(path.read_text())["status"] == "confirmed", "the reverter reads it and leaves"


def test_after_the_revert_it_is_too_late_and_the_state_goes(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, status="reverted")
    with pytest.raises(ConfirmError, match="too late: the previous lock was put back"):
        confirm("tunlock", path)
    assert not path.exists()


def test_the_state_is_written_back_only_as_decided(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path)
    with locked(path) as (current, out):
        assert current is not None and current.status == "pending"
    assert json.loads(path.read_text())["status"] == "pending"
    with pytest.raises(RuntimeError), locked(path) as (current, out):
        out[0] = None
        raise RuntimeError("decided, then failed")
    assert not path.exists(), "a decision made before an error still holds"


def test_a_revert_that_failed_is_said_so(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, status="failed", error="nft: no such table")
    with pytest.raises(ConfirmError, match=r"could not be put back \(nft: no such table\)"):
        confirm("tunlock", path)
    assert not path.exists()
