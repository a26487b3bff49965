"""The daemon's CPU while the tunnel is saturated (iperf3 through it), beside wireguard-go's own.

The daemon samples counters and, with rx keeping pace with tx, does nothing else: its share should
stay near its idle share however busy the tunnel is (the cost of bulk traffic is wireguard-go's and
the kernel's). Run as root: .venv/bin/python bench/bench_saturated.py [--seconds 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_daemon import CLOCK_TICKS, _children, _cmdline, _cpu_ticks
from bench_lock import throughput

from supervisor.lab.daemon import LabDaemon
from supervisor.lab.topology import Lab, uapi_pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    with Lab.up(servers=1) as lab, LabDaemon(lab) as daemon:
        daemon.start()
        daemon_share, wg_share, rates = [], [], []
        for _ in range(args.runs):
            pids = [daemon.pid, *(p for p in _children(daemon.pid) if b"wireguard-go" not in _cmdline(p))]
            wg = uapi_pid(lab.client_ifname)
            assert wg is not None, "no wireguard-go serves the client's tunnel"
            before = {pid: _cpu_ticks(pid) for pid in [*pids, wg]}
            began = time.monotonic()
            rate = throughput(lab, args.seconds)
            elapsed = time.monotonic() - began
            used = {pid: (_cpu_ticks(pid) - before[pid]) / CLOCK_TICKS for pid in before}
            daemon_share.append(100 * sum(used[p] for p in pids) / elapsed)
            wg_share.append(100 * used[wg] / elapsed)
            rates.append(rate / 1e6)
            status = daemon.status()
            assert status and status["state"] == "connected", f"the daemon left connected: {status}"
    print(
        f"saturated tunnel ({args.runs} runs of {args.seconds} s iperf3): "
        f"{statistics.median(rates):.0f} Mbit/s; daemon CPU median {statistics.median(daemon_share):.2f} % "
        f"of one core (max {max(daemon_share):.2f}); "
        f"wireguard-go {statistics.median(wg_share):.0f} %; no failover while saturated"
    )


if __name__ == "__main__":
    main()
