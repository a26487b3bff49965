"""What ``tunlock run`` costs before it does anything: the time and memory of its imports.

Each round starts a fresh interpreter that imports what the ``run`` command imports (the CLI,
the daemon, the log) and exits; the figures are the wall time of that process and its peak RSS,
median over the rounds, plus the heaviest top-level packages as ``python -X importtime`` counts
them (cumulative microseconds, first round). ``--against DIR`` runs the same rounds, alternating,
with the code in DIR (an exported tree of another commit) for a before/after.

    .venv/bin/python bench/bench_imports.py [--rounds 10] [--against /path/to/other/tree]

No root needed; nothing touches the network.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# As ``tunlock run`` does it: the light pyroute2 and prometheus_client packages first
# (supervisor/lean_packages.py), then the imports; the plugin host and the other configured-only
# parts are not on it (no plugin).
# (A tree from before supervisor/lean_packages.py has supervisor/lean_pyroute2.py, for --against.)
RUN_PATH = (
    "try:\n"
    "    from supervisor import lean_packages; lean_packages.install_all()\n"
    "except ImportError:\n"
    "    from supervisor import lean_pyroute2; lean_pyroute2.install()\n"
    "import supervisor.cli, supervisor.daemon, supervisor.log"
)
HERE = Path(__file__).resolve().parent.parent


def importtime_report(tree: Path) -> str:
    """``python -X importtime``'s report for one import of the run path."""
    argv = [sys.executable, "-X", "importtime", "-c", RUN_PATH]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=True).stderr


def peak_rss(tree: Path) -> float:
    """The peak RSS of one import of the run path, in MB (a child of its own, measured in it)."""
    code = f"{RUN_PATH}\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1]) / 1024


def heaviest(report: str, count: int = 10) -> list[tuple[str, int]]:
    """Packages by cumulative import time (microseconds): each third-party package's root
    module, and each of supervisor's modules one level down (where the first import of a
    package is counted, its cost includes what it imported first)."""
    found: dict[str, int] = {}
    for line in report.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].strip()
        root = name.split(".")[0]
        if (name == root and root != "supervisor") or (name.count(".") == 1 and root == "supervisor"):
            found[name] = max(found.get(name, 0), int(parts[1]))
    return sorted(found.items(), key=lambda item: -item[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--against", type=Path, help="another tree to compare with, alternating")
    args = parser.parse_args()
    trees = {"this tree": HERE}
    if args.against is not None:
        trees["other tree"] = args.against.resolve()
    times: dict[str, list[float]] = {name: [] for name in trees}
    rss: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            began = time.perf_counter()
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run([sys.executable, "-c", RUN_PATH], env=env, cwd=tree, check=True)
            times[name].append(time.perf_counter() - began)
            rss[name].append(peak_rss(tree))
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}: the machine may be shared")
    for name, tree in trees.items():
        took = statistics.median(times[name])
        print(
            f"{name} ({tree}): importing the run path takes median {1000 * took:.0f} ms "
            f"(min {1000 * min(times[name]):.0f} ms), peak RSS median {statistics.median(rss[name]):.1f} MB, "
            f"over {args.rounds} rounds"
        )
        report = importtime_report(tree)
        print(
            "  heaviest imports (cumulative): "
            + ", ".join(f"{n} {us / 1000:.0f} ms" for n, us in heaviest(report))
        )


if __name__ == "__main__":
    main()
