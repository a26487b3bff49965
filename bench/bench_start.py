"""From ``tunlock run`` starting to the tunnel carrying traffic, read from the daemon's own log
(run as root; in the lab, never on this machine itself).

Each round starts the daemon in one lab with the lock already in place (as at boot after the
early-boot unit) and no tunnel, and reads the wall-clock stamps of its log: ``tunnel connected``
(the peer set and the routes in place: the first packet can go) and the first ``connected``
state (the server answered a probe), each counted from just before the process was spawned.
Then the daemon is stopped (the tunnel goes, the lock stays) for the next round. With
``--against DIR`` (an exported tree of another commit) the rounds alternate between this tree's
daemon and that one's, in the same lab; compare.py's ``boot-start`` puts the same start next to
``wg-quick up`` in fresh labs.

    .venv/bin/python bench/bench_start.py [--rounds 10] [--against /path/to/other/tree]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime
from pathlib import Path

from supervisor.lab.daemon import LabDaemon
from supervisor.lab.topology import Lab

HERE = Path(__file__).resolve().parent.parent


def stamp_of(daemon: LabDaemon, after: int, what: str) -> float | None:
    """The wall time of the first log record after line ``after`` matching ``what``."""
    for line in daemon.log_events()[after:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if what == "tunnel connected" and record.get("event") == "tunnel connected":
            return datetime.fromisoformat(record["timestamp"]).timestamp()
        if what == "connected" and record.get("event") == "state" and record.get("state") == "connected":
            return datetime.fromisoformat(record["timestamp"]).timestamp()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--against", type=Path)
    args = parser.parse_args()
    os.environ["TUNLOCK_LAB_ONLY"] = "1"
    # The daemon runs as ``python -m`` in this process's directory, which Python would put ahead
    # of PYTHONPATH: run from a worktree, both rounds ran that tree's code.
    os.environ["PYTHONSAFEPATH"] = "1"
    trees = {"this tree": HERE}
    if args.against is not None:
        trees["other tree"] = args.against.resolve()
    figures: dict[str, dict[str, list[float]]] = {n: {"tunnel connected": [], "connected": []} for n in trees}
    with Lab.up(servers=2) as lab:
        daemon = LabDaemon(lab)
        for _ in range(args.rounds):
            for name, tree in trees.items():
                os.environ["PYTHONPATH"] = str(tree)
                lines = len(daemon.log_events()) if (lab.dir / daemon.log_name).exists() else 0
                began = time.time()
                daemon.start(wait_for="connected", timeout=30)
                for what, values in figures[name].items():
                    stamp = stamp_of(daemon, lines, what)
                    values.append(stamp - began if stamp is not None else float("nan"))
                daemon.stop()
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}: the machine may be shared")
    for name, tree in trees.items():
        parts = [
            f"{what} after median {1000 * statistics.median(v):.0f} ms (min {1000 * min(v):.0f} ms)"
            for what, v in figures[name].items()
        ]
        print(f"{name} ({tree}), {args.rounds} starts: " + "; ".join(parts))


if __name__ == "__main__":
    main()
