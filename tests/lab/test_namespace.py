"""Namespace mode (``tunnel.namespace``): only the programs inside go through the tunnel.

The lab's client namespace stands for the host; the daemon creates the app namespace
``tlab<id>-app`` from there and keeps the tunnel in it. The app's probes (every kind, IPv4 and
IPv6, DNS to the ISP's resolver) run from inside through start, failover, SIGKILL and restart,
and stop: the ISP's observer sees none of them outside the tunnel. The host meanwhile reaches the
internet directly, with no lock, rule or resolver of tunlock's.

The VM tier runs the first test with kernel WireGuard (tests/vm/inside.txt): the link is then
created from the host's netlink socket straight into the namespace, its UDP socket in the host.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.faults import kill_server
from supervisor.lab.probes import INTERNET_V4, INTERNET_V6, Probes, describe
from tests.lab.conftest import LabUnderTest, tunlock_in_client
from tests.lab.seedbox import QUICK, connect, start_gateways, wait_until, write_config
from tests.lab.torrent_clients import (
    QBT_PASSWORD,
    QBT_USER,
    QBT_WEBUI_PORT,
    listening_ports,
    start_qbittorrent,
    write_secret,
)

pytestmark = pytest.mark.lab(servers=2, per_test=True)
METRICS_PORT = 9586


@pytest.fixture
def app_daemon(lab: LabUnderTest) -> Iterator[LabDaemon]:
    """The lab's daemon with ``namespace = "tlab<id>-app"``, not started yet."""
    config = lab.lab.dir / "namespace.toml"
    text = lab.lab.config_path.read_text()
    text = text.replace("[tunnel]\n", f'[tunnel]\nnamespace = "{lab.lab.ns("app")}"\n', 1)
    config.write_text(text + f'\n[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n')
    running = lab.daemon(env={"TUNLOCK_HEALTH_DEAD_AFTER_S": "2"}, config=str(config))
    running.private_mounts = False
    try:
        yield running
    finally:
        running.stop()


NDP = {133, 134, 135, 136, 137}  # router and neighbour solicitations and advertisements, redirect


def from_the_app(lab: LabUnderTest, leaks: list[dict]) -> list[dict]:
    """The leaks that could be the app's: all but the host's own kernel keeping its link (NDP to
    the router's global address, which the observer counts since it is not a link-local one) and
    answering a server's late packets to a wireguard-go that just died ("port unreachable" to the
    endpoint). The host is not locked in namespace mode; neither tells anyone anything of the app."""
    endpoints = {s.endpoint_v4 for s in lab.lab.servers} | {s.endpoint_v6 for s in lab.lab.servers}
    unreachable = {("icmp", 3), ("icmpv6", 1)}

    def the_hosts(e: dict) -> bool:
        if e["kind"] == "icmpv6" and e.get("icmp_type") in NDP:
            return True
        return (e["kind"], e.get("icmp_type")) in unreachable and e["dst"] in endpoints

    return [e for e in leaks if not the_hosts(e)]


def nothing_left_the_app(lab: LabUnderTest, app: Probes) -> dict[str, bool]:
    """Every probe kind from inside the app namespace; the observer must record none of them."""
    mark = lab.observer.mark()
    answered = app.every_kind()
    leaks = from_the_app(lab, lab.observer.leaks(since=mark))
    assert leaks == [], f"leaked from the app namespace:\n{describe(leaks)}"
    return answered


def test_only_the_namespace_goes_through_the_tunnel_from_start_to_stop(
    lab: LabUnderTest, app_daemon: LabDaemon
) -> None:
    name = lab.lab.ns("app")
    status = app_daemon.start()
    assert status is not None and status["namespace"] == name and status["server"] == "vpn1"
    app, host = Probes(lab.lab, role="app"), Probes(lab.lab)

    # Connected: the app reaches the internet through the tunnel, and nothing else.
    answered = nothing_left_the_app(lab, app)
    assert answered["tcp4"] and answered["tcp6"] and answered["icmp4"], answered
    assert not answered["dns-udp-isp"] and not answered["dns-udp-lan"], answered
    assert lab.lab.run("app", "cat", "/etc/resolv.conf").split()[-1] == "10.99.0.1"
    links = lab.lab.run("app", "ip", "-o", "link", "show").splitlines()
    assert sorted(line.split(":")[1].strip() for line in links) == sorted(["lo", lab.lab.client_ifname])

    # tunlock exec: inside, as the user asked for, with the namespace's resolvers and links only.
    mark = lab.observer.mark()
    script = "id -u; ls /sys/class/net; cat /etc/resolv.conf; exec 3<>/dev/tcp/203.0.113.10/80; echo reached"
    ran = tunlock_in_client(
        lab, "exec", "--config", app_daemon.config, "--user", "nobody", "--", "bash", "-c", script
    )
    assert ran.returncode == 0, ran.stderr
    uid, *rest = ran.stdout.split("\n")
    assert uid == "65534"
    assert sorted(rest[:2]) == sorted(["lo", lab.lab.client_ifname])
    assert "nameserver 10.99.0.1" in ran.stdout and ran.stdout.rstrip().endswith("reached"), ran.stderr
    assert lab.observer.leaks(since=mark) == []

    # tunlock leaktest in the namespace (issue #24): every probe from inside, judged blocked.
    mark = lab.observer.mark()
    leaktest = [sys.executable, "-m", "supervisor.cli", "leaktest", "--config", app_daemon.config, "--json"]
    tested = tunlock_in_client(lab, "exec", "--config", app_daemon.config, "--", *leaktest)
    assert tested.returncode == 0, f"{tested.stdout}\n{tested.stderr}"
    verdict = json.loads(tested.stdout)
    # No interface but the tunnel inside: nothing to probe, which is the proof, and said so.
    assert "no interface outside the tunnel has an address: nothing to probe" in verdict["notes"]
    checked = {c["name"]: c["status"] for c in verdict["checks"]}
    assert checked["lock"] == checked["dns"] == checked["tunnel"] == "ok", verdict["checks"]
    assert from_the_app(lab, lab.observer.leaks(since=mark)) == []

    # The host is left alone: direct, no lock table, no tunnel rules, its own resolver.
    assert host.tcp(INTERNET_V4) and host.ping(INTERNET_V6) and host.dns_udp()
    assert lab.lab.run("client", "nft", "list", "tables").strip() == ""
    assert "lookup 51820" not in lab.lab.run("client", "ip", "rule")
    # The metrics listen on the host, where a scraper is, not on the namespace's loopback.
    scraped = lab.lab.run("client", "curl", "-s", f"http://127.0.0.1:{METRICS_PORT}/metrics")
    assert 'tunlock_state{state="connected"} 1' in scraped

    # Failover: the first server dies; the app's probes never leave outside the tunnel.
    mark = lab.observer.mark()
    kill_server(lab.lab, "1")
    app.every_kind()
    status = app_daemon.wait_for(lambda s: s["state"] == "connected" and s["server"] == "vpn2", 20, "vpn2")
    assert app.tcp(INTERNET_V4)
    leaks = from_the_app(lab, lab.observer.leaks(since=mark))
    assert leaks == [], f"leaked during the failover:\n{describe(leaks)}"

    # Offline: the host loses its carrier; inside, still nothing leaves but through the tunnel.
    mark = lab.observer.mark()
    faults.link_down(lab.lab)
    app_daemon.wait_for(lambda s: s["state"] == "offline", 20, "offline")
    app.every_kind()
    faults.link_up(lab.lab)
    app_daemon.wait_for(lambda s: s["state"] == "connected", 30, "connected again")
    if lab.lab.state.wireguard == "userspace":
        # wireguard-go killed: the new one's TUN is moved in before anything is configured on it.
        killed = time.time()
        faults.kill_client_wireguard_go(lab.lab)
        app_daemon.wait_for(
            lambda s: s["state"] == "connected" and s["since"] > killed, 30, "connected on a new wireguard-go"
        )
        moved = [e for e in app_daemon.log_events() if '"moved the tunnel interface into the namespace"' in e]
        assert len(moved) == 2, moved
        assert app.tcp(INTERNET_V4)

    # The tunnel interface deleted inside the namespace: seen there, and made again.
    def seen_gone() -> int:  # the monitor's report of the interface's loss, heard in the namespace
        return sum("the tunnel interface was deleted; recreating it" in e for e in app_daemon.log_events())

    deleted, seen = time.time(), seen_gone()
    lab.lab.run("app", "ip", "link", "del", lab.lab.client_ifname)
    app_daemon.wait_for(
        lambda s: s["state"] == "connected" and s["since"] > deleted, 30, "connected on a new interface"
    )
    assert seen_gone() > seen
    assert app.tcp(INTERNET_V4)
    # A reload (SIGHUP) finds the endpoints' paths in the host.
    os.kill(app_daemon.pid, signal.SIGHUP)
    app_daemon.wait_for(
        lambda _: any('"configuration reloaded"' in e for e in app_daemon.log_events()), 10, "the reload"
    )
    leaks = from_the_app(lab, lab.observer.leaks(since=mark))
    assert leaks == [], f"leaked while offline or while the tunnel was rebuilt:\n{describe(leaks)}"

    # SIGKILL: the app still has no way out but the tunnel, which goes on (wireguard-go outlives
    # the daemon); a new daemon adopts both the namespace and the tunnel.
    app_daemon.kill()
    answered = nothing_left_the_app(lab, app)
    assert answered["tcp4"], answered
    status = app_daemon.start()
    assert status is not None and status["server"] == "vpn2" and status["namespace"] == name
    assert any('"adopted the running tunnel"' in line for line in app_daemon.log_events())
    nothing_left_the_app(lab, app)

    # Stop: the tunnel goes, the namespace and its lock stay; nothing gets out at all.
    assert app_daemon.stop() == 0
    answered = nothing_left_the_app(lab, app)
    assert not any(answered.values()), answered
    assert "tunlock" in lab.lab.run("app", "nft", "list", "tables")
    assert host.tcp(INTERNET_V4)


# A TCP server that greets as the lab's responder does, on the port given.
GREETER = (
    "import socket, sys\n"
    "server = socket.create_server(('0.0.0.0', int(sys.argv[1])))\n"
    "while True:\n"
    "    conn, _ = server.accept()\n"
    "    conn.sendall(b'tunlock-lab ok')\n"
    "    conn.close()\n"
)
UI_SUBNET = "198.51.100.252/30"  # the lab's addresses come from the documentation ranges
HOST_END, INSIDE_END = "198.51.100.253", "198.51.100.254"


def greet_from(lab: LabUnderTest, role: str, port: int) -> None:
    """A greeter in ``role``'s namespace, listening once this returns."""
    lab.lab.spawn(role, [sys.executable, "-c", GREETER, str(port)], log=f"greeter-{role}-{port}.log")
    deadline = time.monotonic() + 10 * lab.time_scale
    while f":{port} " not in lab.lab.run(role, "ss", "-Htln"):
        assert time.monotonic() < deadline, f"the greeter on {role}:{port} did not start"
        time.sleep(0.01)


@pytest.mark.lab(servers=1, per_test=True)
def test_the_host_reaches_the_web_ui_and_nothing_inside_gets_out_by_its_link(lab: LabUnderTest) -> None:
    config = lab.lab.dir / "namespace-ui.toml"
    text = lab.lab.config_path.read_text().replace(
        "[tunnel]\n", f'[tunnel]\nnamespace = "{lab.lab.ns("app")}"\n', 1
    )
    config.write_text(text + f'\n[namespace]\nui_tcp = [8080]\nui_subnet = "{UI_SUBNET}"\n')
    app_daemon = lab.daemon(config=str(config))
    app_daemon.private_mounts = False
    with app_daemon:
        app_daemon.start()
        app_daemon.wait_for(
            lambda _: any('"web-UI link in place"' in line for line in app_daemon.log_events()),
            what="the web-UI link",
        )
        greet_from(lab, "app", 8080)  # the web UI
        greet_from(lab, "app", 9999)  # another service inside, not for the host
        greet_from(lab, "client", 7777)  # a service of the host's
        app, host = Probes(lab.lab, role="app"), Probes(lab.lab)

        # From the host: the web UI answers, nothing else inside does.
        assert host.tcp(INSIDE_END, 8080)
        assert not host.tcp(INSIDE_END, 9999)

        # From inside: nothing reaches the host's end, or the internet that way.
        mark = lab.observer.mark()
        assert not app.tcp(HOST_END, 7777)
        assert not app.ping(HOST_END)
        assert not app.udp(HOST_END, 7)
        assert app.tcp(INTERNET_V4)  # through the tunnel
        assert lab.observer.leaks(since=mark) == []
        # And the web UI still answers once the daemon stopped: the link and the lock stay.
        assert app_daemon.stop() == 0
        assert host.tcp(INSIDE_END, 8080)
        assert not host.tcp(INSIDE_END, 9999)
        assert not app.tcp(HOST_END, 7777)


@pytest.mark.lab(servers=2, per_test=True)
def test_a_torrent_client_inside_follows_the_forwarded_port_through_a_failover(lab: LabUnderTest) -> None:
    """The seedbox: qBittorrent inside the namespace, NAT-PMP through the tunnel, the port pushed
    to its web API on the namespace's loopback; after a failover it listens on the new port, and
    a peer on the internet reaches it through the new server. Nothing leaves outside the tunnel."""
    start_gateways(lab.lab, {1: 40001, 2: 40002})
    password_file = write_secret(lab.lab, "qbt-password", QBT_PASSWORD)
    config = write_config(
        lab.lab,
        f"""
        [plugins]
        enabled = ["natpmp", "qbittorrent"]

        [plugins.natpmp]
        lifetime_s = 4

        [plugins.qbittorrent]
        url = "http://127.0.0.1:{QBT_WEBUI_PORT}"
        username = "{QBT_USER}"
        password_file = "{password_file}"
        reassert_s = 1
        """,
        name="namespace-seedbox.toml",
    )
    text = Path(config).read_text().replace("[tunnel]\n", f'[tunnel]\nnamespace = "{lab.lab.ns("app")}"\n', 1)
    Path(config).write_text(text)
    mark = lab.observer.mark()
    daemon = lab.daemon(env=QUICK, config=config)
    daemon.private_mounts = False
    with daemon:
        daemon.start()
        qbittorrent = start_qbittorrent(lab.lab, port=6881, role="app")

        def on_port(port: int) -> bool:
            return listening_ports(lab.lab, qbittorrent.pid, QBT_WEBUI_PORT, role="app") == {port}

        wait_until(lambda: on_port(40001), "qBittorrent on 40001", 30)
        vpn1, vpn2 = (s.endpoint_v4 for s in lab.lab.servers)
        assert connect(lab.lab, "inet", vpn1, 40001) == "connected", "a peer reaches the client"
        assert daemon.wait_for(lambda s: s["forwarded_port"] == 40001, 10, "the port")["namespace"]

        kill_server(lab.lab, "1")
        daemon.wait_for(lambda s: s["server"] == "vpn2" and s["forwarded_port"] == 40002, 30, "failover")
        wait_until(lambda: on_port(40002), "qBittorrent on 40002", 30)
        assert connect(lab.lab, "inet", vpn2, 40002) == "connected"
        # The host's own services are not behind the tunnel: nothing of the host's is forwarded.
        assert lab.lab.run("client", "nft", "list", "tables").strip() == ""
    leaks = lab.observer.leaks(since=mark)
    assert leaks == [], f"leaked:\n{describe(leaks)}"
