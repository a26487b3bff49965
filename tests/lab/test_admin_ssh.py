"""The administrator's SSH through the lock (``lock.admin_tcp``), with a real sshd in the lab's
client and the administrator on the internet host (203.0.113.10).

What is asserted is what the administrator and the ISP see: the session keeps exchanging data
across every change of the daemon (its longest gap is printed, never asserted), a new session
gets in, another port does not; and an observer told of the session counts 0 packets besides
its replies while every probe kind, UDP from port 22, and the client's own connections to port
22 elsewhere or from port 22 try to get out.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import pytest

from supervisor.lab import faults
from supervisor.lab.probes import Observer, describe
from supervisor.lab.topology import CLIENT_V4, CLIENT_V6, INTERNET_V4, INTERNET_V6
from tests.lab.conftest import LabUnderTest, tunlock_in_client
from tests.lab.ssh_admin import AdminSession, LabSshd

QUICK = {
    "TUNLOCK_HEALTH_CONNECT_TIMEOUTS_S": "2,4",
    "TUNLOCK_ROTATION_BACKOFF_INITIAL_S": "1",
    "TUNLOCK_ROTATION_BACKOFF_MAX_S": "4",
}
ADMIN = {"TUNLOCK_LOCK_ADMIN_TCP": "22"}

pytestmark = pytest.mark.lab(servers=2, per_test=True)


@pytest.fixture
def sshd(lab: LabUnderTest) -> Iterator[LabSshd]:
    server = LabSshd(lab.lab)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin_observer(lab: LabUnderTest) -> Observer:
    """An observer that lets the administrator's session out (and nothing else), counted apart."""
    flows = (f"{CLIENT_V4}:22>{INTERNET_V4}", f"[{CLIENT_V6}]:22>{INTERNET_V6}")
    return Observer.start(lab.lab, admin=flows, name="observer-admin")


def lock_apply(lab: LabUnderTest, env: dict[str, str] | None = None) -> None:
    done = tunlock_in_client(lab, "lock", "apply", "--config", str(lab.lab.config_path), env=env)
    assert done.returncode == 0, done.stderr


def assert_only_the_session_got_out(observer: Observer, mark: int, v6: bool = False) -> None:
    leaks = observer.leaks(since=mark)
    assert not leaks, f"the ISP saw {len(leaks)} packets besides the session's:\n{describe(leaks)}"
    admin = observer.admin_packets(since=mark)
    assert admin, "the administrator's replies were never seen: the test proved nothing"
    flows = {(CLIENT_V4, 22, INTERNET_V4)} | ({(CLIENT_V6, 22, INTERNET_V6)} if v6 else set())
    assert {(p["src"], p["sport"], p["dst"]) for p in admin} == flows


def try_to_get_out_beside_the_session(lab: LabUnderTest) -> None:
    """What must stay in the lock although port 22 is open: UDP from port 22, the client's own
    connection to port 22 elsewhere, and one from a TCP port 22 a program bound (here with
    SO_REUSEPORT beside no listener of its own kind; where sshd holds the port, the bind fails)."""

    def udp_from_22() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("0.0.0.0", 22))
            sock.sendto(b"from port 22", (INTERNET_V4, 7))
        return True

    def tcp_to_22_elsewhere(target: str) -> bool:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect((target, 22))
        return True

    assert not lab.probes._in_client(tcp_to_22_elsewhere, INTERNET_V4)
    assert not lab.probes._in_client(tcp_to_22_elsewhere, INTERNET_V6)
    lab.probes._in_client(udp_from_22)


def test_the_session_survives_every_change_and_nothing_else_gets_out(
    lab: LabUnderTest, sshd: LabSshd, admin_observer: Observer
) -> None:
    env = {**QUICK, **ADMIN}
    lock_apply(lab, ADMIN)  # the boot lock, before the administrator logs in
    session = AdminSession(sshd)
    try:
        mark = admin_observer.mark()
        gaps: dict[str, float] = {}

        def step(name: str) -> None:
            since = session.mark()
            session.wait_for_echo()
            gaps[name] = session.longest_gap(since)

        daemon = lab.daemon(env=env)
        since = session.mark()
        daemon.start()
        session.wait_for_echo()
        gaps["connect"] = session.longest_gap(since)
        lab.probes.every_kind()
        try_to_get_out_beside_the_session(lab)

        since = session.mark()
        faults.kill_server(lab.lab, "1")
        daemon.wait_for(lambda s: s["state"] == "connected" and s["server"] == "vpn2", 30, "failover")
        session.wait_for_echo()
        gaps["failover"] = session.longest_gap(since)

        since = session.mark()
        faults.blackhole_server(lab.lab, "2")
        daemon.wait_for(lambda s: s["state"] == "blocked", 40, "blocked: every server failed")
        session.wait_for_echo()
        gaps["every server down"] = session.longest_gap(since)
        lab.probes.every_kind()
        faults.restore_server(lab.lab, "2")
        daemon.wait_for(lambda s: s["state"] == "connected", 40, "vpn2 back")

        since = session.mark()
        daemon.kill()
        session.wait_for_echo()
        assert "fwmark 0x746c0022 lookup main" in lab.lab.run("client", "ip", "rule"), "the rule outlives it"
        daemon = lab.daemon(env=env)
        daemon.start()
        session.wait_for_echo()
        gaps["SIGKILL + restart"] = session.longest_gap(since)
        lab.probes.every_kind()

        since = session.mark()
        os.kill(daemon.pid, signal.SIGHUP)
        session.wait_for_echo()
        daemon.wait_for(lambda s: s["state"] == "connected", 15, "connected after the reload")
        session.wait_for_echo()
        gaps["reload"] = session.longest_gap(since)

        since = session.mark()
        assert daemon.stop() == 0
        session.wait_for_echo()
        gaps["stop"] = session.longest_gap(since)
        lab.probes.every_kind()
        try_to_get_out_beside_the_session(lab)

        assert session.alive
        fresh = sshd.run_from("inet", "echo", "in again")
        assert fresh.returncode == 0 and fresh.stdout.strip() == "in again", fresh.stderr
        print(
            "administrator's session, longest gap (0.1 s between lines): "
            + ", ".join(f"{name} {gap * 1000:.0f} ms" for name, gap in gaps.items())
        )
        assert_only_the_session_got_out(admin_observer, mark)
    finally:
        session.close()


def test_the_admin_port_gets_in_another_port_is_refused_and_nothing_else_gets_out(
    lab: LabUnderTest, admin_observer: Observer
) -> None:
    lock_apply(lab, ADMIN)
    mark = admin_observer.mark()

    def tcp_from_22() -> bool:  # before sshd listens there: any root program may bind the port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.bind(("0.0.0.0", 22))
            sock.connect((INTERNET_V4, 80))
        return True

    assert not lab.probes._in_client(tcp_from_22), "a connection from port 22 is no reply"
    admin, other = LabSshd(lab.lab), LabSshd(lab.lab, port=2222)
    try:
        allowed = admin.run_from("inet", "echo", "in")
        assert allowed.returncode == 0 and allowed.stdout.strip() == "in", allowed.stderr
        over_ipv6 = admin.run_from("inet", "echo", "in6", host=CLIENT_V6)
        assert over_ipv6.returncode == 0 and over_ipv6.stdout.strip() == "in6", over_ipv6.stderr
        refused = other.run_from("inet", "echo", "should not get in")
        assert refused.returncode != 0 and "should not get in" not in refused.stdout
        try_to_get_out_beside_the_session(lab)
        assert_only_the_session_got_out(admin_observer, mark, v6=True)
    finally:
        admin.stop()
        other.stop()
