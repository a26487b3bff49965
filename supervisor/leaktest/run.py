"""The leak test's I/O: find the host's ways out, send every probe at once, capture, ask the lock.

A thin shell around the pure parts: ``probes`` says what to send, ``packets`` and ``judge``
what the capture and the sockets saw, ``checks`` and ``report`` the rest. The probes go in
parallel (one anyio task each, non-blocking sockets) and each waits at most
``REPLY_WAIT_S`` for its answer; the whole run is bounded by ``RUN_LIMIT_S``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.config import Config
from supervisor.errors import TunlockError
from supervisor.leaktest import checks
from supervisor.leaktest.judge import Evidence, Reply, Verdict, judge, sort_captured
from supervisor.leaktest.packets import ETH_P_IP, ETH_P_IPV6, ProbeKey, ReplyKind
from supervisor.leaktest.probes import (
    PAYLOAD,
    Gateway,
    HostFacts,
    Kind,
    Probe,
    Uplink,
    parse_resolv_conf,
    plan_probes,
    resolvers_to_probe,
)
from supervisor.leaktest.report import Report
from supervisor.net.dns import DEFAULT_STATE_DIR, written_by_tunlock
from supervisor.net.links import collect
from supervisor.net.netns import managed_resolv_conf
from supervisor.net.probe import dns_probe, echo_request
from supervisor.servers import IPAddress

REPLY_WAIT_S = 1.0  # a first hop answers in milliseconds; a second covers a slow home router
CAPTURE_GRACE_S = 0.2  # after the last probe's wait, for answers still on their way
RUN_LIMIT_S = 10.0
TUNNEL_QUERY_S = 2.0
_ETH_P_ALL = 0x0003
_SOL_PACKET, _PACKET_STATISTICS = 263, 6
_PACKET_OUTGOING = 4
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8
_IP_RECVERR, _IPV6_RECVERR = 11, 25
_RESOLVED_UPSTREAMS = Path("/run/systemd/resolve/resolv.conf")
_RESOLVCONF_RECORDS = Path("/run/resolvconf/interface")


class LeakTestError(TunlockError):
    """The test could not run (not root, not in a lab namespace in lab-only mode...)."""


# --- the host ---------------------------------------------------------------------------------


async def _read_links(ipr: AsyncIPRoute, tunnel: str) -> tuple[tuple[Uplink, ...], dict[int, str]]:
    names: dict[int, str] = {}
    candidates: list[tuple[int, str]] = []
    for link in await collect(await ipr.link("dump")):
        name = link.get_attr("IFLA_IFNAME")
        names[link["index"]] = name
        if (
            name == tunnel
            or link["flags"] & _IFF_LOOPBACK
            or not link["flags"] & _IFF_UP
            or link.get_attr("IFLA_MASTER")
        ):
            continue
        candidates.append((link["index"], name))
    families: dict[int, set[int]] = {}
    for msg in await collect(await ipr.addr("dump")):
        address = ip_address(msg.get_attr("IFA_ADDRESS"))
        if address.version == 6 and address.is_link_local:
            continue  # link-local alone reaches no further than the link
        families.setdefault(msg["index"], set()).add(address.version)
    uplinks = tuple(Uplink(name, frozenset(families[i])) for i, name in candidates if families.get(i))
    return uplinks, names


async def _read_gateways(ipr: AsyncIPRoute, names: dict[int, str], tunnel: str) -> tuple[Gateway, ...]:
    out: list[Gateway] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in await collect(await ipr.route("dump", family=family, table=254)):
            gateway, oif = route.get_attr("RTA_GATEWAY"), route.get_attr("RTA_OIF")
            if route["dst_len"] == 0 and gateway and names.get(oif, tunnel) != tunnel:
                out.append(Gateway(ip_address(gateway), names[oif]))
    return tuple(dict.fromkeys(out))


async def _route_interface(ipr: AsyncIPRoute, target: IPAddress, names: dict[int, str]) -> str | None:
    """The interface the routing table picks for an ordinary (unmarked) packet to ``target``."""
    try:
        (route,) = await collect(await ipr.route("get", dst=str(target)))
    except NetlinkError:  # no route is an answer too: nothing to name
        return None
    return names.get(route.get_attr("RTA_OIF"))


def resolvers_before(config: Config, state_dir: Path) -> tuple[tuple[IPAddress, ...], str]:
    """The resolvers the host had before tunlock, and where they were found.

    In order: the copy tunlock's DNS manager saved before rewriting the resolver file; the
    configured resolver file, unless tunlock wrote it; ``/etc/resolv.conf`` likewise;
    systemd-resolved's upstream list (the links' own DNS); resolvconf's records of other
    interfaces. The tunnel's own resolvers are left out of this list (they are probed as such).
    """
    ifname = config.settings.tunnel.interface
    files = [
        (state_dir / f"{ifname}.resolv.conf.orig", "resolv.conf saved by tunlock"),
        (config.settings.dns.resolv_conf, str(config.settings.dns.resolv_conf)),
        (Path("/etc/resolv.conf"), "/etc/resolv.conf"),
        (_RESOLVED_UPSTREAMS, "systemd-resolved"),
    ]
    if _RESOLVCONF_RECORDS.is_dir():
        files += [
            (p, "resolvconf") for p in sorted(_RESOLVCONF_RECORDS.iterdir()) if p.name != f"tun.{ifname}"
        ]
    tunnel = {d for s in config.servers for d in s.dns}
    found: list[IPAddress] = []
    origins: list[str] = []
    for path, origin in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if written_by_tunlock(text):
            continue  # the tunnel's, written by tunlock
        fresh = [a for a in parse_resolv_conf(text) if a not in tunnel and a not in found]
        if fresh:
            found += fresh
            origins.append(origin)
    return tuple(found), ", ".join(origins) or "none found"


def _nameservers(path: Path) -> tuple[IPAddress, ...]:
    try:
        return parse_resolv_conf(path.read_text())
    except OSError:
        return ()


# --- sending ------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One probe on its way: its socket's key, and what the socket itself said."""

    probe: Probe
    key: ProbeKey | None = None
    send_error: int | None = None
    setup_error: str | None = None
    replies: list[Reply] = field(default_factory=list)


def _address(probe: Probe, port: int) -> tuple[Any, ...]:
    if probe.family == 4:
        return (str(probe.target), port)
    scope = socket.if_nametoindex(probe.interface) if probe.target.is_link_local and probe.interface else 0
    return (str(probe.target), port, 0, scope)


def _socket(probe: Probe) -> tuple[socket.socket, bool]:
    """A non-blocking socket for ``probe``, bound to its interface, with its hop limit and no
    mark; and whether it is a raw ICMP socket (a ping socket otherwise)."""
    family = socket.AF_INET if probe.family == 4 else socket.AF_INET6
    raw = False
    transport = probe.kind.transport
    if transport == "icmp":
        proto = socket.IPPROTO_ICMP if probe.family == 4 else socket.IPPROTO_ICMPV6
        try:
            sock = socket.socket(family, socket.SOCK_RAW, proto)
            raw = True
        except PermissionError:  # no CAP_NET_RAW: an unprivileged ping socket, where allowed
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if probe.interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, probe.interface.encode())
        with contextlib.suppress(PermissionError):  # 0 is what an unprivileged socket has anyway
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)
        if probe.family == 4:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, probe.ttl)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, probe.ttl)
        # An ICMP error reaches an unconnected UDP socket, and fails a TCP connect at once
        # (instead of a silent retry: an ICMPv6 unreachable in SYN-SENT), only with RECVERR.
        if probe.family == 4:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        if transport != "icmp":
            sock.bind(("0.0.0.0", 0) if probe.family == 4 else ("::", 0))
    except BaseException:
        sock.close()
        raise
    return sock, raw


async def _send_icmp(sent: Sent, sock: socket.socket, raw: bool) -> None:
    probe = sent.probe
    ident, seq = secrets.randbits(16), secrets.randbits(16)
    try:
        sock.sendto(echo_request(ident, seq, PAYLOAD, probe.family == 6), _address(probe, 0))
    except OSError as err:
        sent.send_error = err.errno
        return
    if not raw:
        ident = sock.getsockname()[1]  # a ping socket's identifier is its port
    sent.key = ProbeKey(probe.family, "icmp", probe.target, 0, ident, seq)
    with anyio.move_on_after(REPLY_WAIT_S):
        while True:
            await anyio.wait_readable(sock)
            try:
                data, source = sock.recvfrom(2048)
            except OSError as err:
                sent.send_error = err.errno
                return
            if probe.family == 4 and raw:
                data = data[(data[0] & 0x0F) * 4 :]
            # A ping socket hands over only its own replies; a raw socket every ICMP message.
            is_echo_reply = len(data) >= 8 and data[0] == (0 if probe.family == 4 else 129)
            if is_echo_reply and (not raw or struct.unpack("!HH", data[4:8]) == (ident, seq)):
                sent.replies.append(Reply(ReplyKind.ECHO_REPLY, source[0], None))
                return


async def _send_udp(sent: Sent, sock: socket.socket) -> None:
    probe = sent.probe
    dns = probe.kind is Kind.DNS_UDP
    payload = dns_probe(secrets.randbits(16)) if dns else PAYLOAD
    sent.key = ProbeKey(probe.family, "udp", probe.target, probe.port, sock.getsockname()[1])
    try:
        sock.sendto(payload, _address(probe, probe.port))
    except OSError as err:
        sent.send_error = err.errno
        return
    with anyio.move_on_after(REPLY_WAIT_S):
        await anyio.wait_readable(sock)
        try:
            _data, source = sock.recvfrom(2048)
        except OSError as err:  # an ICMP error came back: from this host or from outside
            sent.send_error = err.errno
            return
        sent.replies.append(Reply(ReplyKind.DNS_ANSWER if dns else ReplyKind.UDP_ANSWER, source[0], None))


async def _send_tcp(sent: Sent, sock: socket.socket) -> None:
    probe = sent.probe
    sent.key = ProbeKey(probe.family, "tcp", probe.target, probe.port, sock.getsockname()[1])
    code = sock.connect_ex(_address(probe, probe.port))
    if code not in (0, errno.EINPROGRESS):
        sent.send_error = code
        return
    with anyio.move_on_after(REPLY_WAIT_S):
        await anyio.wait_writable(sock)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            sent.send_error = code
        else:
            sent.replies.append(Reply(ReplyKind.SYN_ACK, str(probe.target), None))


async def send_probe(probe: Probe) -> Sent:
    """Send one probe and wait at most ``REPLY_WAIT_S`` for what its socket hears."""
    sent = Sent(probe)
    try:
        sock, raw = _socket(probe)
    except OSError as err:
        sent.setup_error = f"{errno.errorcode.get(err.errno or 0, err)} opening the socket ({err.strerror})"
        return sent
    with sock:
        if probe.kind.transport == "icmp":
            await _send_icmp(sent, sock, raw)
        elif probe.kind.transport == "udp":
            await _send_udp(sent, sock)
        else:
            await _send_tcp(sent, sock)
    return sent


# --- the capture ------------------------------------------------------------------------------


class Capture:
    """Every IP packet that passes an interface of this namespace, loopback aside, while open.

    A packet socket (CAP_NET_RAW) bound to no interface; read in a thread, so that the probes'
    tasks never wait on it. ``dropped``: packets the socket had no room for (a busy host).
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self.sock.settimeout(0.05)
        self.frames: list[tuple[str, bool, bytes]] = []  # (interface, outgoing, IP packet)
        self.dropped = 0
        self._stop = threading.Event()

    def read(self) -> None:
        """Read until ``stop``: run in a thread."""
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            ifname, proto, pkttype = addr[0], addr[1], addr[2]
            if ifname != "lo" and proto in (ETH_P_IP, ETH_P_IPV6):
                self.frames.append((ifname, pkttype == _PACKET_OUTGOING, data))

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            stats = self.sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
            self.dropped = struct.unpack("II", stats)[1]
        self.sock.close()


# --- the checks ---------------------------------------------------------------------------------


def _lock_checks(config: Config, daemon: dict[str, Any] | None) -> list[checks.CheckResult]:
    from supervisor.lock import nft
    from supervisor.lock.configured import policy_from_config
    from supervisor.lock.render import fingerprint, owned_table

    table = config.settings.lock.table
    known = {fingerprint(policy_from_config(config)): "every server"}
    known[fingerprint(policy_from_config(config, servers=()))] = "no server"
    for server in config.servers:
        known.setdefault(fingerprint(policy_from_config(config, servers=[server])), f"server {server.name}")
    try:
        state = nft.status(table)
        owned = nft.status(owned_table(table))
    except TunlockError as err:
        return [checks.CheckResult("lock", checks.Status.FAIL, f"cannot read the lock: {err}")]
    daemon_owned = (daemon or {}).get("lock", {}).get("owned")
    egress = nft.egress_counter(table) is not None
    uplinks = (daemon or {}).get("lock", {}).get("egress") or []
    return [
        checks.check_lock(table, state.installed, state.fingerprint, known),
        checks.check_egress(table, egress, [str(u) for u in uplinks]),
        checks.check_owned(
            owned_table(table), owned.installed, daemon is not None, daemon_owned, owned.fingerprint, known
        ),
    ]


def _daemon_status(config: Config) -> dict[str, Any] | None:
    from supervisor.control.client import request

    try:
        return request(config.settings.control.socket, "status", timeout=2.0)
    except (TunlockError, OSError):
        return None


async def _tunnel_check(config: Config, daemon: dict[str, Any] | None) -> checks.CheckResult:
    state = daemon.get("state") if daemon else None
    if state != "connected":
        return checks.check_tunnel(state, None, "")
    assert daemon is not None
    server = next((s for s in config.servers if s.name == daemon.get("server")), None)
    resolvers = list(server.dns) if server else []
    if not resolvers:
        return checks.check_tunnel(state, None, "the server names no tunnel resolver to ask")
    target = resolvers[0]
    family = socket.AF_INET if target.version == 4 else socket.AF_INET6
    query = dns_probe(secrets.randbits(16))
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        started = time.monotonic()
        try:
            sock.sendto(query, (str(target), 53))
        except OSError as err:
            return checks.check_tunnel(state, False, f"DNS query to {target}: {err.strerror}")
        with anyio.move_on_after(TUNNEL_QUERY_S):
            await anyio.wait_readable(sock)
            try:
                reply = sock.recv(2048)
            except OSError as err:
                return checks.check_tunnel(state, False, f"DNS query to {target}: {err.strerror}")
            if reply[:2] == query[:2]:
                ms = (time.monotonic() - started) * 1000
                return checks.check_tunnel(
                    state, True, f"the tunnel's resolver {target} answered in {ms:.0f} ms"
                )
    return checks.check_tunnel(
        state, False, f"no answer from the tunnel's resolver {target} within {TUNNEL_QUERY_S:g} s"
    )


def _bypass_check(config: Config, egress_held: bool) -> checks.CheckResult:
    from supervisor.net.bypass import read_link_facts

    try:
        facts = read_link_facts(
            exclude=(config.settings.tunnel.interface,), uplinks=config.settings.lock.uplinks
        )
    except (OSError, TunlockError) as err:
        return checks.CheckResult("bypass", checks.Status.NOTE, f"could not look: {err}")
    return checks.check_bypass([(w.kind, w.interface, w.detail) for w in facts.bypass], egress_held)


# --- the run --------------------------------------------------------------------------------------


def ensure_may_probe() -> None:
    """Root (raw sockets, SO_BINDTODEVICE, the lock's table), and in lab-only mode a lab namespace."""
    from supervisor.safety import LAB_ONLY_ENV, current_lab_namespace, lab_only

    if os.geteuid() != 0:
        raise LeakTestError("leaktest needs root: it binds sockets to interfaces and reads the lock")
    if lab_only() and current_lab_namespace() is None:
        raise LeakTestError(
            f"{LAB_ONLY_ENV} is set and this process is not in a lab network namespace: "
            "refusing to send probes from this machine's own network"
        )


async def run_leaktest(config: Config, state_dir: Path | None = None) -> Report:
    """Every probe, every check: the report (its ``exit_code`` is the command's)."""
    started = time.monotonic()
    tunnel = config.settings.tunnel.interface
    before, where = await anyio.to_thread.run_sync(resolvers_before, config, state_dir or DEFAULT_STATE_DIR)
    async with AsyncIPRoute() as ipr:
        uplinks, names = await _read_links(ipr, tunnel)
        gateways = await _read_gateways(ipr, names, tunnel)
        facts = HostFacts(
            tunnel_interface=tunnel,
            uplinks=uplinks,
            gateways=gateways,
            resolvers=resolvers_to_probe(before, gateways, [d for s in config.servers for d in s.dns]),
            endpoints=tuple(s.endpoint for s in config.servers),
        )
        probes = plan_probes(facts)
        routes = {
            t: await _route_interface(ipr, t, names) for t in {p.target for p in probes if not p.interface}
        }
    notes = [f"resolvers before tunlock: {', '.join(map(str, before)) or 'none'} (from {where})"]
    if not uplinks:
        notes.append("no interface outside the tunnel has an address: nothing to probe")

    capture: Capture | None
    try:
        capture = Capture()
    except PermissionError:
        capture = None
        notes.append(
            "no packet capture (CAP_NET_RAW is missing): the verdicts rest on the kernel's answers "
            "at send time and on replies that pass this host's firewall; a probe sent without "
            "refusal and unanswered is LEAK? (unproven), not blocked"
        )
    sent: list[Sent] = []

    async def one(probe: Probe) -> None:
        sent.append(await send_probe(probe))

    with anyio.fail_after(RUN_LIMIT_S):
        try:
            async with anyio.create_task_group() as tg:
                if capture is not None:
                    tg.start_soon(anyio.to_thread.run_sync, capture.read)
                try:
                    async with anyio.create_task_group() as probes_tg:
                        for probe in probes:
                            probes_tg.start_soon(one, probe)
                    await anyio.sleep(CAPTURE_GRACE_S)
                finally:
                    if capture is not None:
                        capture.stop()  # the reading thread ends within its 50 ms read timeout
        finally:
            if capture is not None:
                capture.close()
        daemon = await anyio.to_thread.run_sync(_daemon_status, config)
        tunnel_check = await _tunnel_check(config, daemon)
    if capture is not None and capture.dropped:
        notes.append(f"the capture dropped {capture.dropped} packets (a busy host): 'not seen' is weaker")

    by_probe = {s.probe: s for s in sent}
    keys = [(i, by_probe[p].key) for i, p in enumerate(probes) if by_probe[p].key is not None]
    seen = sort_captured(capture.frames if capture else [], [(i, k) for i, k in keys if k is not None])
    results: list[tuple[Probe, Verdict]] = []
    for i, probe in enumerate(probes):
        s = by_probe[probe]
        left, replies = seen.get(i, ((), ()))
        evidence = Evidence(
            send_error=s.send_error,
            left_via=tuple(left),
            replies=(*replies, *s.replies),
            captured=capture is not None and not capture.dropped,
            routed_via=routes.get(probe.target) if not probe.interface else None,
            setup_error=s.setup_error,
        )
        results.append((probe, judge(probe, evidence, tunnel)))

    check_list = await anyio.to_thread.run_sync(_lock_checks, config, daemon)
    connected = bool(daemon and daemon.get("state") == "connected")
    resolv_conf = managed_resolv_conf(config.settings.dns.resolv_conf, config.settings.tunnel.namespace)
    named = await anyio.to_thread.run_sync(_nameservers, resolv_conf)
    current = next((s for s in config.servers if daemon and s.name == daemon.get("server")), None)
    tunnel_dns = current.dns if current else tuple(d for s in config.servers for d in s.dns)
    check_list.append(checks.check_dns(str(resolv_conf), named, tunnel_dns, connected))
    check_list.append(checks.check_ipv6(results, any(6 in u.families for u in uplinks)))
    egress_held = any(c.name == "lock-egress" and c.status is checks.Status.OK for c in check_list)
    check_list.append(await anyio.to_thread.run_sync(_bypass_check, config, egress_held))
    check_list.append(tunnel_check)
    return Report(
        results=tuple(results),
        checks=tuple(check_list),
        seconds=time.monotonic() - started,
        captured=capture is not None,
        notes=tuple(notes),
    )
