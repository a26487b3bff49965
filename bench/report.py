"""docs/performance.md and its plots, regenerated from the measurements' JSON.

    .venv/bin/python bench/report.py [--measure-timeline]   # the page from docs/figures/*.json
    bench/performance                                      # measure everything, then this

Inputs (docs/figures/): compare.json (bench/compare.py --json), soak.json (tunlock lab soak
--json), failover-timeline.json (``--measure-timeline`` records one failover in a lab). Outputs:
docs/figures/outage.png, failover-timeline.png, soak-resources.png, and docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from supervisor.lab.timeline import Timeline

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
SYSTEMS = ("tunlock", "wg-quick")
COLOURS = {"tunlock": "#2ca02c", "wg-quick": "#1f77b4"}


# Figures measured for issue #27 with the benches of that issue (not redrawn from docs/figures).
ISSUE_27 = (
    "Issue #27 (lean and event-driven), measured alternating with the code before its second part "
    "(commit 6e4c3e9; the wake-up against the code before the issue), on the same 2-core machine. "
    "**Idle:** once the traffic watch listens, an idle tunnel is sampled only when its idle probe is "
    "due, so the idle daemon used 0.05 % of a core in two 240 s rounds (the code before: 0.10 % and "
    "0.12 %), 0.06 % with the metrics endpoint on (0.10 %). **Memory:** RSS 38.7 MB with the default "
    "configuration (49.7 MB before), 42.7 MB with the metrics endpoint on (52.0 MB): the "
    "configuration is validated with msgspec instead of pydantic, the plugin host, namespace mode, "
    "the kernel backend and the control client load only when configured, and the lock guard keeps "
    "no `nft monitor` or `ip monitor` child (9.3 MB of the 62.2 MB the supervision took when the "
    "issue was filed). **Wake-up:** traffic that starts after an idle spell wakes the daemon at its "
    "first packet, so a server that fell silent meanwhile is answered via the next one 1.25 s after "
    "the traffic starts (2.83 s before) and 1.45 s after the fault when the traffic started 0.3 s "
    "before it (3.06 s before), against 1.51 s with traffic flowing; 0 false failovers at 20 % and "
    "30 % loss both ways (240 s each). **Start:** process start to the tunnel's routes in place "
    "232-254 ms (361-366 ms before), to the first answer 268-293 ms (400-404 ms), of which importing "
    "the run path is 180 ms and 33.6 MB (274 ms, 44.2 MB; bench/bench_imports.py, bytecode compiled "
    "as an installed package has it); the first connect writes the lock once instead of twice. "
    "**Start at boot, third and fourth parts** (against commit a6f804c): with the lock already in "
    "the kernel, `tunlock run` brings the tunnel up with the standard library and two `ip -batch` "
    "runs rendered from the daemon's own routing plan before the daemon loads, sends one probe "
    "through it so that its handshake is done, and the daemon adopts it, its own lock first: the "
    "tunnel's routes are in 84 ms after the process starts (270 ms before; bench/bench_start.py, 10 "
    "starts each, alternating), the first `connected` 255 ms (310 ms), and the daemon's own lock "
    "is in force at 200 ms (220 ms: the adopted tunnel's route check and resolvers wait for the "
    "lock, the lock's apply reads the links with four `ip` runs side by side, and the run path's "
    "records are msgspec Structs, which cut its import from 132 to 112 ms). compare.py's "
    "boot-start, re-measured with pings every 10 ms so that it reads the first answer rather than "
    "the ping interval, both systems side by side in fresh labs, 10 rounds: tunlock 0.09 s "
    "[0.08-0.12] against wg-quick 0.10 s [0.09-0.12] (0.30 s against 0.10 s before the early "
    "start). **Idle, fourth part:** the tunnel gets no IPv6 link-local address, whose router "
    "solicitations went through the tunnel for good and woke the idle daemon, and an answered idle "
    "probe goes back to sleep at once (two samples per idle probe instead of three): 0.04 % and "
    "0.04 % of a core against 0.05 % and 0.05 % (240 s rounds, default configuration, alternating "
    "with a6f804c), RSS 38.4 and 38.6 MB against 38.8 MB. **Memory with metrics on, third part:** "
    "the scrape is "
    "served as OpenMetrics from prometheus_client's submodules without its package initialiser "
    "(the classic text format, with the HTTP modules it pulls in, only for a client that asks for "
    "it): 39.9 and 39.5 MB against 42.5 and 42.6 MB (bench_daemon.py --idle-only, 120 s rounds, "
    "alternating). docs/supervisor.md has the details."
)


def measure_timeline(path: Path) -> None:
    """One failover in a lab of its own: a silent server, pings through the tunnel every 20 ms."""
    from supervisor.lab import faults
    from supervisor.lab.daemon import LabDaemon
    from supervisor.lab.probes import ContinuousPing
    from supervisor.lab.topology import TUNNEL_SERVER_V4, Lab
    from supervisor.safety import LAB_ONLY_ENV

    os.environ[LAB_ONLY_ENV] = "1"
    with Lab.up(servers=3) as lab, LabDaemon(lab) as daemon:
        timeline = Timeline(began=time.time(), title="one failover: a silent server, pings every 20 ms")
        timeline.mark(time.time(), "tunlock run")
        current = daemon.start()["server"]
        pinger = ContinuousPing(lab, TUNNEL_SERVER_V4, interval=0.02)
        time.sleep(1.0)
        timeline.mark(time.time(), f"{current} silent")
        faults.blackhole_server(lab, current.removeprefix("vpn"))
        daemon.wait_for(lambda s: s["state"] == "connected" and s["server"] != current, 30, "failover")
        time.sleep(1.0)
        timeline.add_answers(pinger.stop().answered_at)
        daemon.stop()
        timeline.add_daemon_log(daemon.log_events())
    timeline.save(path)


def outage_plot(outcomes: list[dict], path: Path) -> None:
    scenarios = list(dict.fromkeys(o["scenario"] for o in outcomes))
    fig, axis = plt.subplots(figsize=(10, 3.8))
    width = 0.38
    for offset, system in zip((-width / 2, width / 2), SYSTEMS, strict=True):
        medians, low, high = [], [], []
        for scenario in scenarios:
            values = [
                o["outage_s"]
                for o in outcomes
                if o["scenario"] == scenario and o["system"] == system and o["outage_s"] is not None
            ]
            m = statistics.median(values) if values else float("nan")
            medians.append(m)
            low.append(m - min(values) if values else 0)
            high.append(max(values) - m if values else 0)
        xs = [i + offset for i in range(len(scenarios))]
        axis.bar(xs, medians, width, yerr=[low, high], capsize=3, label=system, color=COLOURS[system])
    axis.set_yscale("log")
    axis.set_ylabel("outage, s (median, min-max)")
    axis.set_xticks(range(len(scenarios)), scenarios, rotation=15, fontsize=8)
    axis.legend()
    axis.set_title("Longest gap in pings through the tunnel, per scenario", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def soak_plot(soak: dict, path: Path) -> None:
    samples = soak["samples"]
    fig, (rss, fds) = plt.subplots(1, 2, figsize=(10, 3.2))
    for pid in dict.fromkeys(s["pid"] for s in samples):
        mine = [s for s in samples if s["pid"] == pid]
        xs = [s["at_s"] / 60 for s in mine]
        rss.plot(xs, [s["rss_mb"] for s in mine], marker=".", lw=0.8)
        fds.plot(xs, [s["fds"] for s in mine], marker=".", lw=0.8)
    rss.set_ylabel("RSS, MB")
    fds.set_ylabel("open file descriptors")
    for axis in (rss, fds):
        axis.set_xlabel("minutes (one colour per daemon process: SIGKILL starts a new one)")
        axis.xaxis.label.set_fontsize(7)
    fig.suptitle(f"The daemon over a {soak['minutes']:g}-minute soak", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_table(outcomes: list[dict]) -> str:
    rows = [
        "| scenario | tunlock outage (median [min-max]) | wg-quick outage | outage ratio | "
        "tunlock leaks (total) | wg-quick leaks (total) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def cell(values: list[float]) -> str:
        if not values:
            return "no recovery"
        return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]"

    for scenario in dict.fromkeys(o["scenario"] for o in outcomes):
        outage, leaks = {}, {}
        for system in SYSTEMS:
            mine = [o for o in outcomes if o["scenario"] == scenario and o["system"] == system]
            outage[system] = [o["outage_s"] for o in mine if o["outage_s"] is not None]
            failed = sum(o["outage_s"] is None for o in mine)
            leaks[system] = f"{sum(o['leaks'] for o in mine)} in {len(mine)} runs" + (
                f", {failed} never recovered" if failed else ""
            )
        ratio = "-"
        if outage["tunlock"] and outage["wg-quick"]:
            ratio = f"{statistics.median(outage['wg-quick']) / statistics.median(outage['tunlock']):.1f} x"
        rows.append(
            f"| {scenario} | {cell(outage['tunlock'])} | {cell(outage['wg-quick'])} | {ratio} | "
            f"{leaks['tunlock']} | {leaks['wg-quick']} |"
        )
    return "\n".join(rows)


def soak_table(soak: dict) -> str:
    rows = ["| fault | count | leaks | outage median / max | recovery median / max | not recovered |"]
    rows.append("| --- | --- | --- | --- | --- | --- |")
    kinds: dict[str, list[dict]] = {}
    for r in soak["results"]:
        kinds.setdefault(r["kind"], []).append(r)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} / {max(values):.2f} s" if values else "-"

    for kind, results in sorted(kinds.items()):
        outages = [r["outage_s"] for r in results if r["outage_s"] is not None]
        recoveries = [r["recovery_s"] for r in results if r.get("recovery_s") is not None]
        rows.append(
            f"| {kind} | {len(results)} | {sum(r['leaks'] for r in results)} | {spread(outages)} | "
            f"{spread(recoveries)} | {sum(r['outage_s'] is None for r in results)} |"
        )
    samples = soak["samples"]
    if samples:
        rows.append("")
        rows.append(
            f"Daemon over the soak: RSS {samples[0]['rss_mb']:.1f} MB at the first fault, "
            f"{samples[-1]['rss_mb']:.1f} MB at the last (max {max(s['rss_mb'] for s in samples):.1f}); "
            f"open descriptors {samples[0]['fds']} -> {samples[-1]['fds']}; threads "
            f"{samples[0]['threads']} -> {samples[-1]['threads']}. {soak['probe_rounds']} rounds of every "
            f"probe kind, {soak['leaks_total']} leaked packets in all (seed {soak['seed']})."
        )
    return "\n".join(rows)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    wg_go = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True).stdout.strip()
    wg_go = wg_go.splitlines()[0].split(" for ")[0] if wg_go else ""
    return (
        f"{os.cpu_count()} vCPU ({cpu}), {memory} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {wg_go or 'wireguard-go'} (userspace WireGuard: this "
        "kernel has no WireGuard module)"
    )


def _head() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "unknown"


def measured(fresh: bool) -> str:
    """When and where the figures were taken: now, after a measurement (``fresh``), else what the
    page said, so that redrawing it (a new paragraph, a plot's style) keeps the date and commit of
    the figures it shows."""
    page = ROOT / "docs" / "performance.md"
    if not fresh and page.exists():
        for line in page.read_text().splitlines():
            if line.startswith("Measured ") and ", commit " in line:
                return line.split(". Every figure", 1)[0]
    return (
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()}, "
        f"commit {os.environ.get('MEASURED_COMMIT') or _head()}"
    )


def write_page(compare: list[dict] | None, soak: dict | None, timeline: bool, fresh: bool) -> str:
    parts = [
        "# Performance: tunlock side by side with what users run today",
        "",
        "<!-- Generated by bench/report.py from docs/figures/*.json; edit that script, not this page. -->",
        "",
        f"{measured(fresh)}. Every figure comes from the lab "
        "(docs/lab.md): real wireguard-go servers and tunnels, a real ISP router, and an observer on "
        "the ISP's side that counts every packet from the client that is not WireGuard to a server.",
        "",
        "## Rerun",
        "",
        "    bench/performance                 # everything: ~30 min comparison + a soak (default 30 min)",
        "    SOAK_MINUTES=3 bench/performance  # a shorter soak",
        "    .venv/bin/python bench/report.py  # only redraw this page from docs/figures/*.json",
        "",
    ]
    if compare:
        parts += [
            "## Side by side: tunlock and wg-quick's kill switch",
            "",
            "The baseline is what wg-quick(8) recommends to a headless user: its kill-switch recipe (a "
            "REJECT of everything not marked and not through the interface, IPv4 and IPv6, in "
            "PostUp/PreDown), and a watchdog that moves to the next server file once the latest "
            "handshake is older than 135 s, the threshold of wireguard-tools' `reresolve-dns.sh` "
            "(bench/baseline/wg-quick-watchdog). Each scenario runs both, alternating, in fresh labs; "
            "the outage is the longest gap between answered pings through the tunnel (10 per second) "
            "from the fault on, the leaks are what the observer saw while every probe kind ran in a "
            "loop. `boot-start` counts from before the system starts (tunlock with its early-boot "
            "lock loaded first, as `tunlock systemd install` sets it up); its outage is the time to "
            "the first answer through the tunnel.",
            "",
            comparison_table(compare),
            "",
            "![outage per scenario](figures/outage.png)",
            "",
        ]
    if timeline:
        parts += [
            "## One failover",
            "",
            "A server goes silent (blackholed at the ISP: no ICMP, no reset). The daemon sees tx grow "
            "without rx, probes, declares the server dead and swaps the peer on the same interface; "
            "the lock never opens (docs/supervisor.md, detection).",
            "",
            "![one failover's timeline](figures/failover-timeline.png)",
            "",
        ]
    if soak:
        parts += [
            f"## A {soak['minutes']:g}-minute soak",
            "",
            "`tunlock lab soak` (supervisor/lab/soak.py): a random fault every few seconds, every kind "
            "in turn from a shuffled deck, every probe kind throughout. Outage: the longest gap between "
            "answered pings from the fault on (it includes the time a fault holds: a cable stays out "
            "0.3-2 s); recovery: from the fault's end to the next answered ping. A 3-minute soak runs "
            "in CI (tests/lab/test_soak.py) and fails on any leak, any fault not recovered from, or "
            "descriptor growth.",
            "",
            soak_table(soak),
            "",
            "![RSS and descriptors over the soak](figures/soak-resources.png)",
            "",
        ]
    alone = FIGURES / "alone.txt"
    if alone.exists():
        parts += [
            "## tunlock alone",
            "",
            "What the benchmarks printed in the same session (bench/performance runs them): link event "
            "to `offline`, failover, false switches under loss, idle CPU and RSS, CPU with the tunnel "
            "saturated, peer swap, lock apply and throughput with and without the lock (paired runs), "
            "and `tunlock check` over 10,000 server files.",
            "",
            "```",
            alone.read_text().strip(),
            "```",
            "",
        ]
    parts += [
        "## Other figures",
        "",
        "Per-part figures live with their parts: docs/lock.md (apply, swap, throughput), "
        "docs/wireguard.md (peer swap, stats), docs/supervisor.md (detection, link events, idle CPU and "
        "RSS), docs/metrics.md (scrapes); the benchmarks that print them are in bench/.",
        "",
        ISSUE_27,
        "",
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-timeline", action="store_true", help="record one failover first")
    args = parser.parse_args()
    FIGURES.mkdir(parents=True, exist_ok=True)
    if args.measure_timeline:
        measure_timeline(FIGURES / "failover-timeline.json")
    compare = soak = None
    if (FIGURES / "compare.json").exists():
        compare = json.loads((FIGURES / "compare.json").read_text())
        outage_plot(compare, FIGURES / "outage.png")
    if (FIGURES / "soak.json").exists():
        soak = json.loads((FIGURES / "soak.json").read_text())
        soak_plot(soak, FIGURES / "soak-resources.png")
    timeline = (FIGURES / "failover-timeline.json").exists()
    if timeline:
        Timeline.load(FIGURES / "failover-timeline.json").plot(FIGURES / "failover-timeline.png")
    # bench/performance measures everything and then runs this with --measure-timeline: a fresh stamp.
    page = write_page(compare, soak, timeline, fresh=args.measure_timeline)
    (ROOT / "docs" / "performance.md").write_text(page)
    print(f"wrote docs/performance.md and its figures in {FIGURES}")


if __name__ == "__main__":
    main()
