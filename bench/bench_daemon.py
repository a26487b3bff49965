"""The daemon's figures, measured in the lab (run as root; nothing touches this machine itself).

- failover: a server goes silent (blackholed at the ISP) -> first ping answered through the next
  server (goal: median <= 2 s, max <= 3 s over >= 10 failovers), under a 10 ms ping that has
  been running for 2.5 s; also when the daemon declared it dead; and a few failovers where the
  ping starts just before (or just after) the fault, after an idle spell (the first packet wakes
  the idle daemon; before issue #27 it waited for its next sample, every 2 s);
- the probe traffic while in doubt: packets and bytes a second on the client's physical link
  in the middle of a doubt (a silent server, no other traffic);
- link down -> the daemon's ``offline`` (goal <= 50 ms), from the fault to the state change the
  daemon logs;
- false failovers under 20 % and 30 % loss both ways, with a light ping through the tunnel so
  that lost packets keep putting the daemon in doubt (goal 0; the issue's figure is 10 minutes
  each, ``--loss-s 600``, the default);
- the idle connected daemon: CPU share of one core and RSS (goals <= 0.2 %, <= 50 MB), with
  the metrics endpoint on (the heavier case);
- a metrics scrape over loopback: median and slowest of 50 (one nft read of the lock each).

    .venv/bin/python bench/bench_daemon.py [--runs 10] [--idle-s 60] [--loss-s 600] [--loss 20,30]
    .venv/bin/python bench/bench_daemon.py --idle-only [--no-metrics] [--idle-s 60]
    .venv/bin/python bench/bench_daemon.py --failover-only [--runs 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import INTERNET_V4, ContinuousPing
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


def failover(lab: Lab, daemon: LabDaemon, runs: int, warm_s: float, label: str) -> None:
    """``warm_s``: how long the 10 ms ping runs before the fault. Long enough (> idle_interval_s,
    2 s), the daemon samples at the busy pace and sees the silence within 0.25-0.5 s; shortly
    after an idle spell it sees the traffic at its first packet (issue #27; before, only at its
    next idle sample, up to 2 s later). A negative ``warm_s``: the server falls silent that long
    *before* the ping starts after an idle spell, and the figures count from the ping's start."""
    print(f"failover, {label}:")
    answers, declared, outages = [], [], []
    for run in range(runs):
        current = daemon.status()["server"]
        index = current.removeprefix("vpn")
        if warm_s < 0:
            faults.blackhole_server(lab, index)
            time.sleep(-warm_s)
            moment = time.time()
            pinger = ContinuousPing(lab, interval=0.01)
            applied = 0.0
        else:
            pinger = ContinuousPing(lab, interval=0.01)
            time.sleep(warm_s)
            moment = time.time()
            faults.blackhole_server(lab, index)
            applied = time.time() - moment  # the nft call in the ISP: part of every figure below
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
        if warm_s < 0:  # nothing answered before the fault: the first answer at all
            gap_end = record.answered_at[0] if record.answered_at else None
        first = gap_end - moment if gap_end is not None else None
        dead = first_state_after(daemon, moment, "connecting")
        answers.append(first if first is not None else float("nan"))
        declared.append(dead[0] - moment if dead else float("nan"))
        outages.append(record.longest_outage_s)
        # The verdict's own account ("silent: 31 probes unanswered over 1.2 s"): the rest of the
        # time to the verdict is the fault's own setup and the wait for the first sign of doubt.
        why = dead[1]["reason"].split("failed: ", 1)[-1] if dead else "?"
        print(
            f"  run {run + 1}: {current} silent (fault in place after {applied:.2f} s) -> declared dead "
            f"after {declared[-1]:.2f} s ({why}), "
            f"first ping answered after {answers[-1]:.2f} s (longest outage {outages[-1]:.2f} s)"
        )
    print(
        f"failover ({label}): first answered ping via the next server: "
        f"median {statistics.median(answers):.2f} s, "
        f"max {max(answers):.2f} s (goal: median <= 2 s, max <= 3 s); declared dead: median "
        f"{statistics.median(declared):.2f} s, max {max(declared):.2f} s"
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
    # The daemon and any helper it keeps (an `nft monitor` and `ip monitor` before issue #27);
    # wireguard-go (also a child) is the tunnel, not the supervision.
    helpers = [p for p in _children(daemon.pid) if b"wireguard-go" not in _cmdline(p)]
    pids = [daemon.pid, *helpers]
    before = {pid: _cpu_ticks(pid) for pid in pids}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    used = sum(_cpu_ticks(pid) - before[pid] for pid in pids) / CLOCK_TICKS
    rss, private = _memory_mb(daemon.pid, "VmRSS"), _memory_mb(daemon.pid, "RssAnon")
    helpers_rss = sum(_memory_mb(pid, "VmRSS") for pid in helpers)
    print(
        f"idle connected daemon over {elapsed:.0f} s: CPU {100 * used / elapsed:.2f} % of one core "
        f"(daemon + {len(helpers)} helper processes; goal <= 0.05 %), RSS {rss:.1f} MB, of it "
        f"{private:.1f} MB private, + helpers {helpers_rss:.1f} MB = {rss + helpers_rss:.1f} MB "
        "(goal <= 40 MB)"
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


def lossy(lab: Lab, daemon: LabDaemon, seconds: float, percent: str) -> None:
    before = len(state_changes(daemon))
    faults.loss(lab, percent)
    pinger = ContinuousPing(lab, interval=0.2)
    try:
        time.sleep(seconds)
    finally:
        record = pinger.stop()
        faults.clear_loss(lab)
    changes = state_changes(daemon)[before:]
    sent = max(1, round(seconds / 0.2))
    print(
        f"{percent} % loss both ways for {seconds:.0f} s, a ping every 0.2 s ({record.answered} of "
        f"~{sent} answered): {len(changes)} state changes, "
        f"{sum(1 for _, r in changes if r['state'] == 'connecting')} false failovers (goal 0)"
    )


# Reads the client's physical link's counters every 10 ms: "monotonic-as-wall packets bytes".
COUNTERS = """
import sys, time
end = time.time() + float(sys.argv[1])
base = "/sys/class/net/wan0/statistics/"
while time.time() < end:
    packets = open(base + "tx_packets").read().strip()
    size = open(base + "tx_bytes").read().strip()
    print(f"{time.time():.4f} {packets} {size}", flush=True)
    time.sleep(0.01)
"""


def doubt_traffic(lab: Lab, daemon: LabDaemon, runs: int) -> None:
    """A silent server and no other traffic: one ping starts the doubt; the probe traffic is read
    off the physical link from 0.9 s to 0.1 s before the verdict (the doubt lasts at least
    ``dead_after_s``, 1 s, so that stretch is all doubt)."""
    rates = []
    for _ in range(runs):
        daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected")
        current = daemon.status()["server"]
        index = current.removeprefix("vpn")
        time.sleep(3)  # idle: nothing owed
        result: list[str] = []
        reader = threading.Thread(
            target=lambda out=result: out.append(
                lab.run("client", sys.executable, "-c", COUNTERS, "6", timeout=15)
            )
        )
        reader.start()
        time.sleep(0.3)
        moment = time.time()
        faults.blackhole_server(lab, index)
        lab.run("client", "ping", "-n", "-c", "1", "-W", "1", INTERNET_V4, check=False)
        reader.join()
        faults.restore_server(lab, index)
        verdict = first_state_after(daemon, moment, "connecting")
        if verdict is None or not result:
            print("  doubt traffic: no verdict within the reading")
            continue
        samples = [tuple(map(float, line.split())) for line in result[0].splitlines() if line]
        inside = [p for p in samples if verdict[0] - 0.9 <= p[0] <= verdict[0] - 0.1]
        if len(inside) < 2:
            continue
        (t0, p0, b0), (t1, p1, b1) = inside[0], inside[-1]
        rates.append(((p1 - p0) / (t1 - t0), (b1 - b0) / (t1 - t0)))
        time.sleep(2.5)  # the cooldown (2 s here) runs out before the next run
    if rates:
        packets = statistics.median(r[0] for r in rates)
        size = statistics.median(r[1] for r in rates)
        print(
            "probe traffic while in doubt (physical link with Ethernet headers, IPv4 endpoint): "
            f"median {packets:.1f} packets/s, {size:.0f} bytes/s ({size / max(packets, 1):.0f} bytes each), "
            f"over {len(rates)} doubts"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--idle-s", type=float, default=60)
    parser.add_argument("--loss-s", type=float, default=600, help="seconds at each loss rate")
    parser.add_argument("--loss", default="20,30", help="loss rates in %% both ways, comma-separated")
    parser.add_argument("--no-metrics", action="store_true", help="leave [metrics] listen unset")
    parser.add_argument("--loss-only", action="store_true", help="only the false-failover runs")
    parser.add_argument("--idle-only", action="store_true", help="only the idle CPU and RSS")
    parser.add_argument(
        "--failover-only", action="store_true", help="only the failovers (busy, and after an idle spell)"
    )
    args = parser.parse_args()
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    # A short cooldown, waited out between runs, so every run measures a plain failover (not the
    # backoff after every server has failed once).
    env = {"TUNLOCK_ROTATION_COOLDOWN_S": "2"}
    if not args.no_metrics:
        env["TUNLOCK_METRICS_LISTEN"] = "127.0.0.1:9586"
    print(
        f"# {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start: "
        "the machine may be shared, timings are noisy"
    )
    with Lab.up(servers=3) as lab, LabDaemon(lab, env=env) as daemon:
        daemon.start()
        if args.loss_only:
            for percent in args.loss.split(","):
                lossy(lab, daemon, args.loss_s, percent.strip())
            return
        if args.idle_only:
            daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected")
            time.sleep(5)  # past the connect's own work and into idle sampling
            idle(daemon, args.idle_s)
            return
        failover(lab, daemon, args.runs, 2.5, "traffic flowing for 2.5 s before the fault")
        failover(lab, daemon, max(3, args.runs // 3), 0.3, "traffic starting 0.3 s before, after idle")
        failover(lab, daemon, max(3, args.runs // 3), -0.3, "traffic starting 0.3 s after, after idle")
        if args.failover_only:
            return
        doubt_traffic(lab, daemon, 3)
        offline(lab, daemon, args.runs)
        daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected")
        idle(daemon, args.idle_s)
        if not args.no_metrics:
            scrapes(lab, 50)
        for percent in args.loss.split(","):
            daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected")
            lossy(lab, daemon, args.loss_s, percent.strip())
    print(f"# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
