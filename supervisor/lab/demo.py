"""``tunlock demo``: the daemon in the lab, faults injected, a timeline and the leak count.

Everything runs in lab namespaces that the demo builds and removes; the machine's own namespace
is never touched. The ISP's observer counts every packet the client sends outside WireGuard to
an endpoint: many without the lock, none once the daemon has put it in place, whatever happens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import ContinuousPing, Observer, Probes
from supervisor.lab.timeline import Timeline
from supervisor.lab.topology import INTERNET_V4, TUNNEL_SERVER_V4, Lab
from supervisor.safety import LAB_ONLY_ENV

Mark = Callable[[str], None]
DEMO_TITLE = "tunlock demo: the daemon's states, pings through the tunnel"


def run_demo(echo: Callable[[str], None] = print, png: Path | None = None) -> int:
    """Run the demo; return the leak count with the daemon in charge (0 is the promise).

    With ``png``, also draw the daemon's part as a timeline there (states, answered pings, faults).
    """
    os.environ[LAB_ONLY_ENV] = "1"
    start = time.monotonic()

    def say(text: str) -> None:
        echo(f"[{time.monotonic() - start:6.2f} s] {text}")

    with Lab.up(servers=3) as lab:
        say(f"lab {lab.id} up: client, isp (observer), internet, 3 WireGuard servers")
        observer, probes = Observer.start(lab), Probes(lab)

        mark = observer.mark()
        answered = sum(probes.every_kind().values())
        open_leaks = len(observer.leaks(since=mark))
        say(f"no lock: {answered} of 11 probe kinds answered; the ISP saw {open_leaks} leaked packets")

        mark = observer.mark()
        timeline = Timeline(
            began=time.time(), title="tunlock demo: the daemon's states, pings through the tunnel"
        )

        def mark_fault(what: str) -> None:
            timeline.mark(time.time(), what)

        with LabDaemon(lab) as daemon:
            began = time.monotonic()
            mark_fault("tunlock run")
            status = daemon.start()
            assert status is not None  # start() waited for "connected"
            # Started once the lock is in place: before it, a ping would itself be a leak.
            tunnel_pings = ContinuousPing(lab, TUNNEL_SERVER_V4, interval=0.05)
            internet = probes.ping(INTERNET_V4) and probes.tcp(INTERNET_V4) and probes.dns_udp("10.99.0.1")
            say(
                f"tunlock run: connected to {status['server']} in {time.monotonic() - began:.2f} s; "
                f"internet through the tunnel {'works' if internet else 'FAILS'}, ISP resolver "
                f"{'ANSWERS' if probes.dns_udp('192.0.2.1') else 'blocked'}"
            )
            _failover(lab, daemon, say, mark_fault)
            _offline(lab, daemon, say, mark_fault)
            _backend_killed(lab, daemon, say, mark_fault)
            _flushed(lab, daemon, say, mark_fault)
            _restarted(lab, daemon, say, mark_fault)
            mark_fault("SIGTERM")
            stopped = daemon.stop()
            timeline.add_daemon_log(daemon.log_events())
        timeline.add_answers(tunnel_pings.stop().answered_at)
        after_stop = probes.ping(INTERNET_V4)
        say(
            f"SIGTERM: daemon exited {stopped}; tunnel down, lock kept: internet "
            f"{'REACHABLE' if after_stop else 'unreachable'}"
        )
        observer.sync()
        leaks = len(observer.leaks(since=mark))
    if png is not None:
        _draw(timeline, png, say)
    say(f"lab removed. Leaked packets with the lock in place: {leaks}")
    return leaks


def _draw(timeline: Timeline, png: Path, say: Callable[[str], None]) -> None:
    try:
        timeline.plot(png)
    except ImportError:
        say(f"no timeline picture: matplotlib is not installed (pip install 'tunlock[plots]'); not {png}")
        return
    say(f"timeline drawn: {png.resolve()}")


def _failover(lab: Lab, daemon: LabDaemon, say: Callable[[str], None], mark: Mark) -> None:
    before = daemon.status()
    assert before is not None
    current = before["server"]
    pinger = ContinuousPing(lab, interval=0.01)
    time.sleep(0.3)
    mark(f"{current} silent")
    faults.blackhole_server(lab, current.removeprefix("vpn"))
    status = daemon.wait_for(lambda s: s["state"] == "connected" and s["server"] != current, 30, "failover")
    time.sleep(0.2)
    record = pinger.stop()
    say(
        f"{current} blackholed (silent): failed over to {status['server']}; pings answered again after "
        f"{record.longest_outage_s:.2f} s ({status['last_failure']['reason']})"
    )
    faults.restore_server(lab, current.removeprefix("vpn"))


def _offline(lab: Lab, daemon: LabDaemon, say: Callable[[str], None], mark: Mark) -> None:
    began = time.monotonic()
    mark("cable pulled")
    faults.link_down(lab)
    daemon.wait_for(lambda s: s["state"] == "offline", 5, "offline")
    seen = time.monotonic() - began
    time.sleep(1)
    mark("cable back")
    faults.link_up(lab)
    status = daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected")
    say(
        f"cable pulled: offline within {seen * 1000:.0f} ms, nothing tried meanwhile; "
        f"plugged back: {status['server']} again"
    )


def _backend_killed(lab: Lab, daemon: LabDaemon, say: Callable[[str], None], mark: Mark) -> None:
    began = time.monotonic()
    mark("wireguard-go killed")
    faults.kill_client_wireguard_go(lab)
    daemon.wait_for(lambda s: s["last_failure"] and "backend" in s["last_failure"]["reason"], 10, "noticed")
    daemon.wait_for(lambda s: s["state"] == "connected", 20, "connected")
    say(f"wireguard-go killed: restarted and connected again in {time.monotonic() - began:.2f} s")


def _flushed(lab: Lab, daemon: LabDaemon, say: Callable[[str], None], mark: Mark) -> None:
    began = time.monotonic()
    mark("nft flush ruleset")
    lab.run("client", "nft", "flush", "ruleset")
    daemon.wait_for(lambda s: s["last_failure"] and "lock" in s["last_failure"]["reason"], 10, "restored")
    say(
        "another program ran 'nft flush ruleset': the lock was back within "
        f"{(time.monotonic() - began) * 1000:.0f} ms"
    )


def _restarted(lab: Lab, daemon: LabDaemon, say: Callable[[str], None], mark: Mark) -> None:
    pinger = ContinuousPing(lab, interval=0.01)
    time.sleep(0.2)
    mark("SIGKILL + start")
    daemon.kill()
    status = daemon.start()
    assert status is not None  # start() waited for "connected"
    time.sleep(0.2)
    record = pinger.stop()
    say(
        f"daemon SIGKILLed and started again: lock and tunnel stayed, {status['server']} adopted; "
        f"longest ping gap {record.longest_outage_s * 1000:.0f} ms"
    )
