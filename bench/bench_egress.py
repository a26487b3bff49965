"""What the egress chain on the uplink costs: applying the lock, and the tunnel's throughput.

Every frame leaving the uplink passes the netdev egress chain as well as the inet output chain;
the tunnel's packets match its second rule (the fwmark and an endpoint set lookup). Compared,
in one lab: the lock with the egress chain on the client's uplink against the same lock without
it (only the inet table), apply time with many endpoints (the endpoint sets are in both tables),
and iperf3 through wireguard-go in ABBA-paired runs, since wireguard-go's throughput here varies
by a quarter from one run to the next. Run as root from the repository:
PYTHONPATH=. .venv/bin/python bench/bench_egress.py [ENDPOINTS] [ROUNDS]
The lock is applied inside a lab namespace, never on this machine itself.
"""

from __future__ import annotations

import os
import statistics
import sys

from msgspec.structs import replace

from bench.bench_lock import best_of, endpoints, throughput
from supervisor.config import load_config
from supervisor.lab.topology import Lab
from supervisor.lock import nft
from supervisor.lock.configured import policy_from_config
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import render
from tests.lab.hand_tunnel import hand_tunnel


def install(policy: LockPolicy, egress: bool) -> None:
    """The whole lock, with the egress chain on the lab's uplink or without any netdev table."""
    shaped = replace(policy, egress_devices=("wan0",)) if egress else replace(policy, netdev=False)
    if not egress:
        nft.remove(policy.table)  # the egress table too
    nft._nft(["-f", "-"], render(shaped))


def bench_apply(count: int) -> None:
    policy = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C, endpoints=endpoints(count))
    with Lab.up(servers=1) as lab, lab.inside("client"):
        without = best_of(3, lambda: install(policy, egress=False))
        with_egress = best_of(3, lambda: install(policy, egress=True))
        nft.remove(policy.table)
    print(
        f"apply with {count} endpoints: {without:.3f} s without the egress chain, "
        f"{with_egress:.3f} s with it (best of 3)"
    )


def bench_throughput(rounds: int, seconds: int = 2) -> None:
    with Lab.up(servers=1) as lab, hand_tunnel(lab, server=1):
        policy = policy_from_config(load_config(lab.config_path, {}))
        ratios, without = [], []
        for round_ in range(rounds):
            measured = {}
            for egress in (False, True) if round_ % 2 == 0 else (True, False):
                with lab.inside("client"):
                    install(policy, egress)
                measured[egress] = throughput(lab, seconds)
            ratios.append(measured[True] / measured[False])
            without.append(measured[False])
        with lab.inside("client"):
            nft.remove(policy.table)
    print(
        f"throughput through wireguard-go with the lock: {statistics.median(without) / 1e6:.0f} Mbit/s "
        f"without the egress chain; with it {statistics.median(ratios) * 100:.1f} % of that (median of "
        f"{rounds} paired runs, range {min(ratios) * 100:.0f}-{max(ratios) * 100:.0f} %)"
    )


if __name__ == "__main__":
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    bench_apply(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
    bench_throughput(int(sys.argv[2]) if len(sys.argv) > 2 else 8)
