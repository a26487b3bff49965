"""Workloads that skip the host's netfilter (issue 21, items 8 and 9), shown by the ISP's observer.

A macvlan child of the uplink (a container's interface) and a VM bridged onto the uplink with
``bridge-nf-call-iptables=0`` send frames that never pass the host's ``inet`` hooks: before the
lock's egress chain, every one of their probes reached the ISP. And with br_netfilter on, the
lock's forward chain refused traffic between two containers on one bridge behind the host.

Docker is not available here: namespaces with veth or macvlan links stand for its containers
and for the VM.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.lab.probes import describe
from supervisor.lab.topology import CLIENT_LINK, INTERNET_V4, INTERNET_V6, ISP_V4, ISP_V6, sh
from tests.lab.conftest import tunlock_in_client

pytestmark = pytest.mark.lab

# Every probe kind, sent from a workload's namespace (no answer needed: the observer counts
# what arrives at the ISP). Each is sent, not awaited, so a refused one costs no time-out.
PROBES = textwrap.dedent(
    """
    import socket
    sent = []
    def attempt(name, fn):
        try:
            fn(); sent.append(name)
        except OSError as err:
            print(name, "refused:", err)

    def udp(host, port, family=socket.AF_INET):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.sendto(b"secret over udp", (host, port))

    def tcp(host, port, family=socket.AF_INET):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass

    def ping(host, family=socket.AF_INET):
        if family == socket.AF_INET:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            s.sendto(bytes([8, 0, 0xF7, 0xFF, 0, 0, 0, 0]), (host, 0))
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            s.sendto(bytes([128, 0, 0, 0, 0, 0, 0, 0]), (host, 0))

    v6 = socket.AF_INET6
    for name, fn in (
        ("icmp4", lambda: ping({internet4!r})),
        ("icmp6", lambda: ping({internet6!r}, v6)),
        ("tcp4", lambda: tcp({internet4!r}, 80)),
        ("tcp6", lambda: tcp({internet6!r}, 80, v6)),
        ("udp4", lambda: udp({internet4!r}, 7)),
        ("udp6", lambda: udp({internet6!r}, 7, v6)),
        ("dns-udp-isp", lambda: udp({isp4!r}, 53)),
        ("dns-udp-isp6", lambda: udp({isp6!r}, 53, v6)),
        ("dns-tcp-isp", lambda: tcp({isp4!r}, 53)),
        ("udp-to-endpoint", lambda: udp({endpoint!r}, 51820)),
    ):
        attempt(name, fn)
    print("sent", sent)
    """
)


def _probes(lab) -> str:
    return PROBES.format(
        internet4=INTERNET_V4,
        internet6=INTERNET_V6,
        isp4=ISP_V4,
        isp6=ISP_V6,
        endpoint=lab.lab.servers[0].endpoint_v4,
    )


def _probe_from(lab, ns: str) -> tuple[str, list[dict]]:
    """Every probe kind from ``ns``; what it printed and what the observer counted as leaked."""
    mark = lab.observer.mark()
    printed = lab.lab.run(ns, sys.executable, "-c", _probes(lab), check=False, timeout=30)
    return printed, lab.observer.leaks(since=mark)


def _workload_addresses(ns: str, link: str, last: int) -> None:
    """``ns``'s side: an address on the client's link, and the ISP as its gateway."""
    for argv in (
        ("link", "set", "lo", "up"),
        ("link", "set", link, "up"),
        ("addr", "add", f"192.0.2.{last}/24", "dev", link),
        ("addr", "add", f"2001:db8:c::{last}/64", "dev", link, "nodad"),
        ("route", "add", "default", "via", ISP_V4),
        ("-6", "route", "add", "default", "via", ISP_V6),
    ):
        sh("ip", "-n", ns, *argv)


@contextlib.contextmanager
def macvlan_container(lab) -> Iterator[str]:
    """A namespace whose interface is a macvlan child of the client's uplink, as a container on
    a macvlan network is."""
    ns = lab.lab.ns("mvc")
    client = lab.lab.ns("client")
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", client, "link", "add", "mvc0", "link", "wan0", "type", "macvlan", "mode", "bridge")
        sh("ip", "-n", client, "link", "set", "mvc0", "netns", ns, "name", "eth0")
        _workload_addresses(ns, "eth0", 50)
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)  # the child goes with it


@contextlib.contextmanager
def bridged_vm(lab) -> Iterator[str]:
    """The client's uplink enslaved to a bridge that carries the client's addresses, and a "VM"
    namespace on a veth port of it, with bridged frames kept from netfilter
    (``bridge-nf-call-iptables=0``, per namespace), as a host with a bridged VM is set up."""
    ns = lab.lab.ns("vm")
    client = lab.lab.ns("client")
    sh("ip", "netns", "add", ns)
    nf = Path("/proc/sys/net/bridge")
    try:
        sh(
            "ip",
            "-n",
            client,
            "-batch",
            "-",
            input="\n".join(
                [
                    "addr flush dev wan0",
                    "link add br0 type bridge",
                    "link set wan0 master br0",
                    "link set br0 up",
                    f"link add vmport0 type veth peer name eth0 netns {ns}",
                    "link set vmport0 master br0",
                    "link set vmport0 up",
                    *(c.replace("dev wan0", "dev br0") for c in CLIENT_LINK if c.startswith("addr")),
                    "route replace default via 192.0.2.1 dev br0",
                    "route replace default via 2001:db8:c::1 dev br0",
                ]
            )
            + "\n",
        )
        if nf.is_dir():  # br_netfilter here: keep bridged frames from it, as the item describes
            lab.lab.run(
                "client",
                "sysctl",
                "-qw",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
            )
        _workload_addresses(ns, "eth0", 60)
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)
        sh(
            "ip",
            "-force",
            "-n",
            client,
            "-batch",
            "-",
            input="link del vmport0\nlink set wan0 nomaster\nlink del br0\n"
            + "\n".join(
                c.replace("route add", "route replace")
                for c in CLIENT_LINK
                if c.startswith(("addr", "route"))
            )
            + "\n",
            check=False,
        )


def _apply(lab, env: dict[str, str] | None = None) -> str:
    result = tunlock_in_client(lab, "lock", "apply", "--config", str(lab.lab.config_path), env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _remove(lab) -> None:
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))


def test_a_macvlan_containers_probes_leave_nothing_with_the_lock_alone(lab):
    with macvlan_container(lab) as ns:
        applied = _apply(lab)
        try:
            printed, leaks = _probe_from(lab, ns)
            status = tunlock_in_client(lab, "lock", "status", "--config", str(lab.lab.config_path)).stdout
        finally:
            _remove(lab)
    assert "sent" in printed, printed
    assert leaks == [], f"a macvlan child of the uplink went around the lock:\n{describe(leaks)}"
    assert "egress held on wan0" in applied, applied
    assert "blocked_egress 0" not in status and "blocked_egress" in status, status


def test_a_macvlan_containers_probes_leave_nothing_with_the_daemon_connected(lab):
    with macvlan_container(lab) as ns, lab.daemon() as daemon:
        daemon.start()
        printed, leaks = _probe_from(lab, ns)
        # the host's own tunnel still works through the egress chain (marked WireGuard)
        assert lab.probes.ping(INTERNET_V4)
        log = "\n".join(daemon.log_events())
    _remove(lab)
    assert "sent" in printed, printed
    assert leaks == [], f"a macvlan child of the uplink went around the lock:\n{describe(leaks)}"
    assert "macvlan" not in log or "egress chain on the uplink covers them" in log


def test_a_vm_bridged_onto_the_uplink_leaves_nothing(lab):
    # The lab's uplink is a veth, which the lock takes for a workload's port when it is a bridge
    # port (a real host's uplink is hardware); lock.uplinks names it, as a user of such a host would.
    with bridged_vm(lab) as ns:
        _apply(lab, env={"TUNLOCK_LOCK_UPLINKS": "wan0"})
        try:
            printed, leaks = _probe_from(lab, ns)
            host_ok = lab.probes.ping(INTERNET_V4) is False  # the host itself still locked
        finally:
            _remove(lab)
    assert "sent" in printed, printed
    assert host_ok
    assert leaks == [], f"a VM bridged onto the uplink went around the lock:\n{describe(leaks)}"


def test_check_and_status_name_a_macvlan_child_of_the_uplink(lab):
    """Detection: a child still in the host's namespace (a VM's macvtap, say) is named by
    ``tunlock check``; one moved into a container's namespace is no longer visible from here."""
    client = lab.lab.ns("client")
    sh("ip", "-n", client, "link", "add", "mvhost0", "link", "wan0", "type", "macvlan", "mode", "bridge")
    try:
        result = tunlock_in_client(lab, "check", "--config", str(lab.lab.config_path))
    finally:
        sh("ip", "-n", client, "link", "del", "mvhost0", check=False)
    assert result.returncode == 0, result.stderr
    assert "mvhost0" in result.stdout + result.stderr
    assert "macvlan" in result.stdout + result.stderr


@contextlib.contextmanager
def two_containers_on_a_bridge(lab) -> Iterator[tuple[str, str]]:
    """Two namespaces on one bridge of the client's (a Docker bridge network), no uplink in it."""
    client = lab.lab.ns("client")
    names = (lab.lab.ns("c1"), lab.lab.ns("c2"))
    for ns in names:
        sh("ip", "netns", "add", ns)
    try:
        commands = ["link add dock0 type bridge", "addr add 10.77.0.1/24 dev dock0", "link set dock0 up"]
        for i, ns in enumerate(names, start=1):
            commands += [
                f"link add dport{i} type veth peer name eth0 netns {ns}",
                f"link set dport{i} master dock0",
                f"link set dport{i} up",
            ]
        sh("ip", "-n", client, "-batch", "-", input="\n".join(commands) + "\n")
        for i, ns in enumerate(names, start=1):
            for argv in (
                ("link", "set", "lo", "up"),
                ("link", "set", "eth0", "up"),
                ("addr", "add", f"10.77.0.{10 + i}/24", "dev", "eth0"),
                ("route", "add", "default", "via", "10.77.0.1"),
            ):
                sh("ip", "-n", ns, *argv)
        yield names
    finally:
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "-n", client, "link", "del", "dock0", check=False)


def test_containers_on_one_bridge_still_talk_with_br_netfilter_on(lab):
    if not Path("/proc/sys/net/bridge").is_dir():
        pytest.skip("br_netfilter is not available in this kernel: bridged frames never reach the lock")
    with two_containers_on_a_bridge(lab) as (first, _second):
        lab.lab.run(
            "client",
            "sysctl",
            "-qw",
            "net.bridge.bridge-nf-call-iptables=1",
            "net.bridge.bridge-nf-call-ip6tables=1",
        )
        _apply(lab)
        try:
            mark = lab.observer.mark()
            between = lab.lab.run(first, "ping", "-n", "-c", "1", "-W", "2", "10.77.0.12", check=False)
            # forwarding out of the bridge to the internet is still refused (no tunnel here)
            out = lab.lab.run(first, "ping", "-n", "-c", "1", "-W", "2", INTERNET_V4, check=False)
            leaks = lab.observer.leaks(since=mark)
        finally:
            _remove(lab)
    assert " 0% packet loss" in between, between
    assert " 0% packet loss" not in out, out
    assert leaks == [], describe(leaks)
