"""How long applying the lock takes with many endpoints (goal: 10,000 endpoints <= 1 s).

Run as root: .venv/bin/python bench/bench_lock.py [ENDPOINTS]
The lock is applied inside a lab namespace, never on this machine itself.
"""

from __future__ import annotations

import os
import sys
import time
from ipaddress import IPv4Address, IPv6Address

from supervisor.lab.topology import Lab
from supervisor.lock import nft
from supervisor.lock.policy import LockPolicy
from supervisor.servers import Endpoint


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


if __name__ == "__main__":
    main()
