"""The daemon's resident size over link flaps and status requests, measured in the lab (run as root;
nothing touches this machine itself).

- link flaps: the client's carrier off until the daemon reports ``offline``, on until it reports
  ``connected`` again, its status asked every 10 ms meanwhile (as the lab tests wait); RSS after
  every flap, printed every 10 flaps, and the growth after the warm-up (the least of 5 readings
  at each end, as tests/lab/test_soak_findings.py compares);
- status requests back to back, without flaps (a healthcheck or a monitoring poll for months):
  RSS every 250 answers, the growth after the warm-up, and the median answer time.

A flat trail after the warm-up is the goal: the daemon runs unattended for months.

    .venv/bin/python bench/bench_flaps.py [--flaps 120] [--warm-up 50] [--requests 3000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.topology import Lab

READINGS = 5


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def growth(trail: list[int], warm_up: int) -> str:
    warm = min(trail[max(0, warm_up - READINGS) : warm_up])
    after = min(trail[-READINGS:])
    return f"{warm} -> {after} KiB ({after - warm:+d} KiB)"


def flaps(lab: Lab, daemon: LabDaemon, count: int, warm_up: int) -> None:
    trail = []
    for _ in range(count):
        faults.link_down(lab)
        daemon.wait_for(lambda s: s["state"] == "offline", timeout=10, what="offline")
        faults.link_up(lab)
        daemon.wait_for(lambda s: s["state"] == "connected", timeout=15, what="connected after the flap")
        trail.append(rss_kib(daemon.pid))
    print(f"RSS every 10 link flaps: {trail[9::10]} KiB")
    print(f"  after {warm_up} warm-up flaps to after {count}: {growth(trail, warm_up)}")


def status_requests(daemon: LabDaemon, count: int, warm_up: int) -> None:
    trail, took = [], []
    for _ in range(count):
        began = time.perf_counter()
        if daemon.status() is None:
            raise RuntimeError("a status request was not answered")
        took.append(time.perf_counter() - began)
        trail.append(rss_kib(daemon.pid))
    print(f"RSS every 250 status requests: {trail[249::250]} KiB")
    print(
        f"  after {warm_up} warm-up requests to after {count}: {growth(trail, warm_up)}; "
        f"answer median {statistics.median(took) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flaps", type=int, default=120)
    parser.add_argument("--warm-up", type=int, default=50, help="flaps before the growth is measured")
    parser.add_argument("--requests", type=int, default=3000, help="status requests (0: none)")
    parser.add_argument("--requests-warm-up", type=int, default=500)
    args = parser.parse_args()
    with Lab.up(servers=3) as lab, LabDaemon(lab) as daemon:
        daemon.start()
        print(f"RSS connected at start: {rss_kib(daemon.pid)} KiB")
        if args.requests:
            status_requests(daemon, args.requests, args.requests_warm_up)
        if args.flaps:
            flaps(lab, daemon, args.flaps, args.warm_up)


if __name__ == "__main__":
    main()
