"""Namespace mode (``tunnel.namespace``): only the programs inside go through the tunnel.

The lab's client namespace stands for the host; the daemon creates the app namespace
``tlab<id>-app`` from there and keeps the tunnel in it. The app's probes (every kind, IPv4 and
IPv6, DNS to the ISP's resolver) run from inside through start, failover, SIGKILL and restart,
and stop: the ISP's observer sees none of them outside the tunnel. The host meanwhile reaches the
internet directly, with no lock, rule or resolver of tunlock's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from supervisor.lab.daemon import LabDaemon
from supervisor.lab.faults import kill_server
from supervisor.lab.probes import INTERNET_V4, INTERNET_V6, Probes, describe
from tests.lab.conftest import LabUnderTest

pytestmark = pytest.mark.lab(servers=2, per_test=True)


@pytest.fixture
def app_daemon(lab: LabUnderTest) -> Iterator[LabDaemon]:
    """The lab's daemon with ``namespace = "tlab<id>-app"``, not started yet."""
    config = lab.lab.dir / "namespace.toml"
    text = lab.lab.config_path.read_text()
    config.write_text(text.replace("[tunnel]\n", f'[tunnel]\nnamespace = "{lab.lab.ns("app")}"\n', 1))
    running = lab.daemon(env={"TUNLOCK_HEALTH_DEAD_AFTER_S": "2"}, config=str(config))
    running.private_mounts = False
    try:
        yield running
    finally:
        running.stop()


def nothing_left_the_app(lab: LabUnderTest, app: Probes) -> dict[str, bool]:
    """Every probe kind from inside the app namespace; the observer must record none of them."""
    mark = lab.observer.mark()
    answered = app.every_kind()
    leaks = lab.observer.leaks(since=mark)
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

    # The host is left alone: direct, no lock table, no tunnel rules, its own resolver.
    assert host.tcp(INTERNET_V4) and host.ping(INTERNET_V6) and host.dns_udp()
    assert lab.lab.run("client", "nft", "list", "tables").strip() == ""
    assert "lookup 51820" not in lab.lab.run("client", "ip", "rule")

    # Failover: the first server dies; the app's probes never leave outside the tunnel.
    mark = lab.observer.mark()
    kill_server(lab.lab, "1")
    app.every_kind()
    status = app_daemon.wait_for(lambda s: s["state"] == "connected" and s["server"] == "vpn2", 20, "vpn2")
    assert app.tcp(INTERNET_V4)
    leaks = lab.observer.leaks(since=mark)
    assert leaks == [], f"leaked during the failover:\n{describe(leaks)}"

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
