"""What tunlock trusts must not draw tunnel traffic elsewhere (issue 21): a LAN whose range
holds the tunnel's addresses, a server file without an IPv6 address, a rogue router
advertisement, a DHCP client rewriting resolv.conf. Each shown by the ISP's observer or by
what a program in the client sees.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.lab.probes import describe
from supervisor.lab.topology import (
    CLIENT_V6,
    INTERNET_V6,
    ISP_V4,
    TUNNEL_CLIENT_V4,
    TUNNEL_CLIENT_V6,
    TUNNEL_SERVER_V4,
    sh,
)
from tests.lab.conftest import tunlock_in_client

pytestmark = pytest.mark.lab(servers=1, per_test=True)

LAN_ENV = {
    "TUNLOCK_LOCK_ALLOW_LAN": "true",
    "TUNLOCK_LOCK_LAN_RANGES": "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,fe80::/10,ff02::/16,"
    "192.0.2.0/24,2001:db8:c::/64",
}


def _python_in(lab, role_or_ns: str, code: str, timeout: float = 20) -> str:
    return lab.lab.run(role_or_ns, sys.executable, "-c", code, check=False, timeout=timeout)


def _wait(what: str, done, timeout: float = 20.0, detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what}:\n{detail()}"
        time.sleep(0.05)


# --- item 4: a LAN whose range holds the tunnel's addresses --------------------------------------

NATPMP_REQUEST = textwrap.dedent(
    """
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(bytes([0, 0]), ({gateway!r}, 5351))  # NAT-PMP: what is the public address?
    try:
        s.recv(64); print("answered")
    except OSError as err:
        print(type(err).__name__)
    """
).format(gateway=TUNNEL_SERVER_V4)


def test_a_lan_that_overlaps_the_tunnel_does_not_draw_the_tunnels_traffic(lab):
    """The LAN (a hostile DHCP server, say) numbers itself from 10.99.0.0/16, the tunnel's
    inner range, and a LAN host answers for the server's inner address 10.99.0.1: the tunnel's
    gateway, resolver and NAT-PMP gateway still go through the tunnel, nothing leaves."""
    client, isp = lab.lab.ns("client"), lab.lab.ns("isp")
    sh("ip", "-n", isp, "addr", "add", f"{TUNNEL_SERVER_V4}/16", "dev", "cl0")
    try:
        with lab.daemon(env=LAN_ENV) as daemon:
            daemon.start()
            sh("ip", "-n", client, "addr", "add", "10.99.5.5/16", "dev", "wan0")
            _wait(
                "the lock did not follow the new LAN",
                lambda: any("lock applied again" in line for line in daemon.log_events()),
                detail=daemon.log_tail,
            )
            mark = lab.observer.mark()
            answered = {
                "ping gateway": lab.probes.ping(TUNNEL_SERVER_V4),
                "dns udp": lab.probes.dns_udp(TUNNEL_SERVER_V4),
                "dns tcp": lab.probes.dns_tcp(TUNNEL_SERVER_V4),
            }
            _python_in(lab, "client", NATPMP_REQUEST)
            leaks = lab.observer.leaks(since=mark)
            route = lab.lab.run("client", "ip", "route", "get", TUNNEL_SERVER_V4)
            status = daemon.status()
    finally:
        sh("ip", "-n", isp, "addr", "del", f"{TUNNEL_SERVER_V4}/16", "dev", "cl0", check=False)
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
    assert leaks == [], f"the tunnel's traffic went to the LAN:\n{describe(leaks)}"
    assert f"dev {lab.lab.client_ifname}" in route, route
    assert all(answered.values()), f"the tunnel's server must answer through the tunnel: {answered}"
    assert status is not None and status["state"] == "connected"


def test_with_the_lock_alone_the_tunnels_addresses_are_not_lan(lab):
    """No daemon, so no routing: the main table sends 10.99.0.1 to the overlapping LAN, and the
    lock, not the routes, must refuse it (its LAN sets leave out the tunnel's own addresses,
    here the server's resolver and the client's tunnel address)."""
    client, isp = lab.lab.ns("client"), lab.lab.ns("isp")
    config = str(lab.lab.config_path)
    sh("ip", "-n", isp, "addr", "add", f"{TUNNEL_SERVER_V4}/16", "dev", "cl0")
    sh("ip", "-n", isp, "addr", "add", "10.99.0.9/16", "dev", "cl0")  # a LAN host of that range
    sh("ip", "-n", client, "addr", "add", "10.99.5.5/16", "dev", "wan0")
    try:
        result = tunlock_in_client(lab, "lock", "apply", "--config", config, env=LAN_ENV)
        assert result.returncode == 0, result.stderr
        mark = lab.observer.mark()
        answered = {
            "ping": lab.probes.ping(TUNNEL_SERVER_V4),
            "dns": lab.probes.dns_udp(TUNNEL_SERVER_V4),
            "tcp": lab.probes.tcp(TUNNEL_SERVER_V4, 53),
        }
        _python_in(lab, "client", NATPMP_REQUEST)
        on_the_lan = lab.probes.ping("10.99.0.9")  # the rest of the LAN range stays LAN
        leaks = [e for e in lab.observer.leaks(since=mark) if e["dst"] != "10.99.0.9"]
    finally:
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
        sh("ip", "-n", isp, "addr", "del", f"{TUNNEL_SERVER_V4}/16", "dev", "cl0", check=False)
        sh("ip", "-n", isp, "addr", "del", "10.99.0.9/16", "dev", "cl0", check=False)
        sh("ip", "-n", client, "addr", "del", "10.99.5.5/16", "dev", "wan0", check=False)
    assert leaks == [], f"the tunnel's addresses went to the LAN:\n{describe(leaks)}"
    assert not any(answered.values()), answered
    assert on_the_lan, "allow_lan must still let the rest of the overlapping LAN answer"


LISTENER = textwrap.dedent(
    """
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080))
    s.listen()
    while True:
        conn, _ = s.accept()
        conn.sendall(b"hello through the tunnel")
        conn.close()
    """
)
PEER_IN_THE_LAN_RANGE = "10.99.0.7"
CONNECT_FROM_THE_SERVER = textwrap.dedent(
    """
    import socket
    s = socket.socket()
    s.settimeout(3)
    s.bind(({peer!r}, 0))
    try:
        s.connect(({client!r}, 8080)); print(s.recv(100).decode())
    except OSError as err:
        print(type(err).__name__)
    """
).format(peer=PEER_IN_THE_LAN_RANGE, client=TUNNEL_CLIENT_V4)


@contextlib.contextmanager
def _tunnel_peer_in_the_lan_range(lab) -> Iterator[None]:
    """A peer on the tunnel's far side at 10.99.0.7, the LAN grown to 10.99.0.0/16 (the ISP
    answering for that address on the link), a listener on 8080 in the client, and the daemon
    connected with 8080 open on the tunnel, its lock following the new LAN."""
    client, isp = lab.lab.ns("client"), lab.lab.ns("isp")
    server = lab.lab.servers[0]
    lab.lab.run(server.ns, "ip", "addr", "add", f"{PEER_IN_THE_LAN_RANGE}/24", "dev", server.ifname)
    sh("ip", "-n", isp, "addr", "add", f"{PEER_IN_THE_LAN_RANGE}/16", "dev", "cl0")
    listener = lab.lab.spawn("client", [sys.executable, "-c", LISTENER])
    try:
        with lab.daemon(env={**LAN_ENV, "TUNLOCK_LOCK_TUNNEL_INBOUND_TCP": "8080"}) as daemon:
            daemon.start()
            sh("ip", "-n", client, "addr", "add", "10.99.5.5/16", "dev", "wan0")
            _wait(
                "the lock did not follow the new LAN",
                lambda: any("lock applied again" in line for line in daemon.log_events()),
                detail=daemon.log_tail,
            )
            yield
    finally:
        listener.kill()
        listener.wait(5)
        sh("ip", "-n", isp, "addr", "del", f"{PEER_IN_THE_LAN_RANGE}/16", "dev", "cl0", check=False)
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))


def test_replies_to_a_connection_through_the_tunnel_go_back_through_it(lab):
    """A peer on the tunnel's far side, 10.99.0.7, inside the overlapping LAN's range, connects
    to a port the lock opens on the tunnel: the client's SYN-ACK (from its tunnel address) used to
    follow the LAN route out of the physical interface."""
    with _tunnel_peer_in_the_lan_range(lab):
        mark = lab.observer.mark()
        answer = _python_in(lab, lab.lab.servers[0].ns, CONNECT_FROM_THE_SERVER).strip()
        leaks = lab.observer.leaks(since=mark)
    assert leaks == [], f"a reply to a tunnel connection went to the LAN:\n{describe(leaks)}"
    assert answer == "hello through the tunnel", answer


def test_without_the_reply_route_the_lock_still_keeps_the_reply_off_the_lan(lab):
    """The same connection after another tool deleted the rule that routes the tunnel
    address's packets into the tunnel: the reply follows the LAN route, and the lock refuses it
    (the connection fails; nothing leaves)."""
    with _tunnel_peer_in_the_lan_range(lab):
        sh("ip", "-n", lab.lab.ns("client"), "rule", "del", "from", TUNNEL_CLIENT_V4, "priority", "32759")
        mark = lab.observer.mark()
        answer = _python_in(lab, lab.lab.servers[0].ns, CONNECT_FROM_THE_SERVER).strip()
        leaks = lab.observer.leaks(since=mark)
    assert leaks == [], f"a reply to a tunnel connection went to the LAN:\n{describe(leaks)}"
    assert answer != "hello through the tunnel", answer


# --- item 5: a server without an IPv6 address ---------------------------------------------------

# Counts, on the server's tunnel interface, the IPv6 packets whose source is the client's
# physical (global) address, until the marker datagram (IPv4, after the client's attempts)
# arrives through the same tunnel.
SERVER_CAPTURE = textwrap.dedent(
    """
    import socket
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    s.bind(({ifname!r}, 0))
    s.settimeout(15)
    host_source = socket.inet_pton(socket.AF_INET6, {client_v6!r})
    seen = 0
    print("ready", flush=True)
    while True:
        packet = s.recv(2048)
        if packet[0] >> 4 == 6 and packet[8:24] == host_source:
            seen += 1
        if packet[0] >> 4 == 4 and packet.endswith(b"end of the attempts"):
            break
    print("seen", seen, flush=True)
    """
)
V6_ATTEMPTS = textwrap.dedent(
    """
    import errno, socket
    results = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6, kind)
        s.settimeout(5)
        try:
            if kind == socket.SOCK_STREAM:
                s.connect(({target!r}, 80))
            else:
                s.sendto(b"from the host's own address", ({target!r}, 7))
            results.append("sent")
        except OSError as err:
            results.append(errno.errorcode.get(err.errno or 0, type(err).__name__))
    marker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    marker.sendto(b"end of the attempts", ({server!r}, 9))
    print(" ".join(results))
    """
).format(target=INTERNET_V6, server=TUNNEL_SERVER_V4)


@contextlib.contextmanager
def _capture_on_server(lab) -> Iterator[subprocess.Popen]:
    server = lab.lab.servers[0]
    code = SERVER_CAPTURE.format(ifname=server.ifname, client_v6=CLIENT_V6)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", server.ns, sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


def test_a_server_without_ipv6_gets_no_ipv6_from_the_hosts_own_address(lab):
    """A wg-quick file with only an IPv4 Address and AllowedIPs = ::/0: IPv6 fails at once in
    the client (unreachable), and the server sees no packet from the host's global address.
    The server is told to accept any IPv6 source from the client, so that what the client sends
    reaches its tunnel interface instead of being dropped by its allowed IPs."""
    server = lab.lab.servers[0]
    conf = lab.lab.dir / "servers" / f"{server.name}.conf"
    conf.write_text(
        conf.read_text().replace(f"{TUNNEL_CLIENT_V4}/32, {TUNNEL_CLIENT_V6}/128", f"{TUNNEL_CLIENT_V4}/32")
    )
    client_public = sh("wg", "pubkey", input=(lab.lab.dir / "client.key").read_text()).strip()
    lab.lab.run(
        server.ns,
        "wg",
        "set",
        server.ifname,
        "peer",
        client_public,
        "allowed-ips",
        f"{TUNNEL_CLIENT_V4}/32,::/0",
    )
    try:
        with lab.daemon() as daemon:
            daemon.start()
            mark = lab.observer.mark()
            with _capture_on_server(lab) as capture:
                attempts = _python_in(lab, "client", V6_ATTEMPTS).split()
                assert capture.stdout is not None
                seen = capture.stdout.readline().strip()
            leaks = lab.observer.leaks(since=mark)
    finally:
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
    assert seen == "seen 0", f"the server got IPv6 from the host's own address ({seen})"
    # Refused by the route at once: IPv6's unreachable route answers EHOSTUNREACH.
    unreachable = {errno.errorcode[errno.ENETUNREACH], errno.errorcode[errno.EHOSTUNREACH]}
    assert len(attempts) == 2 and set(attempts) <= unreachable, attempts
    assert leaks == [], describe(leaks)


# --- item 6: a rogue router advertisement -------------------------------------------------------

# Sent from the ISP's side of the link, as any LAN peer can: hop limit 255 from a link-local
# source, a prefix information option announcing 2000::/3 on-link (L set, A clear) and a router
# lifetime of 0, so the client adds the on-link route and no default route.
ROGUE_RA = textwrap.dedent(
    """
    import socket, struct
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"cl0")
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex("cl0"))
    header = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 0, 0, 0)  # the kernel fills the checksum
    announced = socket.inet_pton(socket.AF_INET6, "2000::")
    prefix = struct.pack("!BBBBIII", 3, 4, 3, 0x80, 3600, 3600, 0) + announced
    s.sendto(header + prefix, ("ff02::1", 0, 0, socket.if_nametoindex("cl0")))
    """
)
# A neighbour solicitation with data, to a global address, bound to the physical link.
NS_WITH_DATA = textwrap.dedent(
    """
    import socket
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"wan0")
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    target = socket.inet_pton(socket.AF_INET6, {internet6!r})
    for _ in range(3):
        try:
            s.sendto(bytes([135, 0, 0, 0]) + bytes(4) + target + b"secret over ndp", ({internet6!r}, 0))
        except OSError as err:
            print("refused:", err)
    """
).format(internet6=INTERNET_V6)


def _mac(lab, role: str, ifname: str) -> str:
    return lab.lab.run(role, "cat", f"/sys/class/net/{ifname}/address").strip()


def test_a_rogue_router_advertisement_does_not_reopen_neighbour_discovery(lab):
    """A real RA (sent by a raw socket in the ISP's namespace, processed by the client's kernel)
    puts 2000::/3 on-link; the hostile router has answered for the internet host's address (its
    answer stands as a neighbour entry with the router's MAC, so no proxy's delay races the
    observer). The lock, applied after the RA, must not let a solicitation carrying data to that
    global address out."""
    client = lab.lab.ns("client")
    config = str(lab.lab.config_path)
    assert tunlock_in_client(lab, "lock", "apply", "--config", config).returncode == 0
    router_mac = _mac(lab, "isp", "cl0")
    try:
        _python_in(lab, "isp", ROGUE_RA)
        _wait(
            "the client did not take the RA's on-link prefix",
            lambda: "2000::/3" in sh("ip", "-n", client, "-6", "route", "show", "dev", "wan0"),
            detail=lambda: sh("ip", "-n", client, "-6", "route"),
        )
        # The lock read again now, as the daemon's guard does after a route change.
        result = tunlock_in_client(lab, "lock", "apply", "--config", config)
        assert result.returncode == 0, result.stderr
        sh("ip", "-n", client, "-6", "neigh", "replace", INTERNET_V6, "lladdr", router_mac, "dev", "wan0")
        onlink6 = lab.lab.run("client", "nft", "list", "set", "inet", "tunlock", "onlink6")
        mark = lab.observer.mark()
        _python_in(lab, "client", NS_WITH_DATA)
        leaks = lab.observer.leaks(since=mark)
    finally:
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
    assert leaks == [], f"neighbour discovery carried data off the link:\n{describe(leaks)}"
    assert "2000::/3" not in onlink6, onlink6


def test_an_address_without_its_prefix_route_does_not_make_its_subnet_lan(lab):
    """An address added with noprefixroute: the main table sends its subnet through the gateway,
    to the ISP, so the lock (applied after it) must not count it on-link, while a rogue route
    alone (the RA above) must not count either: an address prefix AND a route to it."""
    client, isp = lab.lab.ns("client"), lab.lab.ns("isp")
    config = str(lab.lab.config_path)
    sh("ip", "-n", isp, "addr", "add", "10.9.9.9/24", "dev", "cl0")
    sh("ip", "-n", client, "addr", "add", "10.9.9.2/24", "dev", "wan0", "noprefixroute")
    try:
        result = tunlock_in_client(lab, "lock", "apply", "--config", config, env=LAN_ENV)
        assert result.returncode == 0, result.stderr
        lan4 = lab.lab.run("client", "nft", "list", "set", "inet", "tunlock", "lan4")
        mark = lab.observer.mark()
        answered = lab.probes.ping("10.9.9.9")
        leaks = lab.observer.leaks(since=mark)
    finally:
        tunlock_in_client(lab, "lock", "remove", "--yes", "--config", config)
        sh("ip", "-n", isp, "addr", "del", "10.9.9.9/24", "dev", "cl0", check=False)
        sh("ip", "-n", client, "addr", "del", "10.9.9.2/24", "dev", "wan0", check=False)
    assert leaks == [], f"a subnet routed through the gateway was let out as LAN:\n{describe(leaks)}"
    assert not answered
    assert "10.9.9.0/24" not in lan4, lan4


# --- item 9: a DHCP client rewriting resolv.conf ------------------------------------------------


def test_a_rewritten_resolv_conf_gets_the_tunnels_resolvers_back(lab):
    """The lab's client has a resolv.conf of its own (the file method). A DHCP client rewrites it
    while the tunnel is up, in place and by renaming a new file over it (dhclient-script's way):
    each time the tunnel's resolvers come back, and names resolve again."""
    path = Path("/etc/netns") / lab.lab.ns("client") / "resolv.conf"
    dhcp = f"# from DHCP\nnameserver {ISP_V4}\n"

    def tunnels() -> bool:
        return f"nameserver {TUNNEL_SERVER_V4}" in path.read_text()

    with lab.daemon() as daemon:
        daemon.start()
        assert tunnels(), path.read_text()
        path.write_text(dhcp)
        _wait("an in-place rewrite was not corrected", tunnels, detail=path.read_text)
        new = path.with_name("resolv.conf.dhclient-new")
        new.write_text(dhcp)
        os.replace(new, path)
        _wait("a rename over the file was not corrected", tunnels, detail=path.read_text)
        resolved = lab.probes.dns_udp(TUNNEL_SERVER_V4)
        daemon.ask("reconnect")
        daemon.wait_for(lambda s: s["state"] == "connected", what="connected after reconnect")
        after_reconnect = path.read_text()
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))
    assert resolved
    assert f"nameserver {TUNNEL_SERVER_V4}" in after_reconnect, after_reconnect
    assert path.read_text() == dhcp, "on exit the host's newest resolv.conf (the DHCP one) comes back"
