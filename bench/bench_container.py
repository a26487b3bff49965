"""The sidecar's start: time to the lock and to connected, and what an app started with it leaks.

Run as root from the repository (it builds the image like tests/container/run):
    PYTHONPATH=. .venv/bin/python bench/bench_container.py [RUNS]

Each run builds a lab, creates the tunlock sidecar and an app container that shares its
namespace and probes from its first moment (tests/container/app.py), starts both in one
`podman start`, and waits until the app's traffic goes through the tunnel. Printed per start:
the lock in place after the container's start, connected, the app's first probe, and the leak
count the lab's observer saw. The same with a naive entrypoint for comparison, one that runs
`tunlock lock apply` (a Python start) before the daemon: the window that let gluetun's users'
apps leak at start. Timings are from one shared 2-vCPU machine: compare them, do not quote
them alone.
"""

from __future__ import annotations

import json
import statistics
import sys

from supervisor.lab.topology import Lab
from tests.container.test_sidecar import Pod
from tests.container.tier import Created, build_image, podman, wait_for
from tests.lab.conftest import LabUnderTest

NAIVE = ["--entrypoint", "sh", "--env", "TUNLOCK_LOCK_TABLE=tunlock"]
NAIVE_COMMAND = ("-c", "tunlock lock apply >&2 && echo 'tunlock-entrypoint: locked' >&2 && exec tunlock run")


def one_start(naive: bool) -> dict[str, float]:
    lab = LabUnderTest(Lab.up(servers=2))
    created = Created()
    try:
        pod = Pod(lab, created)
        mark = lab.observer.mark()
        if naive:
            pod.create_sidecar(*NAIVE, command=NAIVE_COMMAND)
        else:
            pod.create_sidecar()
        pod.create_app()
        pod.start_both()
        # The daemon's word, not the app's answers: without the lock those come straight back.
        wait_for("connected", lambda: pod.log_time('"state": "connected"'), 90)
        wait_for("traffic through the tunnel", lambda: pod.through_tunnel_after(0), 90)
        started = int(pod.state(".State.StartedAt.UnixNano")) / 1e9
        app_started = json.loads(podman("logs", pod.app).splitlines()[0])["started"]
        locked = pod.log_time("tunlock-entrypoint: locked") or float("nan")
        connected = pod.log_time('"state": "connected"')
        return {
            "lock_ms": 1000 * (locked - started),
            "connected_s": connected - started,
            "app_first_s": app_started - started,
            "leaks": len(lab.observer.leaks(since=mark)),
        }
    finally:
        created.remove()
        lab.lab.down()


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    print(f"image: {build_image()}")
    for label, naive in (
        ("tunlock-entrypoint (nft first)", False),
        ("naive (tunlock lock apply first)", True),
    ):
        results = [one_start(naive) for _ in range(runs)]
        for r in results:
            print(
                f"{label:34} lock {r['lock_ms']:6.0f} ms  connected {r['connected_s']:5.2f} s  "
                f"app's first probe {r['app_first_s']:5.2f} s  leaks {r['leaks']}"
            )
        print(
            f"{label:34} median: lock {statistics.median(r['lock_ms'] for r in results):.0f} ms, "
            f"connected {statistics.median(r['connected_s'] for r in results):.2f} s, "
            f"leaks {[r['leaks'] for r in results]}"
        )


if __name__ == "__main__":
    main()
