"""The guard that keeps tests from locking this machine out of its own network."""

import pytest

from supervisor import safety
from supervisor.errors import SafetyError


def test_refuses_in_the_initial_namespace_in_lab_only_mode(monkeypatch):
    monkeypatch.setenv(safety.LAB_ONLY_ENV, "1")
    if safety.current_lab_namespace() is not None:
        pytest.skip("this test process itself runs inside a lab namespace")
    with pytest.raises(SafetyError, match="refusing to install a lock"):
        safety.ensure_safe_to_lock()


def test_allows_anywhere_when_not_in_lab_only_mode(monkeypatch):
    monkeypatch.delenv(safety.LAB_ONLY_ENV, raising=False)
    safety.ensure_safe_to_lock()


def test_the_test_suite_runs_in_lab_only_mode():
    assert safety.lab_only(), "tests/conftest.py must set TUNLOCK_LAB_ONLY for every test"
