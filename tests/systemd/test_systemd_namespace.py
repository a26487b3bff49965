"""Namespace mode under a real systemd: a seedbox whose torrent client alone is behind the tunnel.

Debian 12 booted in the lab's client namespace (its "host"), tunlock installed by `tunlock systemd
install` with ``tunnel.namespace``, and Debian's own ``qbittorrent-nox@seed.service`` joined to
the namespace by `tunlock systemd join`. NAT-PMP through the tunnel forwards a port, tunlock
pushes it to qBittorrent's web API on the namespace's loopback; after a failover qBittorrent
listens on the new port and a peer on the internet reaches it. The host's own traffic goes out
directly, untouched; the ISP's observer sees nothing of the namespace outside the tunnel.
"""

from __future__ import annotations

import pytest

from supervisor.lab import faults
from supervisor.lab.probes import describe
from supervisor.lab.topology import INTERNET_V4
from tests.lab.conftest import LabUnderTest
from tests.lab.seedbox import connect, start_gateways
from tests.lab.torrent_clients import QBT_PASSWORD, QBT_USER, QBT_WEBUI_PORT, _pbkdf2
from tests.systemd.conftest import TEST_DROP_IN, lab_config
from tests.systemd.machine import PYTHON, BootedSystem

pytestmark = pytest.mark.systemd

QBT_CONFIG = (
    "[LegalNotice]\nAccepted=true\n\n"
    "[BitTorrent]\nSession\\Port=6881\nSession\\DHTEnabled=false\nSession\\LSDEnabled=false\n"
    "Session\\PeXEnabled=false\n\n"
    "[Preferences]\nConnection\\UPnP=false\n"
    f"WebUI\\Port={QBT_WEBUI_PORT}\nWebUI\\Address=127.0.0.1\n"
    f"WebUI\\Username={QBT_USER}\nWebUI\\Password_PBKDF2={{password}}\n"
    "WebUI\\LocalHostAuth=true\nWebUI\\UPnP=false\n"
)


def qbittorrent_ports(system: BootedSystem, namespace: str) -> set[int]:
    """TCP ports qbittorrent-nox listens on inside the namespace, its web UI's left out."""
    out = system.sh("ip", "netns", "exec", namespace, "ss", "-ltnpH", check=False).stdout
    ports = set()
    for line in out.splitlines():
        if "qbittorrent" in line:
            port = int(line.split()[3].rsplit(":", 1)[1])
            if port != QBT_WEBUI_PORT:
                ports.add(port)
    return ports


def test_qbittorrent_joined_to_the_namespace_follows_the_forwarded_port_the_host_stays_direct(
    lab: LabUnderTest, system: BootedSystem
) -> None:
    namespace = lab.lab.ns("app")
    config = lab_config(lab.lab).replace("[tunnel]\n", f'[tunnel]\nnamespace = "{namespace}"\n', 1)
    config += (
        '\n[plugins]\nenabled = ["natpmp", "qbittorrent"]\n\n[plugins.natpmp]\nlifetime_s = 4\n'
        "\n[plugins.qbittorrent]\n"
        f'url = "http://127.0.0.1:{QBT_WEBUI_PORT}"\nusername = "{QBT_USER}"\n'
        'password_file = "/etc/tunlock/qbittorrent.secret"\nreassert_s = 1\n'
        'api_user = "seed"\n'  # qbittorrent-nox@seed runs as seed: its API may get the password
    )
    system.write("/etc/tunlock/tunlock.toml", config, 0o600)
    system.write("/etc/tunlock/qbittorrent.secret", QBT_PASSWORD + "\n", 0o600)
    # The fixture installed whole-host mode: uninstalled first, as an administrator switching would.
    uninstalled = system.offline(PYTHON, "-m", "supervisor.cli", "systemd", "uninstall")
    assert uninstalled.returncode == 0, uninstalled.stderr
    installed = system.offline(PYTHON, "-m", "supervisor.cli", "systemd", "install")
    assert installed.returncode == 0, installed.stderr
    assert "tunlock-lock.service" not in installed.stdout  # no boot lock: it would lock the host
    system.write("/etc/systemd/system/tunlock.service.d/test.conf", TEST_DROP_IN)
    # Debian's own unit, run as the user "seed", joined to the namespace the way a user would.
    assert system.offline("useradd", "--create-home", "seed").returncode == 0
    qbt_config = QBT_CONFIG.format(password=_pbkdf2(QBT_PASSWORD))
    system.write("/home/seed/.config/qBittorrent/qBittorrent.conf", qbt_config)
    assert system.offline("chown", "-R", "seed:seed", "/home/seed").returncode == 0
    joined = system.offline(PYTHON, "-m", "supervisor.cli", "systemd", "join", "qbittorrent-nox@seed")
    assert joined.returncode == 0, joined.stderr
    enabled = system.offline("systemctl", "enable", "qbittorrent-nox@seed.service")
    assert enabled.returncode == 0, enabled.stderr
    start_gateways(lab.lab, {1: 40001, 2: 40002})

    mark = lab.observer.mark()
    system.boot()
    status = system.wait_for(
        "the port forwarded", lambda: (s := system.status())["forwarded_port"] == 40001 and s, 60
    )
    assert status["namespace"] == namespace and status["server"] == "vpn1"
    system.wait_for("qBittorrent on 40001", lambda: qbittorrent_ports(system, namespace) == {40001}, 60)
    assert system.show("qbittorrent-nox@seed.service", "NetworkNamespacePath")["NetworkNamespacePath"] == (
        f"/run/netns/{namespace}"
    )
    vpn1, vpn2 = (s.endpoint_v4 for s in lab.lab.servers)
    assert connect(lab.lab, "inet", vpn1, 40001) == "connected", "a peer reaches qBittorrent"

    faults.kill_server(lab.lab, "1")
    system.wait_for("the failover", lambda: system.status()["forwarded_port"] == 40002, 60)
    system.wait_for("qBittorrent on 40002", lambda: qbittorrent_ports(system, namespace) == {40002}, 60)
    assert connect(lab.lab, "inet", vpn2, 40002) == "connected"
    # The host is not locked: its own packets (a resolver query, NTP) may pass; none of the
    # namespace's, whose only addresses are the tunnel's, may appear outside it.
    tunnel_addresses = {"10.99.0.2", "fd00:99::2"}
    leaks = [e for e in lab.observer.leaks(since=mark) if e["src"] in tunnel_addresses]
    assert leaks == [], f"the namespace leaked:\n{describe(leaks)}"

    # The host's own traffic is untouched: straight out, no table of tunlock's in it.
    direct = system.sh("python3", "-c", f"import socket; socket.create_connection(('{INTERNET_V4}', 80), 2)")
    assert direct.returncode == 0
    assert system.sh("nft", "list", "tables").stdout.strip() == ""
