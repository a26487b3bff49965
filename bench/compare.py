"""tunlock side by side with what a headless user runs today, in the same lab, scenario by scenario.

The baseline (bench/baseline/wg-quick-watchdog): wg-quick with the kill switch recipe of
wg-quick(8) and a watchdog that moves to the next server file once the latest handshake is older
than 135 s. tunlock: the daemon, with its boot lock loaded first (``tunlock lock export`` as the
early-boot unit loads it) where the scenario is a start.

Every repetition builds a fresh lab (0.2 s), starts the system, sends every probe kind in a loop
from a thread (the ISP's observer counts leaks) and pings the tunnel's far end (10.99.0.1, only
reachable through a tunnel) ten times a second. A scenario's outage is the longest gap between
answered pings from the fault on; its leaks are what the observer saw from the start of the
repetition to its end. ``boot-start`` pings a hundred times a second instead: both systems answer
within the first tenth of a second, where ten pings a second read only the ping interval, so its
outage is the time from the start to the first answer, to ~10 ms.

    .venv/bin/python bench/compare.py [--reps 5] [--scenarios a,b] [--json docs/figures/compare.json]

The baseline's silent and killed server take ~140 s a repetition (the 135 s threshold): the whole
run with 5 repetitions is about half an hour.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import ContinuousPing, Observer, Probes
from supervisor.lab.soak import _ProbeLoop
from supervisor.lab.topology import TUNNEL_SERVER_V4, Lab, LabError
from supervisor.safety import LAB_ONLY_ENV

WATCHDOG = Path(__file__).resolve().parent / "baseline" / "wg-quick-watchdog"
PING_INTERVAL_S = 0.1
BOOT_PING_INTERVAL_S = 0.01


class System:
    """What a scenario drives: tunlock or the baseline, in one lab."""

    name = ""
    recovery_limit_s = 60.0

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def start(self) -> None: ...

    def crash_and_restart(self) -> None: ...

    def stop(self) -> None: ...

    def server_index(self) -> str: ...

    def boot_lock(self) -> None:
        """What the system puts in place before the network comes up (nothing, for most)."""


class Tunlock(System):
    name = "tunlock"

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.daemon = LabDaemon(lab)

    def boot_lock(self) -> None:
        exported = self.lab.dir / "boot-lock.nft"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "supervisor.cli",
                "lock",
                "export",
                "--config",
                str(self.lab.config_path),
                "-o",
                str(exported),
            ],
            check=True,
            capture_output=True,
        )
        self.lab.run("client", "nft", "-f", str(exported))

    def start(self) -> None:
        self.daemon.start(wait_for=None)

    def crash_and_restart(self) -> None:
        self.daemon.kill()
        self.daemon.start(wait_for=None)

    def stop(self) -> None:
        self.daemon.stop()

    def server_index(self) -> str:
        status = self.daemon.wait_for(lambda s: s["state"] == "connected", 30, "connected")
        return str(status["server"]).removeprefix("vpn")


class WgQuick(System):
    name = "wg-quick"
    recovery_limit_s = 300.0

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.ifname = f"tq{lab.id}"
        self.workdir = lab.dir / "wg-quick"
        self.workdir.mkdir(exist_ok=True)
        self.servers = sorted(str(p) for p in (lab.dir / "servers").glob("*.conf"))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = self.lab.spawn(
            "client", [str(WATCHDOG), self.ifname, str(self.workdir), *self.servers], log="wg-quick.log"
        )

    def crash_and_restart(self) -> None:
        # As systemd would after the watchdog died: the same unit started again.
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(5)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def server_index(self) -> str:
        ups = [
            line.split()[-1]
            for line in (self.lab.dir / "wg-quick.log").read_text().splitlines()
            if " up " in line
        ]
        return ups[-1].removeprefix("vpn").removesuffix(".conf") if ups else "1"


@dataclass
class Outcome:
    scenario: str
    system: str
    rep: int
    outage_s: float | None  # None: no answer through the tunnel within the system's limit
    leaks: int
    leak_kinds: list[str]


def _wait_tunnel(probes: Probes, limit: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < limit:
        try:
            if probes.ping(TUNNEL_SERVER_V4):
                return time.monotonic() - began
        except (LabError, subprocess.TimeoutExpired):
            pass  # a ping that could not even run (a loaded machine) is an unanswered one
        time.sleep(0.1)
    return None


def _outage_after(record_answers: tuple[float, ...], moment: float, ended: float) -> float:
    """The longest gap between answers from ``moment`` to ``ended`` (wall clock)."""
    points = [moment, *(t for t in record_answers if t > moment), ended]
    return max(b - a for a, b in itertools.pairwise(points))


def _fault_scenarios() -> dict[str, Callable[[Lab, System], None]]:
    def silent(lab: Lab, system: System) -> None:
        faults.blackhole_server(lab, system.server_index())

    def killed(lab: Lab, system: System) -> None:
        faults.kill_server(lab, system.server_index())

    def flap(lab: Lab, system: System) -> None:
        faults.link_down(lab)
        time.sleep(1.0)
        faults.link_up(lab)

    def crash(lab: Lab, system: System) -> None:
        system.crash_and_restart()

    def flush(lab: Lab, system: System) -> None:
        faults.flush_client_ruleset(lab)

    def probes_only(lab: Lab, system: System) -> None:
        time.sleep(5.0)  # every probe kind keeps running from the background thread

    return {
        "silent-server": silent,
        "killed-server": killed,
        "link-flap": flap,
        "supervisor-crash": crash,
        "ruleset-flush": flush,
        "dns-and-ipv6-probes": probes_only,
    }


SCENARIOS = [*_fault_scenarios(), "boot-start"]


def run_once(scenario: str, make: Callable[[Lab], System], rep: int) -> Outcome:
    with Lab.up(servers=3) as lab:
        observer, probes = Observer.start(lab), Probes(lab)
        system = make(lab)
        try:
            if scenario == "boot-start":
                mark = observer.mark()  # from before the system starts: a boot's first packets count
                system.boot_lock()
                loop = _ProbeLoop(probes)
                pinger = ContinuousPing(lab, TUNNEL_SERVER_V4, BOOT_PING_INTERVAL_S)
                moment = time.time()
                system.start()
                outage = _wait_tunnel(probes, system.recovery_limit_s)
                time.sleep(1.0)
            else:
                system.start()
                if _wait_tunnel(probes, 30) is None:
                    raise RuntimeError(f"{system.name} never connected")
                time.sleep(1.0)
                mark = observer.mark()  # from connected on: what the fault lets out
                loop = _ProbeLoop(probes)
                pinger = ContinuousPing(lab, TUNNEL_SERVER_V4, PING_INTERVAL_S)
                time.sleep(0.5)
                moment = time.time()
                _fault_scenarios()[scenario](lab, system)
                outage = _wait_tunnel(probes, system.recovery_limit_s)
                time.sleep(1.0)
            ended = time.time()
            record = pinger.stop()
            loop.stop()
            if outage is not None:
                outage = _outage_after(record.answered_at, moment, ended)
        finally:
            system.stop()
        leaked = observer.leaks(since=mark)
    return Outcome(scenario, system.name, rep, outage, len(leaked), sorted({e["kind"] for e in leaked}))


def summarise(outcomes: list[Outcome]) -> str:
    lines = [
        f"{'scenario':<22}{'system':<10}{'outage median [min-max]':>28}{'leaks median [max]':>20}"
        f"{'failed':>8}",
    ]
    for scenario in dict.fromkeys(o.scenario for o in outcomes):
        medians = {}
        for system in ("tunlock", "wg-quick"):
            mine = [o for o in outcomes if o.scenario == scenario and o.system == system]
            if not mine:
                continue
            outages = [o.outage_s for o in mine if o.outage_s is not None]
            leaks = [o.leaks for o in mine]
            medians[system] = statistics.median(outages) if outages else None
            spread = (
                f"{statistics.median(outages):.2f} s [{min(outages):.2f}-{max(outages):.2f}]"
                if outages
                else "-"
            )
            leak_spread = f"{statistics.median(leaks):g} [{max(leaks)}]"
            failed = sum(o.outage_s is None for o in mine)
            lines.append(f"{scenario:<22}{system:<10}{spread:>28}{leak_spread:>20}{failed:>8}")
        if medians.get("tunlock") and medians.get("wg-quick"):
            lines.append(f"{'':<22}{'ratio':<10}{medians['wg-quick'] / medians['tunlock']:>26.1f} x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--systems", default="tunlock,wg-quick")
    parser.add_argument("--json", type=Path, help="write every outcome here (docs/performance.md reads it)")
    args = parser.parse_args()
    os.environ[LAB_ONLY_ENV] = "1"
    makers: dict[str, Callable[[Lab], System]] = {"tunlock": Tunlock, "wg-quick": WgQuick}
    outcomes: list[Outcome] = []
    for scenario in args.scenarios.split(","):
        for rep in range(args.reps):
            # Both systems in the same minutes, alternating, so a busy moment hurts neither alone.
            for system in args.systems.split(","):
                outcome = run_once(scenario, makers[system], rep)
                outcomes.append(outcome)
                shown = f"{outcome.outage_s:.2f} s" if outcome.outage_s is not None else "no recovery"
                print(
                    f"  {scenario:<22}{system:<10} rep {rep + 1}: outage {shown}, {outcome.leaks} leaked "
                    f"{outcome.leak_kinds or ''}",
                    flush=True,
                )
    print(summarise(outcomes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))


if __name__ == "__main__":
    main()
