"""The holes an audit found in the lock (issue 11), each shown closed by the ISP's observer.

Link upkeep (DHCP, NDP) may carry data only to where it stays on the link; "LAN" is only what
is on-link; `lock remove` refuses while a daemon keeps the lock; a container's DNS query that
the lock refuses fails at once instead of timing out.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from ipaddress import ip_address

import pytest

from supervisor.config import load_config
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import describe
from supervisor.lab.topology import INTERNET_V4, INTERNET_V6, ISP_V6, LAN_HOST_V4, sh
from supervisor.lock import nft
from supervisor.lock.configured import policy_from_config
from supervisor.servers import Endpoint
from tests.lab.conftest import tunlock_in_client

pytestmark = pytest.mark.lab

# Each snippet runs as root in the client namespace, as a program with CAP_NET_RAW and
# CAP_NET_BIND_SERVICE would, bound to the physical interface so no route can save the lock.
SMUGGLE = textwrap.dedent(
    """
    import socket
    sent = []
    def attempt(name, fn):
        try:
            fn(); sent.append(name)
        except OSError as err:
            print(name, "refused:", err)

    def dhcp4_unicast():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"wan0")
        s.bind(("0.0.0.0", 68))
        s.sendto(b"secret over dhcp", ("203.0.113.100", 67))
        s.sendto(b"secret over dhcp", ("{internet4}", 67))

    def dhcp6_unicast():
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"wan0")
        s.bind(("::", 546))
        s.sendto(b"secret over dhcpv6", ("{internet6}", 547))

    def ns_with_payload():
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"wan0")
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        target = socket.inet_pton(socket.AF_INET6, "{internet6}")
        for kind in (135, 136, 133):  # solicitation, advertisement, router solicitation
            s.sendto(bytes([kind, 0, 0, 0]) + bytes(4) + target + b"secret over ndp", ("{internet6}", 0))

    for name, fn in (("dhcp4", dhcp4_unicast), ("dhcp6", dhcp6_unicast), ("ndp", ns_with_payload)):
        attempt(name, fn)
    print("sent", sent)
    """
).format(internet4=INTERNET_V4, internet6=INTERNET_V6)


def _python_in(lab, role_or_ns: str, code: str, timeout: float = 20) -> str:
    return lab.lab.run(role_or_ns, sys.executable, "-c", code, check=False, timeout=timeout)


def _smuggle_and_count(lab) -> list[dict]:
    mark = lab.observer.mark()
    _python_in(lab, "client", SMUGGLE)
    return lab.observer.leaks(since=mark)


def test_link_upkeep_carries_no_data_off_the_link_with_the_lock_alone(locked):
    leaks = _smuggle_and_count(locked)
    assert leaks == [], f"link upkeep carried data past the lock:\n{describe(leaks)}"


def test_link_upkeep_carries_no_data_off_the_link_with_the_daemon_connected(lab):
    with lab.daemon() as daemon:
        daemon.start()
        leaks = _smuggle_and_count(lab)
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
    assert leaks == [], f"link upkeep carried data past the lock:\n{describe(leaks)}"


@contextlib.contextmanager
def _listener(lab, code: str) -> Iterator[subprocess.Popen]:
    """A receiver in the ISP's namespace that prints what reaches it."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.lab.ns("isp"), sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


DHCP_SERVER = textwrap.dedent(
    """
    import socket, struct, sys
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v4.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"cl0")
    v4.bind(("0.0.0.0", 67))
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    v6.bind(("::", 547))
    group = socket.inet_pton(socket.AF_INET6, "ff02::1:2") + struct.pack("@I", socket.if_nametoindex("cl0"))
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
    print("ready", flush=True)
    for s in (v4, v6):
        s.settimeout(5)
        print(s.recvfrom(100)[0].decode(), flush=True)
    """
)
DHCP_CLIENT = textwrap.dedent(
    """
    import socket
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v4.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"wan0")
    v4.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    v4.bind(("0.0.0.0", 68))
    v4.sendto(b"discover", ("255.255.255.255", 67))
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    v6.bind(("::", 546))
    v6.sendto(b"solicit", ("ff02::1:2%wan0", 547))
    """
)


def test_dhcp_and_neighbour_discovery_still_work_under_the_lock(locked):
    lab = locked
    mark = lab.observer.mark()
    with _listener(lab, DHCP_SERVER) as server:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        _python_in(lab, "client", DHCP_CLIENT)
        received = [server.stdout.readline().strip() for _ in range(2)]
    assert received == ["discover", "solicit"], received
    # Neighbour discovery: forget the router, then let the tunnel's own traffic (marked, to an
    # IPv6 endpoint) find it again. The lab's servers are reached over IPv4: the lock gets the
    # first one's IPv6 endpoint as well.
    endpoint6 = lab.lab.servers[0].endpoint_v6
    config = load_config(lab.lab.config_path, {})
    policy = policy_from_config(config)
    with lab.lab.inside("client"):
        nft.apply(policy.with_endpoints({*policy.endpoints, Endpoint(ip_address(endpoint6), 51820)}))
    lab.lab.run("client", "ip", "-6", "neigh", "flush", "dev", "wan0")
    _python_in(
        lab,
        "client",
        "import socket\n"
        "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_MARK,0xCA6C)\n"
        f"s.sendto(b'\\x01\\0\\0\\0'+bytes(144),({endpoint6!r},51820))\n",
    )
    deadline = time.monotonic() + 5
    while "lladdr" not in (
        neigh := lab.lab.run("client", "ip", "-6", "neigh", "show", ISP_V6, "dev", "wan0")
    ):
        assert time.monotonic() < deadline, f"the router was not resolved: {neigh!r}"
        time.sleep(0.05)
    leaks = lab.observer.leaks(since=mark)
    assert leaks == [], describe(leaks)


# The default private ranges plus the lab's LAN, a documentation range named explicitly (on-link).
LAN_ENV = {
    "TUNLOCK_LOCK_ALLOW_LAN": "true",
    "TUNLOCK_LOCK_LAN_RANGES": "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,fe80::/10,ff02::/16,"
    "192.0.2.0/24,2001:db8:c::/64",
}
OFF_LINK = ("10.9.9.9", "172.16.5.5", "fd99::5")


def test_lan_means_on_link_private_destinations_through_the_gateway_stay_in(lab):
    config = str(lab.lab.config_path)
    result = tunlock_in_client(lab, "lock", "apply", "--config", config, env=LAN_ENV)
    assert result.returncode == 0, result.stderr
    try:
        mark = lab.observer.mark()
        off_link = {
            f"{kind}:{host}": getattr(lab.probes, kind)(host) for host in OFF_LINK for kind in ("tcp", "udp")
        }
        off_link["ping:10.9.9.9"] = lab.probes.ping("10.9.9.9")
        on_link = lab.probes.tcp(LAN_HOST_V4)
        leaks = [e for e in lab.observer.leaks(since=mark) if e["dst"] != LAN_HOST_V4]
    finally:
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
    assert on_link, "allow_lan must let the on-link LAN host answer"
    assert not any(off_link.values()), off_link
    assert leaks == [], f"off-link LAN destinations went out through the gateway:\n{describe(leaks)}"


def test_a_public_or_default_lan_range_is_refused_and_the_lock_left_alone(locked):
    config = str(locked.lab.config_path)
    for ranges in ("0.0.0.0/0", "::/0", "8.8.8.0/24", "10.0.0.0/8,2000::/3"):
        result = tunlock_in_client(
            locked, "lock", "apply", "--config", config, env={"TUNLOCK_LOCK_LAN_RANGES": ranges}
        )
        assert result.returncode == 1, (ranges, result.stdout)
        assert "TUNLOCK_LOCK_LAN_RANGES" in result.stderr and "not a LAN range" in result.stderr, (
            result.stderr
        )
    status = tunlock_in_client(locked, "lock", "status", "--config", config)
    assert status.returncode == 0 and "matches the config" in status.stdout


def test_lock_remove_refuses_while_the_daemon_runs(lab):
    config = str(lab.lab.config_path)
    with lab.daemon() as daemon:
        daemon.start()
        mark = lab.observer.mark()
        pinger = lab.lab.spawn(
            "client", ["ping", "-n", "-q", "-i", "0.002", "-w", "3", "-I", "wan0", INTERNET_V4]
        )
        result = tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
        pinger.wait(10)
        leaks = lab.observer.leaks(since=mark)
        table = lab.lab.run("client", "nft", "list", "tables", check=False)
        still = daemon.status()
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
    assert result.returncode != 0, result.stdout
    assert f"PID {daemon.pid}" in result.stderr and "systemctl stop tunlock" in result.stderr, result.stderr
    assert "inet tunlock" in table
    assert still is not None and still["state"] == "connected"
    assert leaks == [], describe(leaks)


def test_lock_remove_goes_ahead_when_the_daemon_left_a_stale_socket(lab):
    config = str(lab.lab.config_path)
    with lab.daemon() as daemon:
        daemon.start()
        daemon.kill()  # a crash leaves the socket file behind, nobody listening
    assert (lab.lab.dir / "control.sock").exists()
    result = tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "inet tunlock" not in lab.lab.run("client", "nft", "list", "tables", check=False)


CONTAINER_DNS = textwrap.dedent(
    """
    import socket
    for host in ({v4!r}, {v6!r}):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(family, kind)
            s.settimeout(4)
            try:
                s.connect((host, 53))
                if kind == socket.SOCK_DGRAM:
                    s.send(bytes(20))
                    s.recv(100)
                print("answered")
            except ConnectionRefusedError:
                print("refused")
            except OSError as err:
                print(type(err).__name__)
    """
).format(v4=INTERNET_V4, v6=INTERNET_V6)


@contextlib.contextmanager
def container_behind_the_client(lab) -> Iterator[str]:
    """A namespace routed through the client, as a container on a bridge is."""
    ns = lab.lab.ns("ctr")
    client = lab.lab.ns("client")
    sh("ip", "netns", "add", ns)
    try:
        sh(
            "ip",
            "-batch",
            "-",
            input=f"link add ctr0 netns {client} type veth peer name eth0 netns {ns}\n",
        )
        for argv in (
            ("-n", client, "addr", "add", "10.88.0.1/24", "dev", "ctr0"),
            ("-n", client, "addr", "add", "fd88::1/64", "dev", "ctr0", "nodad"),
            ("-n", client, "link", "set", "ctr0", "up"),
            ("-n", ns, "link", "set", "lo", "up"),
            ("-n", ns, "link", "set", "eth0", "up"),
            ("-n", ns, "addr", "add", "10.88.0.2/24", "dev", "eth0"),
            ("-n", ns, "addr", "add", "fd88::2/64", "dev", "eth0", "nodad"),
            ("-n", ns, "route", "add", "default", "via", "10.88.0.1"),
            ("-n", ns, "-6", "route", "add", "default", "via", "fd88::1"),
        ):
            sh("ip", *argv)
        lab.lab.run("client", "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        yield ns
    finally:
        lab.lab.run("client", "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
        sh("ip", "-n", client, "link", "del", "ctr0", check=False)
        sh("ip", "netns", "del", ns, check=False)


def test_a_containers_dns_query_is_refused_at_once_not_left_to_time_out(lab):
    config = str(lab.lab.config_path)
    with container_behind_the_client(lab) as ns:
        # Applied once the container's link is up: the lock reads the on-link subnets then, and
        # the client answers the container's neighbour solicitations only within them.
        assert tunlock_in_client(lab, "lock", "apply", "--config", config).returncode == 0
        try:
            mark = lab.observer.mark()
            answers = _python_in(lab, ns, CONTAINER_DNS).split()
            leaks = lab.observer.leaks(since=mark)
        finally:
            tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
    # Refused (a reset or an unreachable reached the container), never a time-out.
    assert answers == ["refused"] * 4, answers
    assert leaks == [], describe(leaks)


def _wait_for_relink(daemon: LabDaemon, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sum("lock applied again" in line for line in daemon.log_events()) < count:
        assert time.monotonic() < deadline, f"the lock did not follow the links:\n{daemon.log_tail()}"
        time.sleep(0.05)


def test_the_daemon_follows_on_link_subnets_as_they_come_and_go(lab):
    """A subnet that becomes on-link is let in; once it is gone its addresses, now routed
    through the gateway, are refused again (the guard applies the lock after route changes).
    Pings are bound to the physical interface: the daemon's routing would otherwise carry them
    through the tunnel."""
    client, isp = lab.lab.ns("client"), lab.lab.ns("isp")
    sh("ip", "-n", isp, "addr", "add", "10.9.9.9/24", "dev", "cl0")
    try:
        with lab.daemon(env=LAN_ENV) as daemon:
            daemon.start()
            mark = lab.observer.mark()
            before = lab.probes.ping("10.9.9.9", interface="wan0")
            leaks_before = lab.observer.leaks(since=mark)
            sh("ip", "-n", client, "addr", "add", "10.9.9.2/24", "dev", "wan0")
            try:
                _wait_for_relink(daemon, 1)
                while_on_link = lab.probes.ping("10.9.9.9", interface="wan0")
            finally:
                sh("ip", "-n", client, "addr", "del", "10.9.9.2/24", "dev", "wan0")
            _wait_for_relink(daemon, 2)
            mark = lab.observer.mark()
            after = lab.probes.ping("10.9.9.9", interface="wan0")
            leaks_after = lab.observer.leaks(since=mark)
            status = daemon.status()
    finally:
        sh("ip", "-n", isp, "addr", "del", "10.9.9.9/24", "dev", "cl0", check=False)
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
    assert not before and leaks_before == [], describe(leaks_before)
    assert while_on_link, "an on-link LAN subnet must be reachable once it appears"
    assert not after and leaks_after == [], describe(leaks_after)
    assert status is not None and status["state"] == "connected"
