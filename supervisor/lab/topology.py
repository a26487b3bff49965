"""Building and tearing down one lab instance.

::

    client ──wan0/cl0── isp ──v1..vN── vpn1..vpnN (wireguard-go, resolver, NAT)
                          └──in0────── internet (ICMP, TCP 80, UDP 7, DNS; v4 and v6)

Namespaces are ``tlab<id>-<role>`` (supervisor.safety recognises the prefix);
the host namespace is never touched. Addresses come from the documentation
ranges only (client link 192.0.2.0/24 and 2001:db8:c::/64, server links
198.51.100.0/24 and 2001:db8:100::/48, internet 203.0.113.0/24 and
2001:db8:203::/64) plus the tunnel inside (10.99.0.0/24, fd00:99::/64: every
server gives the client the same address, as providers do, so a failover only
swaps the peer). The client link's subnet doubles as the LAN (a LAN host with
TCP and DNS sits at 192.0.2.3 on the ISP side).

State lives in a directory under /run/tunlock-lab/<id>/ (config, server files,
PIDs, the observer's record), so ``tunlock lab down`` works from another
process, and a stale lab whose owner PID died is swept by the next ``up``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from supervisor.safety import LAB_NETNS_PREFIX, NETNS_DIR

LAB_ROOT = Path("/run/tunlock-lab")
LAB_WIREGUARD_ENV = "TUNLOCK_LAB_WIREGUARD"
UAPI_DIR = Path("/var/run/wireguard")
WG_PORT = 51820
CLIENT_V4, ISP_V4, LAN_HOST_V4 = "192.0.2.2", "192.0.2.1", "192.0.2.3"
CLIENT_V6, ISP_V6 = "2001:db8:c::2", "2001:db8:c::1"
INTERNET_V4, INTERNET_V6 = "203.0.113.10", "2001:db8:203::10"
TUNNEL_SERVER_V4, TUNNEL_SERVER_V6 = "10.99.0.1", "fd00:99::1"
TUNNEL_CLIENT_V4, TUNNEL_CLIENT_V6 = "10.99.0.2", "fd00:99::2"
LAB_DOMAIN = "lab.test"
# Each server hides the tunnel's inner addresses behind its own, as a provider does.
# The client's side of its link: addresses and default routes (also what a test that moves the
# link into another namespace, a pod's, sets up again).
CLIENT_LINK = [
    "link set lo up",
    "link set wan0 up",
    "addr add 192.0.2.2/24 dev wan0",
    "addr add 2001:db8:c::2/64 dev wan0 nodad",
    "route add default via 192.0.2.1",
    "route add default via 2001:db8:c::1",
]

LAB_NAT = """table inet labnat {
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "eth0" masquerade
  }
}
"""


class LabError(RuntimeError):
    """A lab command failed; the message names the command and its error."""


def ip_batch(ns: str, commands: list[str]) -> None:
    """Several ``ip`` commands in one process, inside namespace ``ns`` (fast lab bring-up)."""
    sh("ip", "-n", ns, "-batch", "-", input="\n".join(commands) + "\n")


def sh(*argv: str, input: str | None = None, check: bool = True, timeout: float = 20) -> str:
    done = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=timeout)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass
class LabServer:
    index: int
    name: str
    ns: str
    ifname: str
    public_key: str
    endpoint_v4: str
    endpoint_v6: str
    wg_pid: int = 0
    resolver_pid: int = 0

    @property
    def endpoint(self) -> str:
        return f"{self.endpoint_v4}:{WG_PORT}"


@dataclass
class LabState:
    id: str
    owner_pid: int
    dir: str
    servers: list[LabServer] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    client_ifname: str = ""
    wireguard: str = "userspace"  # the servers' and the client config's backend: userspace | kernel

    def save(self) -> None:
        Path(self.dir, "state.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, lab_dir: Path) -> LabState:
        data = json.loads((lab_dir / "state.json").read_text())
        data["servers"] = [LabServer(**s) for s in data["servers"]]
        return cls(**data)


def process_alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pid: int, timeout: float = 2.0) -> None:
    """End a process the lab started (by PID), SIGTERM then SIGKILL."""
    if pid <= 0 or not process_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _new_id() -> str:
    return f"{os.getpid() % 0xFFFF:x}{int(time.monotonic() * 1000) % 0xFFF:x}"


class Lab:
    """One lab instance. Use ``Lab.up(servers=3)`` (also a context manager) and ``down()``."""

    # Ids of the labs this process built: the test suite checks none of their namespaces survive.
    built_here: ClassVar[set[str]] = set()

    def __init__(self, state: LabState) -> None:
        self.state = state
        self._children: list[subprocess.Popen] = []

    # --- names and paths --------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def dir(self) -> Path:
        return Path(self.state.dir)

    @property
    def config_path(self) -> Path:
        return self.dir / "tunlock.toml"

    @property
    def servers(self) -> list[LabServer]:
        return self.state.servers

    @property
    def client_ifname(self) -> str:
        """The WireGuard interface name the lab's config gives the client (unique machine-wide)."""
        return self.state.client_ifname

    def ns(self, role: str) -> str:
        return f"{LAB_NETNS_PREFIX}{self.id}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns("client"), self.ns("isp"), self.ns("inet")] + [s.ns for s in self.servers]

    # --- running things ---------------------------------------------------------------------

    def run(self, role_or_ns: str, *argv: str, check: bool = True, timeout: float = 20) -> str:
        ns = role_or_ns if role_or_ns.startswith(LAB_NETNS_PREFIX) else self.ns(role_or_ns)
        return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)

    def spawn(
        self,
        role_or_ns: str,
        argv: list[str],
        log: str | None = None,
        private_mounts: bool = True,
        **kw,
    ) -> subprocess.Popen:
        """Start a process in a namespace; the lab ends it by PID on down().

        ``private_mounts=False``: only the network namespace is entered (nsenter), not the mount
        namespace of ``ip netns exec``, so that what the process mounts (a namespace pinned under
        /run/netns by namespace mode) is seen by everyone.
        """
        ns = role_or_ns if role_or_ns.startswith(LAB_NETNS_PREFIX) else self.ns(role_or_ns)
        out = open(self.dir / log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        enter = ["ip", "netns", "exec", ns]
        if not private_mounts:
            enter = ["nsenter", f"--net={NETNS_DIR / ns}", "--"]
        proc = subprocess.Popen(
            [*enter, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kw,
        )
        self._children.append(proc)
        self.state.pids.append(proc.pid)
        self.state.save()
        return proc

    @contextlib.contextmanager
    def inside(self, role: str) -> Iterator[None]:
        """Run the calling thread inside a lab namespace for the block (sockets made there stay)."""
        from pyroute2 import netns as pyroute2_netns

        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            pyroute2_netns.setns(self.ns(role), flags=0)
            yield
        finally:
            pyroute2_netns.setns(original, flags=0)
            os.close(original)

    # --- life cycle -------------------------------------------------------------------------

    @classmethod
    def up(
        cls, servers: int = 3, lab_id: str | None = None, keep: bool = False, wireguard: str | None = None
    ) -> Lab:
        """Build a lab with ``servers`` WireGuard servers; on any failure, tear down what was built.

        A lab belongs to the calling process and is swept once that process is gone, unless
        ``keep`` (``tunlock lab up``): then only ``down`` removes it. ``wireguard`` (default
        ``$TUNLOCK_LAB_WIREGUARD`` or ``userspace``) is what the servers run and what the
        client's config asks for: ``userspace`` (wireguard-go) or ``kernel`` (the VM tier).
        """
        wireguard = wireguard or os.environ.get(LAB_WIREGUARD_ENV, "userspace")
        if wireguard not in ("userspace", "kernel"):
            raise LabError(f"{LAB_WIREGUARD_ENV}={wireguard!r}: userspace or kernel")
        sweep_stale()
        lab_id = lab_id or _new_id()
        lab_dir = LAB_ROOT / lab_id
        lab_dir.mkdir(parents=True, exist_ok=False)
        lab_dir.chmod(0o700)
        state = LabState(
            id=lab_id,
            owner_pid=0 if keep else os.getpid(),
            dir=str(lab_dir),
            client_ifname=f"tl{lab_id}c",
            wireguard=wireguard,
        )
        state.save()
        lab = cls(state)
        cls.built_here.add(lab_id)
        try:
            lab._build(servers)
        except BaseException:
            lab.down()
            raise
        return lab

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _build(self, count: int) -> None:
        for role in ("client", "isp", "inet"):
            sh("ip", "netns", "add", self.ns(role))
        for i in range(1, count + 1):
            sh("ip", "netns", "add", self.ns(f"vpn{i}"))
            self.state.servers.append(
                LabServer(
                    index=i,
                    name=f"vpn{i}",
                    ns=self.ns(f"vpn{i}"),
                    ifname=f"tl{self.id}s{i}",
                    public_key="",
                    endpoint_v4=f"198.51.100.{4 * i + 2}",
                    endpoint_v6=f"2001:db8:100:{i}::2",
                )
            )
        self.state.save()
        # No duplicate address detection in a closed lab: links created afterwards inherit it, and
        # their link-local addresses are usable at once instead of after about two seconds.
        for ns in self.namespaces:
            self.run(
                ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"
            )
        client, isp, inet = self.ns("client"), self.ns("isp"), self.ns("inet")
        script = [
            f"link add wan0 netns {client} type veth peer name cl0 netns {isp}",
            f"link add in0 netns {isp} type veth peer name eth0 netns {inet}",
        ]
        for s in self.servers:
            script.append(f"link add v{s.index} netns {isp} type veth peer name eth0 netns {s.ns}")
        sh("ip", "-batch", "-", input="\n".join(script) + "\n")
        isp_cmds = [
            "link set lo up",
            "link set cl0 up",
            "link set in0 up",
            "addr add 192.0.2.1/24 dev cl0",
            "addr add 192.0.2.3/24 dev cl0",
            "addr add 2001:db8:c::1/64 dev cl0 nodad",
            "addr add 203.0.113.1/24 dev in0",
            "addr add 2001:db8:203::1/64 dev in0 nodad",
        ]
        for s in self.servers:
            isp_cmds += [
                f"link set v{s.index} up",
                f"addr add 198.51.100.{4 * s.index + 1}/30 dev v{s.index}",
                f"addr add 2001:db8:100:{s.index}::1/64 dev v{s.index} nodad",
            ]
        ip_batch(isp, isp_cmds)
        ip_batch(client, CLIENT_LINK)
        ip_batch(
            inet,
            [
                "link set lo up",
                "link set eth0 up",
                "addr add 203.0.113.10/24 dev eth0",
                "addr add 2001:db8:203::10/64 dev eth0 nodad",
                "route add default via 203.0.113.1",
                "route add default via 2001:db8:203::1",
            ],
        )
        for s in self.servers:
            ip_batch(
                s.ns,
                [
                    "link set lo up",
                    "link set eth0 up",
                    f"addr add {s.endpoint_v4}/30 dev eth0",
                    f"addr add {s.endpoint_v6}/64 dev eth0 nodad",
                    f"route add default via 198.51.100.{4 * s.index + 1}",
                    f"route add default via 2001:db8:100:{s.index}::1",
                ],
            )
        for ns in [isp] + [s.ns for s in self.servers]:
            self.run(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        resolv = Path("/etc/netns") / client
        resolv.mkdir(parents=True, exist_ok=True)
        (resolv / "resolv.conf").write_text(f"nameserver {ISP_V4}\n")
        self._start_services()
        self._write_config()
        self._wait_ipv6()

    def _wait_ipv6(self, timeout: float = 5.0) -> None:
        """Fresh veths answer IPv6 neighbour solicitations after a moment: wait for the internet.

        One ping run that sends every 50 ms and stops at the first answer (-c1 with -w).
        """
        out = self.run(
            "client",
            "ping",
            "-n",
            "-c1",
            "-i0.05",
            f"-w{int(timeout)}",
            INTERNET_V6,
            check=False,
            timeout=timeout + 2,
        )
        if " 0% packet loss" not in out and " 1 received" not in out:
            raise LabError("IPv6 from the client to the internet host did not come up")

    def _start_services(self) -> None:
        keys = {}
        client_private = sh("wg", "genkey").strip()
        client_public = sh("wg", "pubkey", input=client_private).strip()
        for s in self.servers:
            private = sh("wg", "genkey").strip()
            s.public_key = sh("wg", "pubkey", input=private).strip()
            keys[s.name] = private
        (self.dir / "client.key").write_text(client_private)
        (self.dir / "client.key").chmod(0o600)
        # Resolvers: the ISP's and the LAN's (both must be unreachable under the lock), the
        # internet's, and one per server bound to its tunnel address (reachable only inside).
        dns = [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--address=/{LAB_DOMAIN}/{INTERNET_V4}",
            f"--address=/{LAB_DOMAIN}/{INTERNET_V6}",
            "--user=root",
            "--pid-file=",
        ]
        self.spawn(
            "isp", [*dns, f"--listen-address={ISP_V4}", f"--listen-address={LAN_HOST_V4}"], "isp-dns.log"
        )
        self.spawn("inet", [*dns, f"--listen-address={INTERNET_V4}"], "inet-dns.log")
        self.spawn("inet", [sys.executable, "-m", "supervisor.lab.responder"], "responder.log")
        self.spawn("isp", [sys.executable, "-m", "supervisor.lab.responder", "--lan"], "lan-responder.log")

        def start_server(s: LabServer) -> None:
            key_file = self.dir / f"{s.name}.key"
            key_file.write_text(keys[s.name])
            key_file.chmod(0o600)
            self.start_server_tunnel(s, client_public)
            sh(
                "ip",
                "netns",
                "exec",
                s.ns,
                "nft",
                "-f",
                "-",
                input=LAB_NAT,
            )
            s.resolver_pid = self.spawn(
                s.ns,
                [*dns, f"--listen-address={TUNNEL_SERVER_V4}", f"--interface={s.ifname}"],
                f"{s.name}-dns.log",
            ).pid

        with ThreadPoolExecutor(max_workers=max(1, len(self.servers))) as pool:
            list(pool.map(start_server, self.servers))
        self.state.save()

    def start_server_tunnel(self, s: LabServer, client_public: str | None = None) -> None:
        """A server's WireGuard interface with its key, the client as peer, its tunnel addresses.

        Also what starts a killed server again (``faults.restart_server``)."""
        if client_public is None:
            client_public = sh("wg", "pubkey", input=(self.dir / "client.key").read_text()).strip()
        if self.state.wireguard == "kernel":
            self.run(s.ns, "ip", "link", "add", s.ifname, "type", "wireguard")
        else:
            # A killed wireguard-go leaves its socket behind: waiting for it to exist would
            # return at once, before the new process listens.
            (UAPI_DIR / f"{s.ifname}.sock").unlink(missing_ok=True)
            self._start_wireguard_go(s)
        self.run(
            s.ns,
            "wg",
            "set",
            s.ifname,
            "listen-port",
            str(WG_PORT),
            "private-key",
            str(self.dir / f"{s.name}.key"),
            "peer",
            client_public,
            "allowed-ips",
            f"{TUNNEL_CLIENT_V4}/32,{TUNNEL_CLIENT_V6}/128",
        )
        ip_batch(
            s.ns,
            [
                f"addr add {TUNNEL_SERVER_V4}/24 dev {s.ifname}",
                f"addr add {TUNNEL_SERVER_V6}/64 dev {s.ifname} nodad",
                f"link set {s.ifname} up",
            ],
        )

    def _start_wireguard_go(self, s: LabServer) -> None:
        wg = self.spawn(
            s.ns,
            ["wireguard-go", "-f", s.ifname],
            f"{s.name}-wg.log",
            env={**os.environ, "LOG_LEVEL": "error"},
        )
        s.wg_pid = wg.pid
        sock = UAPI_DIR / f"{s.ifname}.sock"
        deadline = time.monotonic() + 10
        # Until it accepts, not until it exists: the file appears at bind(), before listen(), and
        # a `wg set` in between is refused and falls back to the kernel ("Protocol not supported").
        while not _accepts(sock):
            if time.monotonic() > deadline or wg.poll() is not None:
                raise LabError(f"wireguard-go for {s.name} did not start (see {self.dir}/{s.name}-wg.log)")
            time.sleep(0.01)

    def _write_config(self) -> None:
        servers_dir = self.dir / "servers"
        servers_dir.mkdir(exist_ok=True)
        private = (self.dir / "client.key").read_text().strip()
        for s in self.servers:
            path = servers_dir / f"{s.name}.conf"
            path.write_text(
                f"# lab server {s.name}\n[Interface]\nPrivateKey = {private}\n"
                f"Address = {TUNNEL_CLIENT_V4}/32, {TUNNEL_CLIENT_V6}/128\nDNS = {TUNNEL_SERVER_V4}\n\n"
                f"[Peer]\nPublicKey = {s.public_key}\nEndpoint = {s.endpoint}\n"
                f"AllowedIPs = 0.0.0.0/0, ::/0\n"
            )
            path.chmod(0o600)
        self.config_path.write_text(
            "# written by the tunlock lab\n"
            f'[tunnel]\ninterface = "{self.client_ifname}"\nbackend = "{self.state.wireguard}"\n'
            'servers = ["servers/*.conf"]\n\n'
            '[lock]\nlan_ranges = ["192.0.2.0/24", "2001:db8:c::/64"]\n\n'
            f'[control]\nsocket = "{self.dir}/control.sock"\n\n'
            f'[dns]\nresolv_conf = "/etc/netns/{self.ns("client")}/resolv.conf"\n'
        )

    def down(self) -> None:
        """Remove everything this lab made: processes (by PID), namespaces, files. Idempotent."""
        for proc in self._children:
            _kill(proc.pid)
        for pid in self.state.pids:
            _kill(pid)
        for s in self.servers:
            with contextlib.suppress(FileNotFoundError):
                (UAPI_DIR / f"{s.ifname}.sock").unlink()
        _kill_client_wireguard(self.client_ifname)
        # The app namespace a namespace-mode daemon under test created (tunnel.namespace).
        for ns in [*self.namespaces, self.ns("app")]:
            if (NETNS_DIR / ns).exists():
                _kill_namespace_processes(ns)
                sh("ip", "netns", "del", ns, check=False)
        for role in ("client", "app"):
            shutil.rmtree(Path("/etc/netns") / self.ns(role), ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def uapi_pid(ifname: str) -> int | None:
    """PID of the wireguard-go serving ``ifname`` (its UAPI socket's peer), None when none does."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(UAPI_DIR / f"{ifname}.sock"))
        except OSError:
            return None
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]


def _kill_client_wireguard(ifname: str) -> None:
    """A tunnel the daemon under test started (wireguard-go in its own session) goes too."""
    pid = uapi_pid(ifname)
    if pid is not None:
        _kill(pid)
    with contextlib.suppress(FileNotFoundError):
        (UAPI_DIR / f"{ifname}.sock").unlink()


def _kill_namespace_processes(ns: str) -> None:
    """Processes still inside a lab namespace (started there by the lab or a test) are ended."""
    pids = sh("ip", "netns", "pids", ns, check=False).split()
    for pid in pids:
        if pid.isdigit() and int(pid) != os.getpid():
            _kill(int(pid), timeout=1.0)


def labs() -> list[LabState]:
    """Every lab whose state directory exists."""
    if not LAB_ROOT.is_dir():
        return []
    found = []
    for entry in sorted(LAB_ROOT.iterdir()):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found.append(LabState.load(entry))
    return found


def sweep_stale() -> list[str]:
    """Tear down labs whose owner process is gone (a crashed test); return their ids."""
    swept = []
    for state in labs():
        if state.owner_pid and not process_alive(state.owner_pid):
            Lab(state).down()
            swept.append(state.id)
    return swept
