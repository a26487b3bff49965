"""``tunlock run`` imports only what the daemon's path needs (issue #27, item 3).

Every module imported at start costs the daemon memory for its whole life and delays the first
packet through the tunnel, so the run path must not pull in the lab, the leak test, the other
commands, the metrics stack (imported when ``[metrics] listen`` is set) or any plugin (loaded by
name when enabled). A fresh interpreter is the only place where "what else got imported" can be
asked. bench/bench_imports.py prints the time and memory this path costs.
"""

from __future__ import annotations

import subprocess
import sys

NEVER_ON_THE_RUN_PATH = (
    "supervisor.lab",
    "supervisor.leaktest",
    "supervisor.check",
    "supervisor.metrics",
    "supervisor.control.cli",
    "supervisor.systemd.units",
    "supervisor.lock.lockout",
    "plugins",
    "prometheus_client",
    "h11",
    "hypothesis",
    "matplotlib",
    "pydantic",
)

PROBE = (
    "import sys, supervisor.cli, supervisor.daemon, supervisor.log\n"
    f"never = {NEVER_ON_THE_RUN_PATH!r}\n"
    "print(' '.join(sorted(m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in never))))\n"
)


def test_the_run_path_imports_none_of_the_other_commands_plugins_or_metrics() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [], f"imported on the run path: {result.stdout}"
