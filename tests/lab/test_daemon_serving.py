"""The daemon's listeners against a crowd (issue #21): a flood of connections, from an
unprivileged local user to the metrics port or from idle clients to the control socket, costs
neither the daemon nor its answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from tests.lab.conftest import LabUnderTest
from tests.lab.test_daemon import QUICK, SCRAPE, assert_no_leaks, scrape, tunlock

pytestmark = pytest.mark.lab(per_test=True, daemon_env=QUICK)

# An unprivileged local user's flood: COUNT connections to the port, held open HOLD seconds.
# It raises its own descriptor limit (a user may, up to the hard limit) to hold that many.
FLOOD = """
import resource, select, socket, sys, time
host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    held.append(s)
poller = select.poll()
for s in held:
    poller.register(s, select.POLLOUT)
connected = 0
deadline = time.monotonic() + 10
while connected < count and time.monotonic() < deadline:
    connected += len(poller.poll(100))
    for fd, _ in poller.poll(0):
        poller.unregister(fd)
print(f"holding {sum(1 for s in held if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)}", flush=True)
time.sleep(hold)
"""


# A scrape that waits as long as the flood lasts: it queues behind the flood's connections in
# the listen backlog, and how long the daemon takes to reach it depends on the machine's load.
PATIENT_SCRAPE = SCRAPE.replace("s.settimeout(2)", "s.settimeout(20)")


def scrape_patiently(lab: LabUnderTest) -> dict[tuple[str, tuple], float]:
    # The scrape names no format, so the daemon answers OpenMetrics; its parser is strict.
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = lab.lab.run("client", sys.executable, "-c", PATIENT_SCRAPE, "127.0.0.1", "9586", "", check=False)
    if not text:
        return {}  # nothing answered
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def soft_nofile(pid: int) -> int:
    """The process's soft descriptor limit, as /proc shows it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no descriptor limit for {pid}")


def flood(lab: LabUnderTest, host: str, port: int, count: int, hold_s: float) -> subprocess.Popen[str]:
    """An unprivileged user (nobody) in the client namespace holding ``count`` connections."""
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.lab.ns("client"), "setpriv", "--reuid=nobody", "--regid=nogroup",
         "--clear-groups", "--", "/usr/bin/python3", "-c", FLOOD, host, str(port), str(count), str(hold_s)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("nofile", ["1024:", "1024:1024"], ids=["systemd-default", "hard-1024"])
def test_an_unprivileged_flood_of_metrics_connections_does_not_end_the_daemon(
    lab: LabUnderTest, nofile: str
) -> None:
    """Issue #21, item 1: under systemd's soft limit of 1024 descriptors, 1500 connections held
    for 8 s made accept() fail with EMFILE, uncaught: "tunlock crashed". The daemon raises its
    soft limit; with a hard limit it cannot raise, the bound on connections alone holds."""
    config = lab.lab.dir / "metrics.toml"
    config.write_text(lab.lab.config_path.read_text() + '\n[metrics]\nlisten = "127.0.0.1:9586"\n')
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=str(config)) as daemon:
        daemon.nofile = nofile
        daemon.start()
        assert scrape(lab, "client", "127.0.0.1")[("tunlock_connected", ())] == 1
        limit = soft_nofile(daemon.pid)
        print(f"the daemon's soft descriptor limit: {limit}")
        assert limit == (4096 if nofile == "1024:" else 1024), "raised up to the hard limit"
        attacker = flood(lab, "127.0.0.1", 9586, 1500, 8)
        try:
            assert attacker.stdout is not None
            holding = attacker.stdout.readline()
            print(f"the flood: {holding.strip()}")
            assert int(holding.split()[1]) >= 1500, holding
            began = time.monotonic()
            during = scrape_patiently(lab)
            print(f"a scrape during the flood: {time.monotonic() - began:.2f} s")
            while attacker.poll() is None:  # the daemon answers throughout the flood
                alive(daemon)
                time.sleep(0.2)
        finally:
            if attacker.poll() is None:
                attacker.kill()
            attacker.wait(10)
        assert during.get(("tunlock_connected", ())) == 1, "metrics served during the flood"
        alive(daemon)
        assert scrape(lab, "client", "127.0.0.1")[("tunlock_connected", ())] == 1, "and after it"
        assert lab.probes.ping()
        assert "crashed" not in "\n".join(daemon.log_events())
        assert daemon.stop() == 0
    assert_no_leaks(lab, mark)


def alive(daemon: LabDaemon) -> None:
    """Running, answering, connected."""
    assert daemon.process is not None and daemon.process.poll() is None, f"ended\n{daemon.log_tail()}"
    status = daemon.status()
    assert status is not None and status["state"] == "connected", f"{status}\n{daemon.log_tail()}"


def test_idle_clients_on_the_control_socket_do_not_keep_status_and_health_waiting(
    lab: LabUnderTest, daemon: LabDaemon
) -> None:
    """Issue #21, item 9a: 200 clients that connect and send nothing kept `status` and `health`
    waiting behind them until the 5 s timeout of the CLI (root only, but the health check of a
    container then fails)."""
    daemon.start()
    mark = lab.observer.mark()
    idle: list[socket.socket] = []
    try:
        for _ in range(200):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(daemon.socket))
            idle.append(client)
        began = time.monotonic()
        health = tunlock(lab, "health")
        print(f"`tunlock health` behind 200 idle clients: {time.monotonic() - began:.2f} s")
        assert health.returncode == 0, health.stderr
        status = tunlock(lab, "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["state"] == "connected", status.stderr
    finally:
        for client in idle:
            client.close()
    alive(daemon)
    assert_no_leaks(lab, mark)


# --- a daemon that did not run: issue #21, item 9b ---------------------------------------------

# Longer than the machine's resume gap (10 s) and than the connect timeout (QUICK: 2 s).
SUSPENDED_S = 12.0


@contextlib.contextmanager
def stopped(daemon: LabDaemon) -> Iterator[None]:
    """SIGSTOP for the block, then SIGCONT: the daemon does not run meanwhile, as in a suspended
    VM; its tunnel (wireguard-go, a process of its own) and the servers go on."""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def failures_logged(daemon: LabDaemon) -> list[str]:
    return [line for line in daemon.log_events() if '"state"' in line and "failed" in line]


def test_a_suspended_daemon_does_not_blame_its_server_for_the_silence(
    lab: LabUnderTest, daemon: LabDaemon
) -> None:
    """After 200 s of SIGSTOP the daemon failed over 0.3 s after SIGCONT: the silence it had
    caused itself was held against a healthy server, which was cooled down. Here, a stop while
    connected, and one while connecting, whose connect timer fell due during the stop."""
    daemon.start()
    mark = lab.observer.mark()
    with stopped(daemon):
        time.sleep(SUSPENDED_S)  # the suspension itself, not a wait for something
    status = daemon.wait_for(lambda s: s["state"] == "connected", timeout=10, what="connected")
    resumes = [line for line in daemon.log_events() if "did not run for" in line]
    assert resumes, f"the resume is in the log (connected)\n{daemon.log_tail()}"
    assert status["server"] == "vpn1" and status["last_failure"] is None, status
    assert lab.probes.ping()

    faults.blackhole_server(lab.lab, "1")  # holds it in connecting until the stop
    try:
        daemon.ask("reconnect")
        daemon.wait_for(lambda s: s["state"] == "connecting", timeout=5, what="connecting")
        with stopped(daemon):
            faults.restore_server(lab.lab, "1")
            time.sleep(SUSPENDED_S)
    finally:
        faults.restore_server(lab.lab, "1")
    resumed = time.monotonic()
    status = daemon.wait_for(lambda s: s["state"] == "connected", timeout=15, what="connected again")
    print(f"connected to {status['server']} {time.monotonic() - resumed:.2f} s after SIGCONT (connecting)")
    assert status["server"] == "vpn1", f"a needless failover: {status}\n{daemon.log_tail()}"
    assert status["last_failure"] is None, status
    assert not failures_logged(daemon), failures_logged(daemon)
    assert any("did not run for" in line for line in daemon.log_events()), "the resume is in the log"
    assert lab.probes.ping()
    assert_no_leaks(lab, mark)
