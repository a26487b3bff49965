"""How long applying the lock takes with many endpoints (goal: 10,000 endpoints <= 1 s).

Also what the owned twin costs (both tables through the daemon's libnftables context against
the ordinary table alone through `nft`), and what leaks after another program's `nft flush
ruleset` followed at once by every kind of probe: the guard alone (before issue 12) against the
guard with the owned twin.

Also the tunnel's throughput with and without the lock (goal: >= 98 %), iperf3 through
wireguard-go in the lab, through the tests' hand-made tunnel (tests/lab/hand_tunnel.py). Run as
root from the repository: PYTHONPATH=. .venv/bin/python bench/bench_lock.py [ENDPOINTS]
The lock is applied inside a lab namespace, never on this machine itself.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from ipaddress import IPv4Address, IPv6Address

import anyio

from supervisor.config import load_config
from supervisor.lab import faults
from supervisor.lab.probes import Observer, Probes
from supervisor.lab.topology import Lab, sh
from supervisor.lock import nft
from supervisor.lock.configured import policy_from_config
from supervisor.lock.guard import LockGuard
from supervisor.lock.owner import OwningContext
from supervisor.lock.policy import LockPolicy
from supervisor.servers import Endpoint
from tests.lab.hand_tunnel import hand_tunnel


def endpoints(count: int) -> frozenset[Endpoint]:
    v4 = int(IPv4Address("198.51.100.0"))
    v6 = int(IPv6Address("2001:db8::"))
    return frozenset(
        Endpoint(IPv4Address(v4 + i % 256), 1024 + i // 256)
        if i % 2
        else Endpoint(IPv6Address(v6 + i), 51820)
        for i in range(count)
    )


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    policy = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C, endpoints=endpoints(count))
    with Lab.up(servers=1) as lab, lab.inside("client"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            nft.apply(policy)
            times.append(time.perf_counter() - start)
        old = policy.endpoints
        new = frozenset(list(old)[:-1]) | {Endpoint(IPv4Address("203.0.113.99"), 51820)}
        start = time.perf_counter()
        nft.swap_endpoints(policy, old, new)
        swap = time.perf_counter() - start
        start = time.perf_counter()
        state = nft.status(policy.table)
        read = time.perf_counter() - start
    assert state.installed
    print(
        f"lock: apply with {count} endpoints {min(times):.3f} s (best of 3, worst {max(times):.3f}); "
        f"endpoint swap {swap * 1000:.1f} ms; status read {read * 1000:.1f} ms"
    )


def best_of(times: int, work) -> float:
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        work()
        spent.append(time.perf_counter() - start)
    return min(spent)


def bench_owned(count: int = 10_000) -> None:
    """Per-apply and per-swap cost of the owned twin: both tables in one transaction through the
    owning context, against the ordinary table alone through the nft tool (today's fallback)."""
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    policy = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C, endpoints=endpoints(count))
    old = policy.endpoints
    new = frozenset(list(old)[:-1]) | {Endpoint(IPv4Address("203.0.113.99"), 51820)}
    small = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C, endpoints=endpoints(3))

    def swap_both_ways(target) -> None:  # there and back, so each run finds the same table
        target.swap_endpoints(policy, old, new)
        target.swap_endpoints(policy, new, old)

    with Lab.up(servers=1) as lab, lab.inside("client"):
        owner = OwningContext.open(policy.table)
        try:
            figures = {
                "nft, ordinary table alone": (
                    best_of(3, lambda: nft.apply(policy)),
                    best_of(5, lambda: swap_both_ways(nft)) / 2,
                    best_of(5, lambda: nft.apply(small)),
                ),
                "libnftables, both tables": (
                    best_of(3, lambda: owner.apply(policy)),
                    best_of(5, lambda: swap_both_ways(owner)) / 2,
                    best_of(5, lambda: owner.apply(small)),
                ),
            }
        finally:
            owner.close()
    for how, (apply, swap, apply_small) in figures.items():
        print(
            f"owned twin: {how}: apply with {count} endpoints {apply:.3f} s; endpoint swap "
            f"{swap * 1000:.1f} ms; apply with 3 endpoints {apply_small * 1000:.1f} ms (best of 3-5)"
        )


def bench_flush(rounds: int = 20) -> None:
    """Leaks after `nft flush ruleset` run by another program, each flush followed at once by
    every kind of probe, with the guard alone and with the owned twin."""
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    with Lab.up(servers=1) as lab:
        observer = Observer.start(lab)
        probes = Probes(lab)
        policy = policy_from_config(load_config(lab.config_path, {}))
        for owned in (False, True):
            leaked: list[int] = []
            restored_s: list[float] = []

            async def scenario(
                owner: OwningContext | None, leaked: list[int] = leaked, restored_s: list[float] = restored_s
            ) -> None:
                restored_at: list[float] = []

                async def on_tamper(reason: str) -> None:
                    restored_at.append(time.perf_counter())

                guard = LockGuard(policy, on_tamper, owner=owner)
                async with anyio.create_task_group() as tg:
                    await guard.apply()
                    await tg.start(guard.run)
                    for round_ in range(rounds):
                        mark = await anyio.to_thread.run_sync(observer.mark)
                        began = time.perf_counter()
                        await anyio.to_thread.run_sync(faults.flush_client_ruleset, lab)
                        await anyio.to_thread.run_sync(probes.every_kind)
                        while guard.restores <= round_:
                            await anyio.sleep(0.01)
                        # From before the flush (its `ip netns exec nft` child included: an upper
                        # bound) to the restore reported.
                        restored_s.append(restored_at[-1] - began)
                        leaked.append(len(await anyio.to_thread.run_sync(observer.leaks, mark)))
                    tg.cancel_scope.cancel()

            def run(owned: bool = owned) -> None:
                with lab.inside("client"):
                    owner = OwningContext.open(policy.table) if owned else None
                    try:
                        anyio.run(scenario, owner)
                    finally:
                        if owner is not None:
                            owner.close()

            worker = threading.Thread(target=run)
            worker.start()
            worker.join()
            lab.run("client", "nft", "delete", "table", "inet", policy.table, check=False)
            print(
                f"flush + every probe kind, {rounds} rounds, "
                f"{'guard + owned twin' if owned else 'guard alone (before)'}: "
                f"{sum(leaked)} packets leaked, in {sum(1 for n in leaked if n)} of {rounds} rounds; "
                f"restored within median {1000 * statistics.median(restored_s):.0f} ms, "
                f"max {1000 * max(restored_s):.0f} ms of starting the flush"
            )


def throughput(lab: Lab, seconds: int = 3) -> float:
    """iperf3 from the client through the tunnel to the internet host; bits per second."""
    server = lab.spawn("inet", ["iperf3", "-s", "-1", "-B", "203.0.113.10"], "iperf3.log")
    time.sleep(0.3)
    out = sh(
        "ip",
        "netns",
        "exec",
        lab.ns("client"),
        "iperf3",
        "-c",
        "203.0.113.10",
        "-t",
        str(seconds),
        "-J",
        timeout=seconds + 20,
    )
    server.wait(10)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def bench_throughput(rounds: int = 8, seconds: int = 2) -> None:
    """Adjacent runs without and with the lock, paired: wireguard-go's throughput here varies by
    a quarter from one run to the next, so only the ratio within a pair means anything."""
    with Lab.up(servers=1) as lab, hand_tunnel(lab, server=1):
        policy = policy_from_config(load_config(lab.config_path, {}))
        ratios, without = [], []
        for round_ in range(rounds):
            measured = {}
            # ABBA order: which of the pair runs first alternates, so drift does not pose as cost.
            for locked in (False, True) if round_ % 2 == 0 else (True, False):
                with lab.inside("client"):
                    nft.apply(policy) if locked else nft.remove(policy.table)
                measured[locked] = throughput(lab, seconds)
            with lab.inside("client"):
                nft.remove(policy.table)
            ratios.append(measured[True] / measured[False])
            without.append(measured[False])
    print(
        f"throughput through wireguard-go: {statistics.median(without) / 1e6:.0f} Mbit/s without the lock; "
        f"with it {statistics.median(ratios) * 100:.1f} % of that (median of {rounds} paired runs, "
        f"range {min(ratios) * 100:.0f}-{max(ratios) * 100:.0f} %)"
    )


if __name__ == "__main__":
    main()
    bench_owned()
    bench_flush()
    bench_throughput()
