"""The soak: the daemon in the lab for N minutes under a random fault every few seconds.

Every fault the lab has is drawn in random order (seeded, so a run can be replayed; each kind once
before any kind comes again): a silent server, a
killed server, a killed wireguard-go, a pulled cable, a deleted default route, another tool's
``nft flush ruleset``, SIGHUP, SIGKILL of the daemon and a new start, rotate, reconnect, and
periods of 20 % loss each way. Every probe kind (supervisor.lab.probes) is sent throughout, from a
thread of its own, and the ISP's observer counts what leaked. After each fault the soak waits
until the daemon reports ``connected`` and a ping through the tunnel is answered: the longest gap
between answered pings (10 per second) is that fault's outage; no answer within the recovery limit
is a failure to recover.

It reports per fault kind: count, leaked packets, outage (median and max), failures to recover; and
the daemon's RSS, open file descriptors, threads and CPU after every fault (``samples``), since
growth over a long run is a defect as much as a leak is. ``tunlock lab soak`` and ``bench/soak``
run it; ``tests/lab/test_soak.py`` runs three minutes of it in CI.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import ContinuousPing, Observer, Probes
from supervisor.lab.topology import Lab
from supervisor.safety import LAB_ONLY_ENV

RECOVERY_LIMIT_S = 30.0
PING_INTERVAL_S = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Growth in open descriptors of one daemon process, past its warm-up, that fails a soak: a few
# come and go with in-flight work (a control connection, a resolvectl pipe), a leak only grows.
FD_GROWTH_LIMIT = 8
WARM_UP_SAMPLES = 3
# Every fault the lab has, as the soak names them (a method ``_<name>`` of Soak each).
FAULT_KINDS = (
    "silent-server",
    "killed-server",
    "killed-wg-go",
    "link-flap",
    "route-deleted",
    "ruleset-flush",
    "sighup",
    "sigkill-restart",
    "rotate",
    "reconnect",
    "loss-20",
)


@dataclass
class FaultResult:
    kind: str
    started_s: float  # since the soak began
    outage_s: float | None  # the longest gap between answered pings; None: did not recover
    recovery_s: float | None  # from the fault's end (cable back, loss cleared...) to the next answer
    leaks: int
    server_before: str | None
    server_after: str | None
    note: str = ""


@dataclass
class Sample:
    at_s: float
    pid: int
    rss_mb: float
    fds: int
    threads: int
    cpu_s: float


@dataclass
class SoakReport:
    seed: int
    minutes: float
    results: list[FaultResult] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    probe_rounds: int = 0
    leaks_total: int = 0

    def by_kind(self) -> dict[str, list[FaultResult]]:
        kinds: dict[str, list[FaultResult]] = {}
        for r in self.results:
            kinds.setdefault(r.kind, []).append(r)
        return dict(sorted(kinds.items()))

    @property
    def failures(self) -> list[FaultResult]:
        return [r for r in self.results if r.outage_s is None]

    def fd_growth(self) -> dict[int, int]:
        """Descriptors gained past warm-up, per daemon process that lived long enough to tell."""
        per_pid: dict[int, list[int]] = {}
        for s in self.samples:
            per_pid.setdefault(s.pid, []).append(s.fds)
        return {
            pid: fds[-1] - int(statistics.median(fds[:WARM_UP_SAMPLES]))
            for pid, fds in per_pid.items()
            if len(fds) > 2 * WARM_UP_SAMPLES
        }

    def problems(self) -> list[str]:
        found = []
        if self.leaks_total:
            found.append(f"{self.leaks_total} packets leaked")
        found += [f"{r.kind} at {r.started_s:.0f} s did not recover ({r.note})" for r in self.failures]
        found += [
            f"daemon pid {pid} gained {grown} file descriptors past warm-up"
            for pid, grown in self.fd_growth().items()
            if grown > FD_GROWTH_LIMIT
        ]
        return found

    def table(self) -> str:
        lines = [
            f"soak: {self.minutes:g} min, seed {self.seed}, {len(self.results)} faults, "
            f"{self.probe_rounds} rounds of every probe kind, {self.leaks_total} leaked packets",
            f"{'fault':<16} {'count':>5} {'leaks':>5} {'outage median/max':>18} "
            f"{'recovery median/max':>20} {'failed':>6}",
        ]

        def spread(values: list[float]) -> str:
            return f"{statistics.median(values):.2f}/{max(values):.2f} s" if values else "-"

        for kind, results in self.by_kind().items():
            outages = [r.outage_s for r in results if r.outage_s is not None]
            recoveries = [r.recovery_s for r in results if r.recovery_s is not None]
            lines.append(
                f"{kind:<16} {len(results):>5} {sum(r.leaks for r in results):>5} {spread(outages):>18} "
                f"{spread(recoveries):>20} {sum(r.outage_s is None for r in results):>6}"
            )
        if self.samples:
            first, last = self.samples[0], self.samples[-1]
            lines.append(
                f"daemon: RSS {first.rss_mb:.1f} -> {last.rss_mb:.1f} MB (max "
                f"{max(s.rss_mb for s in self.samples):.1f}), fds {first.fds} -> {last.fds}, "
                f"threads {first.threads} -> {last.threads}; fd growth past warm-up per process: "
                f"{self.fd_growth() or 'n/a'}"
            )
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


def _proc_sample(pid: int, at_s: float) -> Sample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Sample(
        at_s=at_s,
        pid=pid,
        rss_mb=int(fields["VmRSS"].split()[0]) / 1024,
        fds=fds,
        threads=int(fields["Threads"]),
        cpu_s=(int(stat[11]) + int(stat[12])) / CLOCK_TICKS,
    )


class _ProbeLoop:
    """Every probe kind, again and again, from a thread, until stopped."""

    def __init__(self, probes: Probes) -> None:
        self.probes = probes
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-probes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probes.every_kind()
            self.rounds += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


class Soak:
    """One soak over one lab and one daemon (started, killed and started again as faults say)."""

    def __init__(self, lab: Lab, minutes: float, seed: int, say: Callable[[str], None]) -> None:
        self.lab = lab
        self.minutes = minutes
        self.rng = random.Random(seed)
        self.say = say
        self.report = SoakReport(seed=seed, minutes=minutes)
        self.observer = Observer.start(lab)
        self.probes = Probes(lab)
        # A short cooldown: with three servers and a fault every few seconds, servers failed by
        # earlier faults must become eligible again for the soak to measure failovers, not backoff.
        self.daemon = LabDaemon(lab, env={"TUNLOCK_ROTATION_COOLDOWN_S": "5"}, config=None)
        self.began = 0.0
        self._deck: list[str] = []
        self.faults: dict[str, Callable[[], str]] = {
            kind: getattr(self, "_" + kind.replace("-", "_")) for kind in FAULT_KINDS
        }

    # --- the faults: each returns a note; the soak then waits for recovery -----------------

    def _current_index(self) -> str:
        status = self.daemon.status() or {}
        return str(status.get("server") or "vpn1").removeprefix("vpn")

    def _silent_server(self) -> str:
        index = self._current_index()
        faults.blackhole_server(self.lab, index)
        self._restore_later.append(lambda: faults.restore_server(self.lab, index))
        return f"vpn{index} silent"

    def _killed_server(self) -> str:
        index = self._current_index()
        faults.kill_server(self.lab, index)
        self._restore_later.append(lambda: faults.restart_server(self.lab, index))
        return f"vpn{index} killed"

    def _killed_wg_go(self) -> str:
        return faults.kill_client_wireguard_go(self.lab)

    def _link_flap(self) -> str:
        faults.link_down(self.lab)
        time.sleep(self.rng.uniform(0.3, 2.0))
        faults.link_up(self.lab)
        return "link down and up"

    def _route_deleted(self) -> str:
        faults.delete_default_route(self.lab)
        time.sleep(self.rng.uniform(0.3, 2.0))
        faults.restore_default_route(self.lab)
        return "default routes deleted and restored"

    def _ruleset_flush(self) -> str:
        return faults.flush_client_ruleset(self.lab)

    def _sighup(self) -> str:
        os.kill(self.daemon.pid, signal.SIGHUP)
        return "SIGHUP"

    def _sigkill_restart(self) -> str:
        self.daemon.kill()
        self.daemon.start(wait_for=None)
        return "SIGKILL, started again"

    def _rotate(self) -> str:
        self.daemon.ask("rotate")
        return "rotate"

    def _reconnect(self) -> str:
        self.daemon.ask("reconnect")
        return "reconnect"

    def _loss_20(self) -> str:
        faults.loss(self.lab, "20")
        time.sleep(self.rng.uniform(3.0, 8.0))
        faults.clear_loss(self.lab)
        return "20 % loss each way for a few seconds"

    # --- the loop ---------------------------------------------------------------------------

    def _recovered(self, deadline: float) -> float | None:
        """When (wall clock) the daemon was connected and a ping through it answered, if before
        ``deadline`` (monotonic)."""
        while time.monotonic() < deadline:
            status = self.daemon.status()
            if status and status["state"] == "connected" and self.probes.ping():
                return time.time()
            time.sleep(0.05)
        return None

    def _sample(self) -> None:
        if self.daemon.process is not None:
            sample = _proc_sample(self.daemon.pid, time.monotonic() - self.began)
            if sample:
                self.report.samples.append(sample)

    def run(self) -> SoakReport:
        self.daemon.start()
        self.began = time.monotonic()
        end = self.began + self.minutes * 60
        loop = _ProbeLoop(self.probes)
        try:
            while time.monotonic() < end:
                self._one_fault()
                time.sleep(self.rng.uniform(1.0, 3.0))
        finally:
            loop.stop()
            self.report.probe_rounds = loop.rounds
            self.report.leaks_total = len(self.observer.leaks())
            self.daemon.stop()
        return self.report

    def _one_fault(self) -> None:
        # Drawn from a shuffled deck of every kind, so a short soak still meets each of them.
        if not self._deck:
            self._deck = sorted(self.faults)
            self.rng.shuffle(self._deck)
        kind = self._deck.pop()
        before = (self.daemon.status() or {}).get("server")
        self._restore_later: list[Callable[[], str]] = []
        mark = self.observer.mark()
        pinger = ContinuousPing(self.lab, interval=PING_INTERVAL_S)
        started = time.monotonic()
        try:
            note = self.faults[kind]()
            fault_ended = time.time()
            recovered_at = self._recovered(time.monotonic() + RECOVERY_LIMIT_S)
        finally:
            record = pinger.stop()
            for restore in self._restore_later:
                restore()
        leaks = len(self.observer.leaks(since=mark))
        after = (self.daemon.status() or {}).get("server")
        recovered = recovered_at is not None
        recovery = None
        if recovered_at is not None:
            # The background ping answers first, unless the check's own ping was quicker.
            answer = record.first_answer_after(fault_ended)
            recovery = max(0.0, recovered_at - fault_ended)
            recovery = min(answer, recovery) if answer is not None else recovery
        result = FaultResult(
            kind=kind,
            started_s=started - self.began,
            outage_s=record.longest_outage_s if recovered else None,
            recovery_s=recovery,
            leaks=leaks,
            server_before=before,
            server_after=after,
            note=note if recovered else f"{note}; last status {self.daemon.status()}",
        )
        self.report.results.append(result)
        self._sample()
        outage = f"{result.outage_s:.2f} s" if result.outage_s is not None else "NOT RECOVERED"
        self.say(
            f"[{result.started_s:7.1f} s] {kind:<16} {before} -> {after}: outage {outage}, "
            f"{leaks} leaked ({note})"
        )
        if result.outage_s is None:
            self.say(self.daemon.log_tail(40))


def run_soak(minutes: float, seed: int | None = None, say: Callable[[str], None] = print) -> SoakReport:
    """Build a lab, soak the daemon in it for ``minutes``, tear it down, return the report."""
    os.environ[LAB_ONLY_ENV] = "1"
    seed = seed if seed is not None else random.randrange(2**32)
    with Lab.up(servers=3) as lab:
        say(f"lab {lab.id} up; soaking for {minutes:g} min with seed {seed}")
        return Soak(lab, minutes, seed, say).run()
