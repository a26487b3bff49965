"""Traffic a user's programs make, from the lab's client, and the ISP's view of it.

Every probe runs in the client namespace (the calling thread enters it with
``Lab.inside``) with a short timeout and answers ``True`` when it got an answer.
A probe that is blocked by the lock fails fast (the lock rejects) or times out.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.lab.observer import SYNC_ETHERTYPE, SYNC_MAGIC
from supervisor.lab.topology import (
    INTERNET_V4,
    INTERNET_V6,
    ISP_V4,
    LAB_DOMAIN,
    LAN_HOST_V4,
    Lab,
)

PROBE_TIMEOUT_S = 1.0


def dns_query(name: str, qtype: int = 1) -> bytes:
    """A minimal DNS query (hand-built: twelve header bytes and a name; no library needed)."""
    header = struct.pack("!HHHHHH", secrets.randbits(16), 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack("!HH", qtype, 1)


def _answered(reply: bytes, query: bytes) -> bool:
    return len(reply) >= 12 and reply[:2] == query[:2] and reply[3] & 0x0F == 0


def dns_udp_answered(server: str = ISP_V4, name: str = LAB_DOMAIN) -> bool:
    """A DNS query over UDP from this thread's namespace; True when answered."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        q = dns_query(name)
        sock.sendto(q, (server, 53))
        return _answered(sock.recv(512), q)


def dns_tcp_answered(server: str = ISP_V4, name: str = LAB_DOMAIN) -> bool:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        sock.connect((server, 53))
        q = dns_query(name)
        sock.sendall(struct.pack("!H", len(q)) + q)
        reply = sock.recv(514)
        return _answered(reply[2:], q)


def tcp_answered(target: str = INTERNET_V4, port: int = 80) -> bool:
    """A TCP connection to the lab's responder; True when it greeted us."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        sock.connect((target, port))
        return sock.recv(64).startswith(b"tunlock-lab ok")


def udp_echoed(target: str = INTERNET_V4, port: int = 7) -> bool:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        token = os.urandom(8)
        sock.sendto(token, (target, port))
        return sock.recv(64) == token


def plain_udp_sent(host: str, port: int = 51820) -> bool:
    """A plain program's UDP to a server's WireGuard port: no fwmark, must never leave."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Not WireGuard-shaped: a forged 148-byte initiation is indistinguishable on the wire.
        sock.sendto(b"plain program, not wireguard", (host, port))
        return True  # sent; whether it leaked is the observer's to say


def _is_our_reply(data: bytes, v6: bool, ident: int, seq: int) -> bool:
    """An echo reply to our ``ident`` and ``seq`` (raw IPv4 sockets hand the IP header over too)."""
    if not v6:
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < 8:
        return False
    kind, _code, _csum, rident, rseq = struct.unpack("!BBHHH", data[:8])
    return kind == (129 if v6 else 0) and rident == ident and rseq == seq


def icmp_echoed(target: str = INTERNET_V4, interface: str | None = None) -> bool:
    """One echo from a raw socket (CAP_NET_RAW), for where no ``ping`` is installed (a container)."""
    from supervisor.net.probe import echo_request

    v6 = ":" in target
    family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    ident, seq = os.getpid() & 0xFFFF, secrets.randbits(16)
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.sendto(echo_request(ident, seq, b"tunlock-lab", v6), (target, 0))
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while time.monotonic() < deadline:
            if _is_our_reply(sock.recv(2048), v6, ident, seq):
                return True
    return False


class Probes:
    """The probe kinds of issue 3, each a method returning True when answered."""

    def __init__(self, lab: Lab, role: str = "client") -> None:
        """``role``: the namespace the probes start from (``app``: namespace mode's namespace)."""
        self.lab = lab
        self.role = role

    def _in_client(self, fn, *args):
        result: list = []
        error: list = []

        def run() -> None:
            try:
                with self.lab.inside(self.role):
                    result.append(fn(*args))
            except OSError:
                result.append(False)
            except BaseException as exc:  # surfaced in the caller's thread
                error.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(PROBE_TIMEOUT_S * 5)
        if error:
            raise error[0]
        return bool(result and result[0])

    def ping(self, target: str = INTERNET_V4, interface: str | None = None) -> bool:
        argv = ["ping", "-n", "-c", "1", "-W", str(int(PROBE_TIMEOUT_S))]
        if interface:
            argv += ["-I", interface]
        out = self.lab.run(self.role, *argv, target, check=False, timeout=PROBE_TIMEOUT_S + 3)
        return " 0% packet loss" in out

    def dns_udp(self, server: str = ISP_V4, name: str = LAB_DOMAIN) -> bool:
        return self._in_client(dns_udp_answered, server, name)

    def dns_tcp(self, server: str = ISP_V4, name: str = LAB_DOMAIN) -> bool:
        return self._in_client(dns_tcp_answered, server, name)

    def tcp(self, target: str = INTERNET_V4, port: int = 80) -> bool:
        return self._in_client(tcp_answered, target, port)

    def udp(self, target: str = INTERNET_V4, port: int = 7) -> bool:
        return self._in_client(udp_echoed, target, port)

    def udp_to_endpoint(self, index: int = 1) -> bool:
        """A plain program's UDP to a server's WireGuard port: no fwmark, must never leave."""
        return self._in_client(plain_udp_sent, self.lab.servers[index - 1].endpoint_v4)

    def every_kind(self) -> dict[str, bool]:
        """Run each probe kind once; the names are the issue's list."""
        return {
            "icmp4": self.ping(INTERNET_V4),
            "icmp6": self.ping(INTERNET_V6),
            "icmp4-bound-to-wan0": self.ping(INTERNET_V4, interface="wan0"),
            "dns-udp-isp": self.dns_udp(ISP_V4),
            "dns-tcp-isp": self.dns_tcp(ISP_V4),
            "dns-udp-lan": self.dns_udp(LAN_HOST_V4),
            "tcp4": self.tcp(INTERNET_V4),
            "tcp6": self.tcp(INTERNET_V6),
            "udp4": self.udp(INTERNET_V4),
            "udp6": self.udp(INTERNET_V6),
            "udp-to-endpoint": self.udp_to_endpoint(1),
        }


@dataclass
class Observer:
    """The ISP's record of what arrived from the client; see supervisor.lab.observer."""

    lab: Lab
    record: Path
    pid: int = 0
    time_scale: float = 1.0  # multiplies every wait, as LabDaemon's does
    _offset: int = field(default=0, repr=False)

    @classmethod
    def start(
        cls, lab: Lab, time_scale: float = 1.0, admin: tuple[str, ...] = (), name: str = "observer"
    ) -> Observer:
        """The observer on the ISP's side of the client link. ``admin``: administrator's sessions
        let out on purpose (``IP:PORT>PEER``), recorded apart (``admin_packets``); ``name``: of
        the record, for a second observer beside the lab's."""
        record = lab.dir / f"{name}.jsonl"
        endpoints = [s.endpoint for s in lab.servers] + [f"[{s.endpoint_v6}]:51820" for s in lab.servers]
        proc = lab.spawn(
            "isp",
            [
                sys.executable,
                "-m",
                "supervisor.lab.observer",
                "cl0",
                str(record),
                *endpoints,
                *(f"admin={flow}" for flow in admin),
            ],
            f"{name}.log",
        )
        # Scaled like every lab wait: under the VM tier's emulation Python alone starts in seconds.
        deadline = time.monotonic() + 10 * time_scale
        while not (record.exists() and record.read_text()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the observer did not start (see {lab.dir}/observer.log)")
            time.sleep(0.01)
        return cls(lab=lab, record=record, pid=proc.pid, time_scale=time_scale)

    def sync(self) -> None:
        """Return once every frame the client sent before this call has been recorded."""
        token = secrets.token_hex(6)

        def send() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind(("wan0", 0))
                mac = sock.getsockname()[4]
                frame = (
                    b"\xff" * 6
                    + mac
                    + struct.pack("!H", SYNC_ETHERTYPE)
                    + (SYNC_MAGIC + token.encode()).ljust(46, b"\0")
                )
                sock.send(frame)

        Probes(self.lab)._in_client(send)
        wait = 5 * self.time_scale
        deadline = time.monotonic() + wait
        while f'"sync": "{token}"' not in self.record.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the observer did not see the sync frame within {wait:g} s")
            time.sleep(0.005)

    def mark(self) -> int:
        """A point in the record; ``leaks(since=mark)`` counts only what came after it."""
        self.sync()
        return self.record.stat().st_size

    def leaks(self, since: int = 0) -> list[dict]:
        """Every leaked packet (as JSON objects) recorded after ``since``; an allowed
        administrator's session is not one (``admin_packets``)."""
        return [e for e in self._entries(since) if "kind" in e and not e.get("admin")]

    def admin_packets(self, since: int = 0) -> list[dict]:
        """The packets of the administrator's sessions this observer was told to allow."""
        return [e for e in self._entries(since) if e.get("admin")]

    def _entries(self, since: int) -> list[dict]:
        self.sync()
        with self.record.open() as f:
            f.seek(since)
            return [json.loads(line) for line in f if line.strip()]


def describe(leaks: list[dict]) -> str:
    """Leaks listed one per line, for an assertion message a person can read."""
    return (
        "\n".join(
            f"  {e['kind']:<32} {e['src']} -> {e['dst']}"
            + (f" port {e.get('dport')}" if "dport" in e else "")
            for e in leaks
        )
        or "  (none)"
    )


class ContinuousPing:
    """A ping every ``interval`` s from the client; ``stop()`` gives the longest time without answers.

    Used across a fault (a failover, a swap, a restart): the outage is the longest gap between
    two answered echoes, as a user's long-running connection would feel it.
    """

    def __init__(self, lab: Lab, target: str = INTERNET_V4, interval: float = 0.01) -> None:
        self.lab = lab
        self.log = lab.dir / f"ping-{secrets.token_hex(3)}.log"
        self._proc = lab.spawn(
            "client", ["ping", "-n", "-D", "-i", str(interval), "-W", "1", target], log=self.log.name
        )
        self.started = time.time()

    def answers(self) -> list[float]:
        """The wall-clock time of every answer so far."""
        return [
            float(line.split("]")[0].lstrip("["))
            for line in self.log.read_text().splitlines()
            if line.startswith("[") and "bytes from" in line
        ]

    def wait_for_answers(self, count: int, after: float | None = None, timeout: float = 10.0) -> None:
        """Until ``count`` echoes later than ``after`` (the start by default) were answered."""
        since = self.started if after is None else after
        deadline = time.monotonic() + timeout
        while sum(1 for at in self.answers() if at > since) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} answers to the ping within {timeout} s")
            time.sleep(0.02)

    def stop(self) -> PingRecord:
        self._proc.terminate()
        self._proc.wait(5)
        stopped = time.time()
        answered = self.answers()
        points = [self.started, *answered, stopped]
        longest = max(b - a for a, b in itertools.pairwise(points))
        return PingRecord(answered=len(answered), longest_outage_s=longest, answered_at=tuple(answered))


@dataclass(frozen=True)
class PingRecord:
    answered: int
    longest_outage_s: float
    answered_at: tuple[float, ...] = ()  # wall-clock time of every answer

    def first_answer_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` (wall clock) to the first answer after it, or None."""
        later = [t for t in self.answered_at if t > moment]
        return min(later) - moment if later else None
