"""`tunlock run` end to end in the lab, with the ISP's observer counting leaks throughout.

Each test gets a lab of its own (0.2 s to build) because most of them break it on purpose: kill
a server, pull the cable, delete the tunnel. What is asserted is what a user sees: the state and
server the daemon reports, pings answered through the tunnel, exit codes, and 0 packets seen by
the ISP outside WireGuard to an endpoint. Durations are printed for the record (the benchmarks
measure them properly) and never asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import ContinuousPing, describe
from tests.lab.conftest import LabUnderTest

# Short limits so that the tests wait seconds, not minutes, where every server is down.
QUICK = {
    "TUNLOCK_HEALTH_CONNECT_TIMEOUTS_S": "2,4",
    "TUNLOCK_ROTATION_BACKOFF_INITIAL_S": "1",
    "TUNLOCK_ROTATION_BACKOFF_MAX_S": "4",
}

# A lab of each test's own (a module-wide one would not survive these faults); the `daemon`
# fixture runs with the QUICK limits.
pytestmark = pytest.mark.lab(per_test=True, daemon_env=QUICK)


def assert_no_leaks(lab: LabUnderTest, mark: int) -> None:
    lab.assert_no_leaks(mark)


def tunlock(lab: LabUnderTest, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (from the host: the control socket is a file, not a netns thing)."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args, "--config", str(lab.lab.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def on(server: str, state: str = "connected"):
    return lambda s: s["state"] == state and s["server"] == server


def test_connects_reports_status_and_keeps_the_lock_when_stopped(
    lab: LabUnderTest, daemon: LabDaemon
) -> None:
    mark = lab.observer.mark()
    status = daemon.start()
    assert status is not None and status["server"] == "vpn1"
    assert lab.probes.ping() and lab.probes.tcp() and lab.probes.dns_udp("10.99.0.1")
    assert not lab.probes.dns_udp("192.0.2.1"), "the ISP's resolver must stay out of reach"

    answer = json.loads(tunlock(lab, "status", "--json").stdout)
    assert answer["state"] == "connected" and answer["server"] == "vpn1"
    assert isinstance(answer["handshake_age_s"], (int, float)) and answer["handshake_age_s"] < 180
    assert answer["lock"] == {
        "installed": True,
        "matching": True,
        "owned": True,
        "egress": ["wan0"],  # every frame leaving the uplink passes the lock's egress chain
        "bypass": [],
        "inbound": {},  # no forwarded port
    }
    human = tunlock(lab, "status")
    assert "state:     connected" in human.stdout and "lock:      installed" in human.stdout
    assert tunlock(lab, "health").returncode == 0

    assert daemon.stop() == 0
    assert "table inet tunlock" in lab.lab.run("client", "nft", "list", "tables"), (
        "permanent mode keeps the lock"
    )
    assert lab.lab.client_ifname not in lab.lab.run("client", "ip", "-o", "link"), "stop removes the tunnel"
    assert not lab.probes.ping(), "stopped and locked: nothing gets out"
    assert tunlock(lab, "health").returncode == 1
    assert tunlock(lab, "status").returncode == 3, "not running is exit 3"
    assert_no_leaks(lab, mark)


def test_session_mode_removes_the_lock_on_stop(lab: LabUnderTest) -> None:
    with lab.daemon(env={**QUICK, "TUNLOCK_LOCK_MODE": "session"}) as daemon:
        daemon.start()
        assert daemon.stop() == 0
    assert "tunlock" not in lab.lab.run("client", "nft", "list", "tables")


def test_silent_server_fails_over_to_the_next(lab: LabUnderTest, daemon: LabDaemon) -> None:
    daemon.start()
    mark = lab.observer.mark()
    pinger = ContinuousPing(lab.lab, interval=0.05)
    faults.blackhole_server(lab.lab, "1")
    began = time.monotonic()
    status = daemon.wait_for(on("vpn2"), timeout=30, what="failover to vpn2")
    took = time.monotonic() - began
    assert lab.probes.ping(), "the internet is reachable through vpn2"
    record = pinger.stop()
    print(f"silent vpn1 -> vpn2 after {took:.2f} s; longest ping outage {record.longest_outage_s:.2f} s")
    assert status["last_failure"]["server"] == "vpn1" and "silent" in status["last_failure"]["reason"]
    assert_no_leaks(lab, mark)


def _watching_for_traffic(daemon: LabDaemon) -> bool:
    """The daemon holds a packet socket: its wake-up on the tunnel's next packet is armed."""
    fds = Path(f"/proc/{daemon.pid}/fd")
    ours = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            ours.add(os.readlink(fd))
    listed = Path(f"/proc/{daemon.pid}/net/packet").read_text().splitlines()[1:]
    return any(f"socket:[{line.split()[-1]}]" in ours for line in listed)


def test_traffic_after_an_idle_spell_wakes_the_daemon_toward_a_silent_server(
    lab: LabUnderTest, daemon: LabDaemon
) -> None:
    """Issue #27 item 1: idle, the daemon waits for the tunnel's first packet, not for its next
    sample. The idle samples and probes here are an hour apart, so only the wake-up can find
    the server that fell silent during the idle spell."""
    daemon.env.update({"TUNLOCK_HEALTH_IDLE_INTERVAL_S": "3600", "TUNLOCK_HEALTH_IDLE_PROBE_S": "3600"})
    daemon.start()
    deadline = time.monotonic() + 20
    while not _watching_for_traffic(daemon):
        assert time.monotonic() < deadline, f"the idle daemon never armed its wake-up\n{daemon.log_tail()}"
        time.sleep(0.05)
    mark = lab.observer.mark()
    faults.blackhole_server(lab.lab, "1")
    pinger = ContinuousPing(lab.lab, interval=0.05)  # traffic starts, toward a silent server
    status = daemon.wait_for(on("vpn2"), timeout=60, what="failover to vpn2, woken by the first packet")
    record = pinger.stop()
    print(f"idle, then silent vpn1 -> vpn2; longest ping outage {record.longest_outage_s:.2f} s")
    assert status["last_failure"]["server"] == "vpn1" and "silent" in status["last_failure"]["reason"]
    assert lab.probes.ping(), "the internet is reachable through vpn2"
    assert_no_leaks(lab, mark)


def test_killed_server_fails_over(lab: LabUnderTest, daemon: LabDaemon) -> None:
    daemon.start()
    mark = lab.observer.mark()
    faults.kill_server(lab.lab, "1")
    daemon.wait_for(on("vpn2"), timeout=30, what="failover to vpn2")
    assert lab.probes.ping()
    assert_no_leaks(lab, mark)


@pytest.mark.parametrize(
    ("cut", "mend"),
    [
        (faults.link_down, faults.link_up),
        (faults.delete_default_route, faults.restore_default_route),
    ],
    ids=["link-down", "default-route-deleted"],
)
def test_no_path_goes_offline_at_once_attempts_nothing_and_resumes(
    lab: LabUnderTest, daemon: LabDaemon, cut, mend
) -> None:
    daemon.start()
    mark = lab.observer.mark()
    cut(lab.lab)
    began = time.monotonic()
    daemon.wait_for(lambda s: s["state"] == "offline", timeout=5, what="offline")
    took_ms = (time.monotonic() - began) * 1000
    print(f"{cut.__name__} -> offline seen by a 10 ms status poll after {took_ms:.0f} ms")
    time.sleep(3)  # longer than a connect timeout: offline must not burn through the servers
    status = daemon.status()
    assert status is not None and status["state"] == "offline" and status["last_failure"] is None
    mend(lab.lab)
    daemon.wait_for(on("vpn1"), timeout=15, what="vpn1 again once a path is back")
    assert lab.probes.ping()
    assert_no_leaks(lab, mark)


def test_tunnel_interface_deleted_is_recreated(lab: LabUnderTest, daemon: LabDaemon) -> None:
    daemon.start()
    mark = lab.observer.mark()
    faults.delete_tunnel_interface(lab.lab)
    daemon.wait_for(lambda s: s["last_failure"] is not None, timeout=10, what="the loss noticed")
    daemon.wait_for(on("vpn1"), timeout=20, what="connected again")
    assert lab.probes.ping(), "the tunnel works again"
    assert_no_leaks(lab, mark)


def test_wireguard_go_killed_is_restarted(lab: LabUnderTest, daemon: LabDaemon) -> None:
    daemon.start()
    mark = lab.observer.mark()
    before = faults.client_wireguard_pid(lab.lab)
    faults.kill_client_wireguard_go(lab.lab)
    daemon.wait_for(lambda s: s["last_failure"] is not None, timeout=10, what="the death noticed")
    daemon.wait_for(on("vpn1"), timeout=20, what="connected again")
    assert faults.client_wireguard_pid(lab.lab) not in (None, before)
    assert lab.probes.ping()
    assert_no_leaks(lab, mark)


def test_sigkilled_daemon_leaves_lock_and_tunnel_and_the_next_adopts(lab: LabUnderTest) -> None:
    first = lab.daemon(env=QUICK)
    first.start()
    mark = lab.observer.mark()
    pinger = ContinuousPing(lab.lab, interval=0.05)
    first.kill()
    assert "table inet tunlock" in lab.lab.run("client", "nft", "list", "tables")
    assert lab.probes.ping(), "the tunnel outlives the daemon"
    assert not lab.probes.dns_udp("192.0.2.1"), "and so does the lock"
    with lab.daemon(env=QUICK) as second:
        status = second.start()
        assert status is not None and status["server"] == "vpn1"
        record = pinger.stop()
        assert any("adopted the running tunnel" in line for line in second.log_events())
        print(f"SIGKILL + restart: longest ping outage {record.longest_outage_s * 1000:.0f} ms")
        assert lab.probes.ping()
    assert_no_leaks(lab, mark)


def test_rotate_and_reconnect_on_request(lab: LabUnderTest, daemon: LabDaemon) -> None:
    daemon.start()
    mark = lab.observer.mark()
    done = tunlock(lab, "rotate")
    assert done.returncode == 0, done.stderr
    daemon.wait_for(on("vpn2"), timeout=15, what="vpn2 after rotate")
    assert tunlock(lab, "reconnect").returncode == 0
    daemon.wait_for(lambda s: s["state"] == "connecting" or s["since"] > time.time() - 2, timeout=5)
    daemon.wait_for(on("vpn2"), timeout=15, what="vpn2 after reconnect")
    assert lab.probes.ping()
    assert_no_leaks(lab, mark)


def test_every_server_down_blocks_then_recovers(lab: LabUnderTest, daemon: LabDaemon) -> None:
    daemon.start()
    mark = lab.observer.mark()
    for index in ("1", "2", "3"):
        faults.blackhole_server(lab.lab, index)
    status = daemon.wait_for(lambda s: s["state"] == "blocked", timeout=40, what="blocked")
    assert "every server failed" in status["reason"]
    assert not lab.probes.ping()
    faults.restore_server(lab.lab, "3")
    daemon.wait_for(on("vpn3"), timeout=40, what="vpn3 after it came back")
    assert lab.probes.ping()
    assert_no_leaks(lab, mark)


def test_reload_moves_off_a_server_removed_from_the_config(lab: LabUnderTest) -> None:
    config = lab.lab.dir / "reload.toml"
    text = lab.lab.config_path.read_text()
    config.write_text(text)
    with lab.daemon(env=QUICK, config=str(config)) as daemon:
        daemon.start()
        config.write_text(text.replace('servers = ["servers/*.conf"]', 'servers = ["servers/vpn3.conf"]'))
        os.kill(daemon.pid, 1)  # SIGHUP
        daemon.wait_for(on("vpn3"), timeout=15, what="vpn3 after reload")
        config.write_text(text.replace("[tunnel]", "[tunnel]\nbogus = 1"))
        logged = len(daemon.log_events())
        os.kill(daemon.pid, 1)
        assert "bogus" in daemon.wait_for_log("reload refused", after=logged)
        status = daemon.status()
        assert status is not None and status["server"] == "vpn3", "a bad reload keeps the running config"


def test_bad_config_exits_with_file_and_line_and_leaves_the_lock(lab: LabUnderTest) -> None:
    with lab.daemon(env=QUICK) as daemon:
        daemon.start()
    broken = lab.lab.dir / "broken.toml"
    broken.write_text(lab.lab.config_path.read_text().replace('backend = "userspace"', 'backend = "kernal"'))
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.lab.ns("client"),
            sys.executable,
            "-m",
            "supervisor.cli",
            "run",
            "--config",
            str(broken),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TUNLOCK_LAB_ONLY": "1"},
    )
    assert result.returncode == 2
    line = next(n for n, text in enumerate(broken.read_text().splitlines(), 1) if "kernal" in text)
    assert f"{broken}:{line}: tunnel.backend" in result.stderr
    assert "table inet tunlock" in lab.lab.run("client", "nft", "list", "tables")


def _processes_naming(word: str) -> list[int]:
    """The PIDs whose command line holds ``word`` (read from /proc: nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if word.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def test_a_lock_the_kernel_refuses_ends_the_start_and_leaves_no_tunnel(
    lab: LabUnderTest, daemon: LabDaemon
) -> None:
    """The interface is made while the lock is applied (issue #27 item 4). When the kernel refuses
    the lock (here its table belongs to another program, nftables' owner flag), the daemon ends
    with status 1 and says why once, and the interface and its wireguard-go go with it: nothing
    of a start that never locked stays. The lock's table is left as it was."""
    ifname = tomllib.loads(lab.lab.config_path.read_text())["tunnel"]["interface"]
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lab.lab.ns("client"), "nft", "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert holder.stdin is not None
    try:
        holder.stdin.write("add table inet tunlock { flags owner; }\n")
        holder.stdin.flush()
        deadline = time.monotonic() + 10
        while "table inet tunlock" not in lab.lab.run("client", "nft", "list", "tables"):
            assert time.monotonic() < deadline, "the other program's table never appeared"
            time.sleep(0.05)
        daemon.start(wait_for=None)
        assert daemon.process is not None and daemon.process.wait(30) == 1, daemon.log_tail()
        failed = json.loads(daemon.wait_for_log("tunlock failed"))
        assert "Operation not permitted" in failed["error"]
        # libnftables repeats the refusal for every message of the transaction (~100 times).
        assert failed["error"].count("Error:") == 1, failed["error"][:2000]
        links = lab.lab.run("client", "ip", "-o", "link", "show")
        assert f" {ifname}:" not in links, f"the interface stayed:\n{links}"
        assert not _processes_naming(ifname), "its wireguard-go stayed"
        assert "table inet tunlock" in lab.lab.run("client", "nft", "list", "tables")
    finally:
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.parametrize("percent", ["20", "30"])
def test_lossy_link_does_not_fail_over(lab: LabUnderTest, daemon: LabDaemon, percent: str) -> None:
    """20 % and 30 % loss both ways under a light ping: lost pings and probes put the daemon in
    doubt again and again, and every doubt must end with an answer, not a switch."""
    duration = float(os.environ.get("TUNLOCK_LOSS_TEST_S", "30"))
    daemon.start()
    mark = lab.observer.mark()
    faults.loss(lab.lab, percent)
    pinger = ContinuousPing(lab.lab, interval=0.2)
    try:
        time.sleep(duration)  # the lossy spell under observation, not a wait for something
        status = daemon.status()
    finally:
        record = pinger.stop()
        faults.clear_loss(lab.lab)
    assert record.answered > 0, "the pings went through the lossy tunnel at all"
    # On a switch, say why (the daemon's reasons) and how busy the machine was: CPU starvation of
    # the userspace tunnels is the one thing the loss arithmetic does not cover.
    why = f"{status}\nload {os.getloadavg()}\n{daemon.log_tail(15)}"
    assert status is not None and status["state"] == "connected" and status["server"] == "vpn1", why
    assert status["last_failure"] is None, f"a false failover under loss: {why}"
    assert_no_leaks(lab, mark)


# A scrape as a Prometheus server would make it, from inside a lab namespace (optionally from a
# given source address): the response body, or "" when nothing answered.
SCRAPE = """
import socket, sys
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(2)
try:
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: tunlock\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.partition(b"\\r\\n\\r\\n")[2].decode(), end="")
except OSError:
    pass
"""


def scrape(lab: LabUnderTest, role: str, host: str, source: str = "") -> dict[tuple[str, tuple], float]:
    # The scrape names no format, so the daemon answers OpenMetrics; its parser is strict.
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = lab.lab.run(role, sys.executable, "-c", SCRAPE, host, "9586", source, check=False)
    if not text:
        return {}  # nothing answered
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_follow_the_daemon_and_reach_the_lan_only_through_inbound_tcp(lab: LabUnderTest) -> None:
    from supervisor.lab.topology import CLIENT_V4, LAN_HOST_V4

    config = lab.lab.dir / "metrics.toml"
    text = lab.lab.config_path.read_text() + '\n[metrics]\nlisten = "0.0.0.0:9586"\n'
    config.write_text(text)
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=str(config)) as daemon:
        daemon.start()
        assert lab.probes.ping()
        assert not lab.probes.dns_udp("192.0.2.1"), "the ISP's resolver stays out of reach"
        began = time.monotonic()
        got = scrape(lab, "client", "127.0.0.1")
        print(f"one scrape, starting a Python client in the namespace: {time.monotonic() - began:.3f} s")
        assert got[("tunlock_connected", ())] == 1
        assert got[("tunlock_state", (("state", "connected"),))] == 1
        info = [dict(labels) for name, labels in got if name == "tunlock_server_info"]
        assert info == [{"server": "vpn1", "endpoint": lab.lab.state.servers[0].endpoint}], got
        assert got[("tunlock_tunnel_receive_bytes_total", ())] > 0
        assert got[("tunlock_lock_installed", ())] == 1 and got[("tunlock_lock_matching", ())] == 1
        assert got[("tunlock_lock_blocked_packets_total", (("where", "dns"),))] >= 1
        assert got[("tunlock_servers", ())] == len(lab.lab.state.servers)
        assert "metrics.listen 0.0.0.0:9586: the lock lets only this host scrape it" in daemon.log_tail(200)
        assert scrape(lab, "isp", CLIENT_V4, source=LAN_HOST_V4) == {}, (
            "not in inbound_tcp: the LAN is kept out"
        )

        faults.blackhole_server(lab.lab, "1")
        daemon.wait_for(on("vpn2"), timeout=30, what="failover to vpn2")
        got = scrape(lab, "client", "127.0.0.1")
        assert got[("tunlock_server_failures_total", (("server", "vpn1"),))] == 1
        assert got[("tunlock_state_entered_total", (("state", "connected"),))] == 2
        assert [dict(labels)["server"] for name, labels in got if name == "tunlock_server_info"] == ["vpn2"]
        assert_no_leaks(lab, mark)

        opened = lab.observer.mark()
        config.write_text(text.replace("[lock]\n", "[lock]\ninbound_tcp = [9586]\n"))
        os.kill(daemon.pid, 1)  # SIGHUP
        deadline = time.monotonic() + 10
        while not (from_lan := scrape(lab, "isp", CLIENT_V4, source=LAN_HOST_V4)):
            assert time.monotonic() < deadline, (
                f"the LAN got no metrics after the reload\n{daemon.log_tail()}"
            )
            time.sleep(0.2)
        assert from_lan[("tunlock_connected", ())] == 1
        assert daemon.stop() == 0
    seen = lab.observer.leaks(since=opened)
    assert seen and all(e["kind"] == "tcp" and e["dst"] == LAN_HOST_V4 for e in seen), describe(seen)
