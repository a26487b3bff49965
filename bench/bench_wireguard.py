#!/usr/bin/env python3
"""Figures for the WireGuard backends: peer swap outage and the cost of one stats read.

Builds a lab (supervisor.lab: client, ISP, two wireguard-go servers, in tlab* namespaces), then per
backend:

- **swap**: a ping through the tunnel every 5 ms while the peer is swapped between the two
  servers N times, without and then with the lock (its endpoint swapped first, as the
  supervisor does); the figure is the time from the start of the swap to the first answer to a
  ping sent after that start (it can only have come through the new server), plus how long the
  swap call itself took.
- **stats read**: K successive ``Tunnel.stats()`` calls (one UAPI get, or one netlink dump);
  wall time per read, our CPU time per read, and (userspace) wireguard-go's CPU per read, i.e.
  what a 1 s stats loop costs.

Run as root: ``.venv/bin/python bench/bench_wireguard.py [--backend userspace|kernel] [--swaps N]``.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TUNLOCK_LAB_ONLY"] = "1"  # the lock refuses to go anywhere but a lab namespace

from supervisor.lock import nft as lock
from supervisor.lock.policy import LockPolicy
from supervisor.wireguard.tunnel import Tunnel, open_tunnel
from tests.lab.wg_lab import (
    TUNNEL_SERVER_V4,
    PingLog,
    WgLab,
    kernel_wireguard_present,
    ping_continuously,
    shared_lab,
    tunnel_settings,
    uapi_pid,
)


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return (
        f"median {statistics.median(ordered) * 1000:6.1f} ms  p90 {p90 * 1000:6.1f} ms  "
        f"max {ordered[-1] * 1000:6.1f} ms"
    )


async def bench_swaps(tunnel: Tunnel, lab: WgLab, ifname: str, swaps: int, with_lock: bool) -> None:
    log = PingLog()
    outages: list[float] = []
    calls: list[float] = []
    policy = None
    if with_lock:
        policy = LockPolicy(table="tunlock", tunnel_interface=ifname, fwmark=0xCA6C)
        policy = policy.with_servers([lab.server(1)])
        lock.apply(policy)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ping_continuously, str(TUNNEL_SERVER_V4), ifname, 0.005, log)
        await anyio.sleep(0.3)
        for n in range(swaps):
            target = lab.server(2 if n % 2 == 0 else 1)
            started = time.monotonic()
            if policy is not None:  # as the supervisor does it: the lock's endpoint first
                lock.swap_endpoints(policy, policy.endpoints, frozenset({target.endpoint}))
                policy = policy.with_servers([target])
            await tunnel.connect(target)
            calls.append(time.monotonic() - started)
            with anyio.fail_after(10):
                while log.first_answer_sent_after(started) is None:
                    await anyio.sleep(0.002)
            outages.append(log.first_answer_sent_after(started) or 0.0)
            await anyio.sleep(0.25)
        tg.cancel_scope.cancel()
    if with_lock:
        lock.remove("tunlock")
    print(f"  peer swap, {swaps} swaps under a 5 ms ping, {'with' if with_lock else 'without'} the lock:")
    print(f"    first answer via the new server:  {_ms(outages)}")
    print(f"    swap call (lock, peer, plumbing): {_ms(calls)}")
    lost = len(log.sent) - len(log.answered)
    print(f"    pings: {len(log.sent)} sent, {lost} unanswered over the whole run")


async def bench_stats(tunnel: Tunnel, reads: int) -> None:
    pid = uapi_pid(tunnel.ifname) if tunnel.backend.kind == "userspace" else None
    await tunnel.stats()
    wall: list[float] = []
    ours_before, theirs_before = time.process_time(), _cpu_seconds(pid)
    for _ in range(reads):
        started = time.perf_counter()
        await tunnel.stats()
        wall.append(time.perf_counter() - started)
    ours = (time.process_time() - ours_before) / reads
    theirs = (_cpu_seconds(pid) - theirs_before) / reads
    print(f"  stats read, {reads} reads:")
    print(
        f"    wall per read: median {statistics.median(wall) * 1e6:.0f} us, "
        f"p99 {sorted(wall)[int(reads * 0.99)] * 1e6:.0f} us"
    )
    line = f"    CPU per read: ours {ours * 1e6:.0f} us"
    if pid is not None:
        line += f", wireguard-go {theirs * 1e6:.0f} us"
    print(line)
    print(f"    a 1 s stats loop costs {(ours + theirs) * 100:.3f} % of one core")


async def run_backend(lab: WgLab, kind: str, swaps: int, reads: int) -> None:
    settings_gen = tunnel_settings(lab, kind)
    settings = next(settings_gen)
    try:
        async with open_tunnel(settings) as tunnel:
            started = time.monotonic()
            await tunnel.connect(lab.server(1))
            print(
                f"backend {kind}: connect (interface, peer, addresses, routes, DNS) "
                f"{(time.monotonic() - started) * 1000:.0f} ms"
            )
            await bench_swaps(tunnel, lab, settings.ifname, swaps, with_lock=False)
            await bench_swaps(tunnel, lab, settings.ifname, swaps, with_lock=True)
            await bench_stats(tunnel, reads)
            await tunnel.close()
    finally:
        next(settings_gen, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["userspace", "kernel", "all"], default="all")
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_wireguard: needs root (it builds network namespaces)")
    kinds = ["userspace", "kernel"] if args.backend == "all" else [args.backend]
    lab_gen = shared_lab(servers=2)
    lab = next(lab_gen)
    try:
        for kind in kinds:
            if kind == "kernel" and not kernel_wireguard_present():
                print("backend kernel: skipped, this kernel has no WireGuard module")
                continue
            anyio.run(run_backend, lab, kind, args.swaps, args.reads)
    finally:
        next(lab_gen, None)


if __name__ == "__main__":
    main()
