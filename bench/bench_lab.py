"""How long the lab takes to come up and go down (goal: up <= 5 s with 3 servers).

Run as root: .venv/bin/python bench/bench_lab.py [SERVERS] [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from supervisor.lab.topology import Lab


def main() -> None:
    servers = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    ups, downs = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        lab = Lab.up(servers=servers)
        ups.append(time.perf_counter() - start)
        start = time.perf_counter()
        lab.down()
        downs.append(time.perf_counter() - start)
    print(
        f"lab with {servers} servers: up median {statistics.median(ups):.2f} s (max {max(ups):.2f}), "
        f"down median {statistics.median(downs):.2f} s over {rounds} rounds"
    )


if __name__ == "__main__":
    main()
