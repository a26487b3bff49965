"""The daemon's figures, measured in the lab (run as root; nothing touches this machine itself).

- failover: a server goes silent (blackholed at the ISP) -> first ping answered through the next
  server (goal <= 4 s), under a 10 ms ping; also when the daemon declared it dead;
- link down -> the daemon's ``offline`` (goal <= 50 ms), from the fault to the state change the
  daemon logs;
- false failovers with 20 % loss both ways on an idle tunnel (goal 0);
- the idle connected daemon: CPU share of one core and RSS (goals <= 0.2 %, <= 50 MB), with
  the metrics endpoint on (the heavier case);
- a metrics scrape over loopback: median and slowest of 50 (one nft read of the lock each).

    .venv/bin/python bench/bench_daemon.py [--runs 5] [--idle-s 60] [--loss-s 60]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import ContinuousPing
from supervisor.lab.topology import Lab

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def state_changes(daemon: LabDaemon) -> list[tuple[float, dict]]:
    """(wall time, record) for every state the daemon logged."""
    found = []
    for line in daemon.log_events():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "state":
            found.append((datetime.fromisoformat(record["timestamp"]).timestamp(), record))
    return found


def first_state_after(daemon: LabDaemon, moment: float, state: str) -> tuple[float, dict] | None:
    return next(((t, r) for t, r in state_changes(daemon) if t > moment and r["state"] == state), None)


def failover(lab: Lab, daemon: LabDaemon, runs: int) -> None:
    answers, declared, outages = [], [], []
    for run in range(runs):
        current = daemon.status()["server"]
        index = current.removeprefix("vpn")
        pinger = ContinuousPing(lab, interval=0.01)
        time.sleep(0.5)
        moment = time.time()
        faults.blackhole_server(lab, index)
        daemon.wait_for(lambda s, c=current: s["state"] == "connected" and s["server"] != c, 30, "failover")
        time.sleep(0.3)
        record = pinger.stop()
        faults.restore_server(lab, index)
        time.sleep(2.5)
        # The end of the longest gap: pings in flight may still be answered just after the fault.
        gap_end = max(
            (b for a, b in itertools.pairwise(record.answered_at) if b - a >= record.longest_outage_s),
            default=None,
        )
        first = gap_end - moment if gap_end is not None else None
        dead = first_state_after(daemon, moment, "connecting")
        answers.append(first if first is not None else float("nan"))
        declared.append(dead[0] - moment if dead else float("nan"))
        outages.append(record.longest_outage_s)
        print(
            f"  run {run + 1}: {current} silent -> declared dead after {declared[-1]:.2f} s, "
            f"first ping answered after {answers[-1]:.2f} s (longest outage {outages[-1]:.2f} s)"
        )
    print(
        f"failover: first answered ping via the next server: median {statistics.median(answers):.2f} s, "
        f"max {max(answers):.2f} s (goal <= 4 s); declared dead: median {statistics.median(declared):.2f} s"
    )


def offline(lab: Lab, daemon: LabDaemon, runs: int) -> None:
    took = []
    for _ in range(runs):
        moment = time.time()
        faults.link_down(lab)
        daemon.wait_for(lambda s: s["state"] == "offline", 5, "offline")
        change = first_state_after(daemon, moment, "offline")
        took.append((change[0] - moment) * 1000 if change else float("nan"))
        faults.link_up(lab)
        daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected again")
        # The kernel reports carrier changes through linkwatch, at most once a second per
        # device: a cable pulled again within a second of coming back is reported late.
        time.sleep(1.5)
    print(
        f"link down -> offline: median {statistics.median(took):.1f} ms, max {max(took):.1f} ms "
        f"(goal <= 50 ms; from before `ip link set down` to the daemon's state change)"
    )


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # + waited-for children


def _memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def idle(daemon: LabDaemon, seconds: float) -> None:
    # The daemon and its `nft monitor`; wireguard-go (also a child) is the tunnel, not the daemon.
    pids = [daemon.pid, *(p for p in _children(daemon.pid) if b"wireguard-go" not in _cmdline(p))]
    before = {pid: _cpu_ticks(pid) for pid in pids}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    used = sum(_cpu_ticks(pid) - before[pid] for pid in pids) / CLOCK_TICKS
    rss, private = _memory_mb(daemon.pid, "VmRSS"), _memory_mb(daemon.pid, "RssAnon")
    print(
        f"idle connected daemon over {elapsed:.0f} s: CPU {100 * used / elapsed:.2f} % of one core "
        f"(daemon + nft monitor; goal <= 0.2 %), RSS {rss:.1f} MB, of it {private:.1f} MB private "
        "(goal <= 50 MB)"
    )


SCRAPES = """
import socket, statistics, sys, time
took = []
for _ in range(int(sys.argv[1])):
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", 9586), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: tunlock\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:80]
    took.append(time.perf_counter() - began)
print(f"{statistics.median(took) * 1000:.1f} {max(took) * 1000:.1f} {len(data)}")
"""


def scrapes(lab: Lab, count: int) -> None:
    median, slowest, size = lab.run("client", sys.executable, "-c", SCRAPES, str(count)).split()
    print(f"metrics scrape over loopback: median {median} ms, slowest {slowest} ms of {count}; {size} bytes")


def lossy(lab: Lab, daemon: LabDaemon, seconds: float) -> None:
    before = len(state_changes(daemon))
    faults.loss(lab, "20")
    try:
        time.sleep(seconds)
    finally:
        faults.clear_loss(lab)
    changes = state_changes(daemon)[before:]
    print(
        f"20 % loss both ways for {seconds:.0f} s on an idle tunnel: {len(changes)} state changes, "
        f"{sum(1 for _, r in changes if r['state'] == 'connecting')} false failovers (goal 0)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=60)
    parser.add_argument("--loss-s", type=float, default=60)
    parser.add_argument("--no-metrics", action="store_true", help="leave [metrics] listen unset")
    args = parser.parse_args()
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    # A short cooldown, waited out between runs, so every run measures a plain failover (not the
    # backoff after every server has failed once).
    env = {"TUNLOCK_ROTATION_COOLDOWN_S": "2"}
    if not args.no_metrics:
        env["TUNLOCK_METRICS_LISTEN"] = "127.0.0.1:9586"
    with Lab.up(servers=3) as lab, LabDaemon(lab, env=env) as daemon:
        daemon.start()
        failover(lab, daemon, args.runs)
        offline(lab, daemon, args.runs)
        daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected")
        idle(daemon, args.idle_s)
        if not args.no_metrics:
            scrapes(lab, 50)
        lossy(lab, daemon, args.loss_s)


if __name__ == "__main__":
    main()
