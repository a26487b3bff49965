"""Three minutes of the soak (supervisor.lab.soak) in CI: a random fault every few seconds.

Fails on any leaked packet, any fault the daemon did not recover from, or a daemon process whose
open descriptors grow past warm-up. The seed is printed (and in the failure message): rerun it
with ``tunlock lab soak --minutes 3 --seed S``. ``TUNLOCK_SOAK_MINUTES`` changes the length.
"""

from __future__ import annotations

import os

import pytest

from supervisor.lab.soak import FAULT_KINDS, run_soak

pytestmark = pytest.mark.lab

MINUTES = float(os.environ.get("TUNLOCK_SOAK_MINUTES", "3"))


def test_a_soak_of_random_faults_leaks_nothing_and_always_recovers() -> None:
    report = run_soak(MINUTES)
    print(report.table())
    # Every kind of fault was met (the soak deals them from a shuffled deck), with probes running.
    assert set(report.by_kind()) == set(FAULT_KINDS)
    assert report.probe_rounds > 0
    assert report.problems() == [], f"seed {report.seed}:\n{report.table()}"
