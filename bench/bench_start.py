"""From ``tunlock run`` starting to the tunnel carrying traffic, read from the daemon's own log
(run as root; in the lab, never on this machine itself).

Each round starts the daemon in one lab with the lock already in place (as at boot after the
early-boot unit) and no tunnel, and reads the wall-clock stamps of its log: ``tunnel connected``
(the peer set and the routes in place: the first packet can go; by the daemon, or before it by
``tunlock run``'s early bring-up, which logs that moment as ``up_at``) and the first ``connected``
state (the server answered a probe), each counted from just before the process was spawned; and
``lock in force``, when the daemon's own lock (with its owned twin) is installed: the guard logs
where its egress chain holds right after that transaction, and watches from a listing and a
subscription later (~2 ms). Until then only the boot lock holds, and nothing puts it back if
another program removes it. (Before 2026-12-06 this read the owned twin's context being opened,
which comes before the transaction: ~15 ms early.)
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
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from supervisor.lab.daemon import LabDaemon
from supervisor.lab.topology import Lab

HERE = Path(__file__).resolve().parent.parent
# supervisor/early_tunnel.py: the tunnel brought up before the daemon, with the moment it was.
EARLY = "tunnel up ahead of the daemon, which adopts it"
# supervisor/lock/guard.py: logged right after the daemon's first lock transaction, either way.
LOCK_APPLIED = (
    "the lock's egress chain holds every frame leaving",
    "no physical uplink found for the lock's egress chain (lock.uplinks names them)",
)


def stamp_of(daemon: LabDaemon, after: int, what: str) -> float | None:
    """The wall time of the first log record after line ``after`` matching ``what``."""
    for line in daemon.log_events()[after:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if what == "tunnel connected" and record.get("event") == "tunnel connected":
            return datetime.fromisoformat(record["timestamp"]).timestamp()
        if what == "tunnel connected" and record.get("event") == EARLY:
            return float(record["up_at"])  # logged once the daemon's logging is set up
        if what == "connected" and record.get("event") == "state" and record.get("state") == "connected":
            return datetime.fromisoformat(record["timestamp"]).timestamp()
        if what == "lock in force" and record.get("event") in LOCK_APPLIED:
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
    figures: dict[str, dict[str, list[float]]] = {
        n: {"tunnel connected": [], "connected": [], "lock in force": []} for n in trees
    }
    with Lab.up(servers=2) as lab:
        # The early-boot unit's file, so that the first round starts as the others (after a daemon
        # stopped, the lock stays).
        exported = lab.dir / "boot-lock.nft"
        export = [sys.executable, "-m", "supervisor.cli", "lock", "export", "--config", str(lab.config_path)]
        exported.write_text(subprocess.run(export, check=True, capture_output=True, text=True).stdout)
        lab.run("client", "nft", "-f", str(exported))
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
