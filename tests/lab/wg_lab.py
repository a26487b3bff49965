"""The shared lab (supervisor.lab) as the WireGuard backend and plumbing tests use it.

client ── isp ── vpn1..vpnN (wireguard-go servers), built by ``supervisor.lab.topology.Lab``;
every server gives the client the same tunnel address (10.99.0.2, fd00:99::2), the way a
provider gives a device one address on all its servers, so a swap changes only the peer. The
server files the lab writes are read with ``supervisor.wgquick.load_server``, as the daemon reads
them. Tests enter the client namespace with ``Lab.inside`` (a per-thread ``setns``), so the code
under test runs exactly as the daemon does in its namespace; each test gets an interface name of
its own (unique machine-wide: the lab's id is in it).

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
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import structlog

from supervisor.lab.probes import Observer
from supervisor.lab.topology import Lab, process_alive, sh, uapi_pid
from supervisor.servers import Endpoint, Server
from supervisor.wgquick import load_server
from supervisor.wireguard.uapi import UAPI_DIR

TUNNEL_SERVER_V4 = ip_address("10.99.0.1")
TUNNEL_SERVER_V6 = ip_address("fd00:99::1")
PHYSICAL = "wan0"  # the client's link to the ISP
ISP_SIDE = "cl0"  # the ISP's end of it


def stop_wireguard_go(ifname: str) -> None:
    """Stop the wireguard-go a test started for ``ifname`` (by PID) and remove a stale socket."""
    pid = uapi_pid(ifname)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 3
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    with contextlib.suppress(FileNotFoundError):
        (UAPI_DIR / f"{ifname}.sock").unlink()


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

    def rx_bytes(self) -> int:
        """What the server's WireGuard received from the client, by its own count."""
        line = sh("ip", "netns", "exec", self.ns, "wg", "show", self.ifname, "transfer").split()
        return int(line[1]) if len(line) >= 3 else 0


@dataclass
class WgLab:
    """The shared lab (and its ISP observer) with the names and helpers these tests use."""

    lab: Lab
    observer: Observer | None = None
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def client(self) -> str:
        return self.lab.ns("client")

    @property
    def isp(self) -> str:
        return self.lab.ns("isp")

    @property
    def vpn(self) -> list[VpnServer]:
        return [
            VpnServer(s.name, s.ns, s.ifname, s.public_key, Endpoint(ip_address(s.endpoint_v4), 51820))
            for s in self.lab.servers
        ]

    @property
    def client_private(self) -> str:
        return (self.lab.dir / "client.key").read_text().strip()

    def new_ifname(self) -> str:
        """A client interface name of a test's own, unique on the machine."""
        name = f"{self.lab.client_ifname}{next(self._numbers)}"
        assert len(name) <= 15, name
        return name

    def server(self, index: int, keepalive: int | None = None) -> Server:
        """vpn<index> (1-based) as the daemon reads it from the server file the lab wrote."""
        server = load_server(self.lab.dir / "servers" / f"vpn{index}.conf")
        if keepalive is not None:
            server = msgspec.structs.replace(
                server, peer=msgspec.structs.replace(server.peer, persistent_keepalive=keepalive)
            )
        return server


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
    from supervisor.net.probe import echo_request

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


def clean_client(lab: WgLab, ifname: str, table: int = 51820) -> None:
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


def shared_lab(servers: int = 2) -> Iterator[WgLab]:
    """A lab of our own, removed afterwards (for the bench; tests use the ``lab`` fixture)."""
    lab = Lab.up(servers=servers)
    try:
        yield WgLab(lab)
    finally:
        lab.down()


def tunnel_settings(lab: WgLab, backend: str, fwmark: int = 0xCA6C, table: int = 51820) -> Iterator:
    """Body of a ``settings`` fixture: a fresh interface name, the test's thread in the client.

    The resolv.conf is a file of the test's own (the file method of supervisor.net.dns).
    """
    from supervisor.wireguard.tunnel import TunnelSettings

    state = Path(tempfile.mkdtemp(prefix="tlabwgstate"))
    (state / "resolv.conf").write_text(ORIGINAL_RESOLV_CONF)
    ifname = lab.new_ifname()
    try:
        with lab.lab.inside("client"):
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


# --- fixtures shared by the WireGuard lab tests (imported by name into each module) -----------

FWMARK = 0xCA6C
TABLE = 51820


@pytest.fixture(autouse=True, name="_logs_to_the_current_stdout")
def logs_to_the_current_stdout() -> None:
    # Another test may have configured structlog to a capture stream that is closed by now.
    structlog.reset_defaults()


@pytest.fixture(scope="module", name="lab")
def wg_lab_fixture(module_lab: Any) -> WgLab:
    """The module's lab (tests/lab/conftest.py) seen through the WireGuard tests' helpers."""
    return WgLab(module_lab.lab, observer=module_lab.observer)
