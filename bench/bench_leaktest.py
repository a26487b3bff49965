"""How long `tunlock leaktest` takes and how many probes it sends, in the lab: without a lock, with
the lock alone and with the daemon connected; and what the ISP's observer counted in each.

Run as root: .venv/bin/python bench/bench_leaktest.py [ROUNDS]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import Observer
from supervisor.lab.topology import Lab


def leaktest(lab: Lab) -> tuple[float, dict]:
    argv = ["ip", "netns", "exec", lab.ns("client"), sys.executable, "-m", "supervisor.cli"]
    start = time.perf_counter()
    done = subprocess.run(
        [*argv, "leaktest", "--json", "--config", str(lab.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TUNLOCK_LAB_ONLY": "1"},
    )
    return time.perf_counter() - start, json.loads(done.stdout)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    with Lab.up(servers=1) as lab:
        observer = Observer.start(lab)
        lock = [sys.executable, "-m", "supervisor.cli", "lock"]

        def state(name: str) -> None:
            walls, runs, seen = [], [], 0
            for _ in range(rounds):
                mark = observer.mark()
                wall, report = leaktest(lab)
                seen += len(observer.leaks(since=mark))
                walls.append(wall)
                runs.append(report["seconds"])
            print(
                f"{name:<18} {len(report['probes'])} probes, exit {report['exit']}, "
                f"{report['leaks']} reported leaked; run {statistics.median(runs):.2f} s median "
                f"(max {max(runs):.2f}), command {statistics.median(walls):.2f} s with Python's start; "
                f"observer counted {seen / rounds:.0f} packets per run"
            )

        state("no lock")
        lab.run("client", *lock, "apply", "--config", str(lab.config_path))
        state("lock alone")
        daemon = LabDaemon(lab)
        daemon.start()
        try:
            state("connected")
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
