"""A small private lab for the WireGuard backend and plumbing tests.

client ── isp ── vpn1, vpn2 (wireguard-go servers configured with `wg`), all in
namespaces named ``tlabwg<pid><n>-<role>``; nothing touches the host namespace.
Every server shares the tunnel subnet (10.99.0.0/24, fd00:99::/64) and knows the
client as 10.99.0.2, the way a provider gives a device one address on all its
servers: a swap then changes only the peer. The tests enter the client
namespace with :func:`inside` (a per-thread ``setns``), so the code under test
runs exactly as the daemon does in its namespace.

Test infrastructure may use ``ip`` and ``wg``; the product code never does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import anyio
from pyroute2 import netns as pyroute2_netns

from supervisor.redact import Secret
from supervisor.servers import Endpoint, Peer, Server
from supervisor.wireguard.uapi import UAPI_DIR

PREFIX = "tlabwg"
_counter = itertools.count()
TUNNEL_SERVER_V4 = ip_address("10.99.0.1")
TUNNEL_SERVER_V6 = ip_address("fd00:99::1")
CLIENT_ADDRESSES = (ip_interface("10.99.0.2/24"), ip_interface("fd00:99::2/64"))


def sh(*argv: str, input: str | None = None, check: bool = True) -> str:
    done = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def genkey() -> tuple[str, str]:
    private = sh("wg", "genkey").strip()
    return private, sh("wg", "pubkey", input=private).strip()


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the calling thread in network namespace ``ns`` for the duration of the block."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pyroute2_netns.setns(ns, flags=0)
        yield
    finally:
        pyroute2_netns.setns(original, flags=0)
        os.close(original)


def uapi_pid(ifname: str) -> int | None:
    """PID of the wireguard-go serving ``ifname`` (SO_PEERCRED), None when nothing does."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(UAPI_DIR / f"{ifname}.sock"))
        except OSError:
            return None
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid


def stop_wireguard_go(ifname: str) -> None:
    """Stop the wireguard-go we started for ``ifname`` (by PID) and remove a stale socket."""
    pid = uapi_pid(ifname)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 3
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    with contextlib.suppress(FileNotFoundError):
        (UAPI_DIR / f"{ifname}.sock").unlink()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class VpnServer:
    name: str
    ns: str
    ifname: str
    public_key: str
    endpoint: Endpoint

    @property
    def pid(self) -> int | None:
        return uapi_pid(self.ifname)

    def wg_show(self, what: str) -> str:
        return sh("ip", "netns", "exec", self.ns, "wg", "show", self.ifname, what)

    def rx_bytes(self) -> int:
        line = self.wg_show("transfer").split()
        return int(line[1]) if len(line) >= 3 else 0


@dataclass
class PrivateLab:
    """Namespaces, veths and wireguard-go servers; ``down`` removes all of it."""

    servers: int = 2
    id: str = field(default_factory=lambda: f"{os.getpid()}x{next(_counter)}")
    vpn: list[VpnServer] = field(default_factory=list)
    client_private: str = ""
    namespaces: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def client(self) -> str:
        return f"{PREFIX}{self.id}-c"

    @property
    def isp(self) -> str:
        return f"{PREFIX}{self.id}-i"

    def client_ifname(self, suffix: str = "c") -> str:
        name = f"twg{self.id}{suffix}"
        assert len(name) <= 15, name
        self.interfaces.append(name)
        return name

    def server(self, index: int, keepalive: int | None = None) -> Server:
        """The client's view of vpn<index> (1-based), as the server file would give it."""
        vpn = self.vpn[index - 1]
        return Server(
            name=vpn.name,
            path=Path(f"{vpn.name}.conf"),
            private_key=Secret(self.client_private),
            addresses=CLIENT_ADDRESSES,
            peer=Peer(
                public_key=vpn.public_key,
                endpoint=vpn.endpoint,
                allowed_ips=(ip_network("0.0.0.0/0"), ip_network("::/0")),
                persistent_keepalive=keepalive,
            ),
            dns=(TUNNEL_SERVER_V4,),
        )

    def up(self) -> PrivateLab:
        sweep_stale()
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _up(self) -> None:
        self.client_private, client_public = genkey()
        self._ns(self.client)
        self._ns(self.isp)
        sh("ip", "-n", self.isp, "link", "add", "c0", "type", "veth", "peer", "name", "e0", "netns",
           self.client)  # fmt: skip
        self._addr(self.isp, "c0", "192.0.2.1/24", "2001:db8:c::1/64")
        self._addr(self.client, "e0", "192.0.2.2/24", "2001:db8:c::2/64")
        sh("ip", "-n", self.client, "route", "add", "default", "via", "192.0.2.1")
        sh("ip", "-n", self.client, "-6", "route", "add", "default", "via", "2001:db8:c::1")
        sh("ip", "netns", "exec", self.isp, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", self.isp, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        for k in range(1, self.servers + 1):
            self.vpn.append(self._server(k, client_public))

    def _addr(self, ns: str, dev: str, v4: str, v6: str) -> None:
        sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
        sh("ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad")
        sh("ip", "-n", ns, "link", "set", dev, "up")

    def _server(self, k: int, client_public: str) -> VpnServer:
        ns = f"{PREFIX}{self.id}-s{k}"
        self._ns(ns)
        sh("ip", "-n", self.isp, "link", "add", f"s{k}", "type", "veth", "peer", "name", "e0", "netns", ns)
        self._addr(self.isp, f"s{k}", f"198.51.100.{4 * k + 1}/30", f"2001:db8:{k}::1/64")
        self._addr(ns, "e0", f"198.51.100.{4 * k + 2}/30", f"2001:db8:{k}::2/64")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"198.51.100.{4 * k + 1}")
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", f"2001:db8:{k}::1")
        ifname = f"twg{self.id}s{k}"
        self.interfaces.append(ifname)
        private, public = genkey()
        self.children.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
            env={"PATH": os.environ["PATH"], "LOG_LEVEL": "error"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ))  # fmt: skip
        deadline = time.monotonic() + 5
        while uapi_pid(ifname) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go for {ifname} did not start")
            time.sleep(0.005)
        with tempfile.NamedTemporaryFile("w", prefix="tlabwgkey", delete=True) as key:
            key.write(private)
            key.flush()
            sh(
                "ip", "netns", "exec", ns, "wg", "set", ifname, "private-key", key.name,
                "listen-port", "51820", "peer", client_public,
                "allowed-ips", "10.99.0.2/32,fd00:99::2/128",
            )  # fmt: skip
        sh("ip", "-n", ns, "addr", "add", f"{TUNNEL_SERVER_V4}/24", "dev", ifname)
        sh("ip", "-n", ns, "addr", "add", f"{TUNNEL_SERVER_V6}/64", "dev", ifname, "nodad")
        sh("ip", "-n", ns, "link", "set", ifname, "up")
        endpoint = Endpoint(ip_address(f"198.51.100.{4 * k + 2}"), 51820)
        return VpnServer(f"vpn{k}", ns, ifname, public, endpoint)

    def down(self) -> None:
        for ifname in self.interfaces:
            stop_wireguard_go(ifname)
        for child in self.children:
            child.kill()
            child.wait(timeout=5)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def sweep_stale() -> None:
    """Remove private labs (namespaces, wireguard-go, sockets) whose creating process is gone.

    Lab ids are "<owner pid>x<n>", in namespace names and interface names alike.
    """
    netns_dir = Path("/run/netns")
    for path in sorted(netns_dir.iterdir()) if netns_dir.is_dir() else []:
        lab_id = path.name[len(PREFIX) :].split("-")[0]
        owner = lab_id.split("x")[0]
        if not path.name.startswith(PREFIX) or "x" not in lab_id or not owner.isdigit():
            continue
        if Path(f"/proc/{owner}").exists():
            continue
        for sock in UAPI_DIR.glob(f"twg{lab_id}*.sock"):
            stop_wireguard_go(sock.stem)
        sh("ip", "netns", "del", path.name, check=False)


# --- continuous ping ------------------------------------------------------------------------


@dataclass
class PingLog:
    sent: dict[int, float] = field(default_factory=dict)
    answered: dict[int, float] = field(default_factory=dict)

    def first_answer_sent_after(self, t0: float) -> float | None:
        """Time from ``t0`` to the first reply to a request sent at or after ``t0``."""
        times = [self.answered[s] for s, at in self.sent.items() if at >= t0 and s in self.answered]
        return min(times) - t0 if times else None

    def longest_silence(self) -> float:
        """The longest time between two consecutive replies (the outage a user would see)."""
        replies = sorted(self.answered.values())
        return max((b - a for a, b in itertools.pairwise(replies)), default=float("inf"))

    def answered_between(self, start: float, end: float) -> int:
        return sum(1 for at in self.answered.values() if start <= at < end)


async def ping_continuously(target: str, ifname: str, interval: float, log: PingLog) -> None:
    """ICMP echo every ``interval`` through ``ifname`` until cancelled; replies recorded in ``log``."""
    from supervisor.health import echo_request

    v6 = ip_address(target).version == 6
    family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, 25, ifname.encode())  # SO_BINDTODEVICE

        async def receive() -> None:
            while True:
                await anyio.wait_readable(sock)
                with contextlib.suppress(BlockingIOError):
                    data = sock.recv(2048)
                    data = data if v6 else data[(data[0] & 0x0F) * 4 :]
                    kind, _, _, rident, seq = struct.unpack("!BBHHH", data[:8])
                    if kind == (129 if v6 else 0) and rident == ident and seq in log.sent:
                        log.answered.setdefault(seq, time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            for seq in itertools.count(1):
                log.sent[seq & 0xFFFF] = time.monotonic()
                with contextlib.suppress(OSError):  # no route for a moment: a lost probe
                    sock.sendto(echo_request(ident, seq & 0xFFFF, b"tunlock-lab", v6), (target, 0))
                await anyio.sleep(interval)


# --- fixtures' helpers ------------------------------------------------------------------------

BACKENDS_ENV = "TUNLOCK_TEST_BACKENDS"


def kernel_wireguard_present() -> bool:
    from supervisor.wireguard.selection import kernel_available

    try:
        return anyio.run(kernel_available)
    except OSError:
        return False


def backend_params() -> list:
    """Backends to test: $TUNLOCK_TEST_BACKENDS (comma-separated), default userspace and kernel.

    The kernel parameter skips, visibly and with the reason, where the kernel has no WireGuard.
    """
    import pytest

    kinds = [k.strip() for k in os.environ.get(BACKENDS_ENV, "userspace,kernel").split(",") if k.strip()]
    params = []
    for kind in kinds:
        marks = []
        if kind == "kernel" and not kernel_wireguard_present():
            marks.append(pytest.mark.skip(reason="kernel backend: this kernel has no WireGuard module"))
        params.append(pytest.param(kind, marks=marks, id=kind))
    return params


def lab_skip_reason() -> str | None:
    """Why lab tests cannot run here, or None."""
    import shutil

    if os.geteuid() != 0:
        return "lab tests need root (network namespaces)"
    for tool in ("ip", "wg", "wireguard-go"):
        if shutil.which(tool) is None:
            return f"lab tests need {tool}"
    return None


def clean_client(lab: PrivateLab, ifname: str, table: int = 51820) -> None:
    """Remove what a test's tunnel left in the client namespace (its process, link, rules, table)."""
    stop_wireguard_go(ifname)
    sh("ip", "-n", lab.client, "link", "del", ifname, check=False)
    for family in ("-4", "-6"):
        for priority in ("32760", "32761"):
            for _ in range(10):  # one rule per call, until none is left
                deleted = subprocess.run(
                    ["ip", "-n", lab.client, family, "rule", "del", "priority", priority], capture_output=True
                )
                if deleted.returncode != 0:
                    break
        sh("ip", "-n", lab.client, family, "route", "flush", "table", str(table), check=False)


class EventLog:
    """Backend events as they arrive, with a wait for one of a given type."""

    def __init__(self) -> None:
        self.events: list = []
        self._arrived = anyio.Event()

    async def __call__(self, event: object) -> None:
        self.events.append(event)
        self._arrived.set()
        self._arrived = anyio.Event()

    async def wait_for(self, kind: type, timeout: float = 10.0) -> object:
        with anyio.fail_after(timeout):
            while True:
                for event in self.events:
                    if isinstance(event, kind):
                        return event
                await self._arrived.wait()


def private_lab(servers: int = 2) -> Iterator[PrivateLab]:
    """Body of a module-scoped ``lab`` fixture."""
    lab = PrivateLab(servers=servers).up()
    try:
        yield lab
    finally:
        lab.down()


_tunnel_numbers = itertools.count(1)


def tunnel_settings(lab: PrivateLab, backend: str, fwmark: int = 0xCA6C, table: int = 51820) -> Iterator:
    """Body of a ``settings`` fixture: a fresh interface name, the test's thread in the client.

    The resolv.conf is a file of the test's own (the file method of supervisor.net.dns).
    """
    from supervisor.wireguard.tunnel import TunnelSettings

    state = Path(tempfile.mkdtemp(prefix="tlabwgstate"))
    (state / "resolv.conf").write_text(ORIGINAL_RESOLV_CONF)
    ifname = lab.client_ifname(f"c{next(_tunnel_numbers)}")
    try:
        with inside(lab.client):
            yield TunnelSettings(
                ifname=ifname,
                fwmark=fwmark,
                route_table=table,
                backend=backend,  # type: ignore[arg-type]
                resolv_conf=state / "resolv.conf",
                state_dir=state,
            )
    finally:
        clean_client(lab, ifname, table)
        sh("rm", "-rf", str(state))


ORIGINAL_RESOLV_CONF = "nameserver 192.0.2.1\n"


def ping(target: object, count: int = 3, wait: float = 1.0) -> int:
    """Answered echo requests from `ping` (run in the calling thread's namespace)."""
    done = subprocess.run(
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", str(wait), str(target)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for line in done.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def ifindex(ifname: str) -> int:
    """The interface's index in the calling thread's namespace (OSError when it does not exist)."""
    return socket.if_nametoindex(ifname)


class LeakCounter:
    """A minimal ISP-side observer until the shared lab's is available.

    In the ISP namespace, counts every packet arriving from the client that is neither UDP to
    a lab server's WireGuard endpoint nor IPv6 neighbour discovery (the link's own upkeep).
    """

    TABLE = "tlabwgobserver"

    def __init__(self, lab: PrivateLab) -> None:
        self.lab = lab

    def install(self) -> None:
        endpoints = ", ".join(f"{v.endpoint.host} . {v.endpoint.port}" for v in self.lab.vpn)
        script = f"""
table inet {self.TABLE} {{
    counter leaks {{ }}
    set wireguard {{ type ipv4_addr . inet_service; elements = {{ {endpoints} }} }}
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        iifname != "c0" return
        ip daddr . udp dport @wireguard return
        icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} return
        icmpv6 type mld2-listener-report return
        counter name leaks
    }}
}}
"""
        sh("ip", "netns", "exec", self.lab.isp, "nft", "-f", "-", input=script)

    def count(self) -> int:
        text = sh("ip", "netns", "exec", self.lab.isp, "nft", "list", "counter", "inet", self.TABLE, "leaks")
        return int(text.split("packets")[1].split()[0])

    def reset(self) -> None:
        sh("ip", "netns", "exec", self.lab.isp, "nft", "reset", "counter", "inet", self.TABLE, "leaks")

    def remove(self) -> None:
        sh("ip", "netns", "exec", self.lab.isp, "nft", "delete", "table", "inet", self.TABLE, check=False)
