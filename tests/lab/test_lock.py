"""The lock in the lab, judged by the ISP's observer: nothing leaves outside the tunnel."""

from __future__ import annotations

import select
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.lab.probes import describe
from supervisor.lab.topology import INTERNET_V4, INTERNET_V6, ISP_V4, LAN_HOST_V4, TUNNEL_SERVER_V4, sh
from supervisor.lock.configured import policy_from_config
from tests.lab.conftest import tunlock_in_client
from tests.lab.hand_tunnel import hand_tunnel

pytestmark = pytest.mark.lab


def test_lock_alone_leaks_nothing_for_every_probe_kind(locked):
    mark = locked.observer.mark()
    answered = locked.probes.every_kind()
    leaks = locked.observer.leaks(since=mark)
    assert not any(answered[k] for k in answered if k != "udp-to-endpoint"), answered
    assert leaks == [], f"leaked with the lock alone:\n{describe(leaks)}"


def test_lock_status_reports_installed_and_matching(locked):
    result = tunlock_in_client(locked, "lock", "status", "--config", str(locked.lab.config_path))
    assert result.returncode == 0
    assert "installed" in result.stdout and "matches the config" in result.stdout


def test_lock_refuses_outside_a_lab_namespace(lab):
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "lock", "apply", "--config", str(lab.lab.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TUNLOCK_LAB_ONLY": "1", "PATH": "/usr/sbin:/usr/bin"},
    )
    assert result.returncode == 1
    assert "refusing to install a lock here" in result.stderr


def test_lock_with_a_tunnel_lets_the_tunnel_work_and_blocks_the_rest(locked):
    with hand_tunnel(locked.lab, server=1):
        mark = locked.observer.mark()
        works = {
            "icmp4": locked.probes.ping(INTERNET_V4),
            "icmp6": locked.probes.ping(INTERNET_V6),
            "tcp4": locked.probes.tcp(INTERNET_V4),
            "tcp6": locked.probes.tcp(INTERNET_V6),
            "dns-tunnel-resolver": locked.probes.dns_udp(TUNNEL_SERVER_V4),
        }
        blocked = {
            "dns-udp-isp": locked.probes.dns_udp(ISP_V4),
            "dns-tcp-isp": locked.probes.dns_tcp(ISP_V4),
            "dns-udp-lan": locked.probes.dns_udp(LAN_HOST_V4),
            "icmp4-bound-to-wan0": locked.probes.ping(INTERNET_V4, interface="wan0"),
            "udp-to-endpoint": False,
        }
        locked.probes.udp_to_endpoint(2)
        leaks = locked.observer.leaks(since=mark)
    assert all(works.values()), works
    assert not any(blocked.values()), blocked
    assert leaks == [], describe(leaks)


def test_allow_lan_opens_the_lan_and_nothing_else(lab):
    env = {"TUNLOCK_LOCK_ALLOW_LAN": "true"}
    assert (
        tunlock_in_client(lab, "lock", "apply", "--config", str(lab.lab.config_path), env=env).returncode == 0
    )
    try:
        mark = lab.observer.mark()
        lan = lab.probes.tcp(LAN_HOST_V4)
        lan_dns = lab.probes.dns_udp(LAN_HOST_V4)
        internet = lab.probes.tcp(INTERNET_V4) or lab.probes.ping(INTERNET_V4)
        leaks = [e for e in lab.observer.leaks(since=mark) if e["dst"] != LAN_HOST_V4]
    finally:
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
    assert lan, "allow_lan must let the LAN host answer"
    assert not lan_dns, "DNS to a LAN resolver stays blocked even with allow_lan"
    assert not internet
    assert leaks == [], describe(leaks)


def test_inbound_tcp_from_the_lan_only(lab):
    env = {"TUNLOCK_LOCK_INBOUND_TCP": "8080"}
    assert (
        tunlock_in_client(lab, "lock", "apply", "--config", str(lab.lab.config_path), env=env).returncode == 0
    )
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.lab.ns("client"),
            sys.executable,
            "-c",
            "import socket;s=socket.create_server(('0.0.0.0',8080));print('listening',flush=True)\n"
            "while True:\n c,_=s.accept();c.sendall(b'webui');c.close()",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 10)
        assert ready and server.stdout.readline() == "listening\n", "the web UI stand-in did not listen"
        from_lan = _connect(lab, "isp", "192.0.2.2", 8080, source=LAN_HOST_V4)
        from_internet = _connect(lab, "inet", "192.0.2.2", 8080)
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
    assert from_lan == "webui"
    assert from_internet == ""


def test_endpoint_swap_under_traffic_never_leaks(locked):
    from supervisor.lock import nft

    config = load_config(Path(locked.lab.config_path), {})
    policy = policy_from_config(config, servers=[config.servers[0]])
    done = threading.Event()
    swaps = 0

    def swap_back_and_forth() -> None:
        nonlocal swaps
        with locked.lab.inside("client"):
            nft.apply(policy)
            current = policy.endpoints
            for server in config.servers * 5:
                nft.swap_endpoints(policy, current, frozenset({server.endpoint}))
                current = frozenset({server.endpoint})
                swaps += 1
        done.set()

    with hand_tunnel(locked.lab, server=1):
        mark = locked.observer.mark()
        pinger = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                locked.lab.ns("client"),
                "ping",
                "-n",
                "-q",
                "-i",
                "0.01",
                "-w",
                "3",
                INTERNET_V4,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        worker = threading.Thread(target=swap_back_and_forth)
        worker.start()
        worker.join(30)
        pinger.wait(10)
        leaks = locked.observer.leaks(since=mark)
    assert done.is_set() and swaps == 15
    assert leaks == [], describe(leaks)
    table = sh(
        "ip", "netns", "exec", locked.lab.ns("client"), "nft", "list", "set", "inet", "tunlock", "endpoints4"
    )
    assert config.servers[-1].endpoint.host.exploded in table


def _connect(lab, role: str, host: str, port: int, source: str | None = None) -> str:
    code = (
        "import socket,sys\n"
        "s=socket.socket();s.settimeout(1)\n" + (f"s.bind(({source!r},0))\n" if source else "") + "try:\n"
        f" s.connect(({host!r},{port}));print(s.recv(16).decode(),end='')\n"
        "except OSError:\n pass\n"
    )
    return sh("ip", "netns", "exec", lab.lab.ns(role), sys.executable, "-c", code, check=False)


def without_protocols(lab, *argv: str) -> str:
    """Run a command in the client's namespace with /etc/protocols hidden (a private mount)."""
    empty = lab.lab.dir / "empty-protocols"
    empty.write_text("")
    script = 'mount --bind "$0" /etc/protocols && exec "$@"'
    client = lab.lab.ns("client")
    return sh("ip", "netns", "exec", client, "unshare", "-m", "sh", "-c", script, str(empty), *argv)


def test_every_rule_loads_without_etc_protocols(lab, tmp_path):
    """The whole lock, every optional part on (LAN, inbound ports, tunnel inbound, both families),
    checked by nft with no /etc/protocols: names must be ones nft knows by itself."""
    from ipaddress import ip_network

    from msgspec.structs import replace

    from supervisor.lock.render import render, render_owned

    policy = policy_from_config(load_config(lab.lab.config_path, {}))
    policy = replace(
        policy,
        allow_lan=True,
        inbound_tcp=(8080,),
        onlink=(ip_network("192.0.2.0/24"), ip_network("2001:db8:c::/64")),
    )
    policy = policy.with_tunnel_inbound((("tcp", 51413), ("udp", 51413)))
    script = tmp_path / "lock.nft"
    script.write_text(render(policy) + render_owned(policy).replace("flags owner", ""))
    without_protocols(lab, "nft", "-c", "-f", str(script))


def test_exported_boot_file_loads_in_a_fresh_namespace_and_blocks(lab, tmp_path):
    exported = tmp_path / "lock.nft"
    unit = tmp_path / "tunlock-lock.service"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor.cli",
            "lock",
            "export",
            "--config",
            str(lab.lab.config_path),
            "--output",
            str(exported),
            "--systemd-unit",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Before=network-pre.target" in unit.read_text() and f"-f {exported}" in unit.read_text()
    # Loaded as at boot on a minimal system: Debian's minbase has no /etc/protocols (netbase), and
    # a protocol name nft cannot resolve would leave the host unlocked.
    without_protocols(lab, "nft", "-f", str(exported))
    try:
        mark = lab.observer.mark()
        assert not lab.probes.ping(INTERNET_V4) and not lab.probes.dns_udp(ISP_V4)
        assert lab.observer.leaks(since=mark) == []
    finally:
        sh("ip", "netns", "exec", lab.lab.ns("client"), "nft", "delete", "table", "inet", "tunlock")
