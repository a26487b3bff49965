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

from supervisor.lab.observer import SYNC_ETHERTYPE
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


class Probes:
    """The probe kinds of issue 3, each a method returning True when answered."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def _in_client(self, fn, *args):
        result: list = []
        error: list = []

        def run() -> None:
            try:
                with self.lab.inside("client"):
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
        out = self.lab.run("client", *argv, target, check=False, timeout=PROBE_TIMEOUT_S + 3)
        return " 0% packet loss" in out

    def dns_udp(self, server: str = ISP_V4, name: str = LAB_DOMAIN) -> bool:
        def query() -> bool:
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(PROBE_TIMEOUT_S)
                q = dns_query(name)
                sock.sendto(q, (server, 53))
                return _answered(sock.recv(512), q)

        return self._in_client(query)

    def dns_tcp(self, server: str = ISP_V4, name: str = LAB_DOMAIN) -> bool:
        def query() -> bool:
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(PROBE_TIMEOUT_S)
                sock.connect((server, 53))
                q = dns_query(name)
                sock.sendall(struct.pack("!H", len(q)) + q)
                reply = sock.recv(514)
                return _answered(reply[2:], q)

        return self._in_client(query)

    def tcp(self, target: str = INTERNET_V4, port: int = 80) -> bool:
        def connect() -> bool:
            family = socket.AF_INET6 if ":" in target else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(PROBE_TIMEOUT_S)
                sock.connect((target, port))
                return sock.recv(64).startswith(b"tunlock-lab ok")

        return self._in_client(connect)

    def udp(self, target: str = INTERNET_V4, port: int = 7) -> bool:
        def echo() -> bool:
            family = socket.AF_INET6 if ":" in target else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(PROBE_TIMEOUT_S)
                token = os.urandom(8)
                sock.sendto(token, (target, port))
                return sock.recv(64) == token

        return self._in_client(echo)

    def udp_to_endpoint(self, index: int = 1) -> bool:
        """A plain program's UDP to a server's WireGuard port: no fwmark, must never leave."""
        server = self.lab.servers[index - 1]

        def send() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(PROBE_TIMEOUT_S)
                # Not WireGuard-shaped: a forged 148-byte initiation is indistinguishable on the wire.
                sock.sendto(b"plain program, not wireguard", (server.endpoint_v4, 51820))
                return True  # sent; whether it leaked is the observer's to say

        return self._in_client(send)

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
    _offset: int = field(default=0, repr=False)

    @classmethod
    def start(cls, lab: Lab) -> Observer:
        record = lab.dir / "observer.jsonl"
        endpoints = [s.endpoint for s in lab.servers] + [f"[{s.endpoint_v6}]:51820" for s in lab.servers]
        proc = lab.spawn(
            "isp",
            [sys.executable, "-m", "supervisor.lab.observer", "cl0", str(record), *endpoints],
            "observer.log",
        )
        deadline = time.monotonic() + 10
        while not (record.exists() and record.read_text()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the observer did not start (see {lab.dir}/observer.log)")
            time.sleep(0.01)
        return cls(lab=lab, record=record, pid=proc.pid)

    def sync(self) -> None:
        """Return once every frame the client sent before this call has been recorded."""
        token = secrets.token_hex(6)

        def send() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind(("wan0", 0))
                mac = sock.getsockname()[4]
                frame = (
                    b"\xff" * 6 + mac + struct.pack("!H", SYNC_ETHERTYPE) + token.encode().ljust(46, b"\0")
                )
                sock.send(frame)

        Probes(self.lab)._in_client(send)
        deadline = time.monotonic() + 5
        while f'"sync": "{token}"' not in self.record.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the observer did not see the sync frame within 5 s")
            time.sleep(0.005)

    def mark(self) -> int:
        """A point in the record; ``leaks(since=mark)`` counts only what came after it."""
        self.sync()
        return self.record.stat().st_size

    def leaks(self, since: int = 0) -> list[dict]:
        """Every leaked packet (as JSON objects) recorded after ``since``."""
        self.sync()
        with self.record.open() as f:
            f.seek(since)
            entries = [json.loads(line) for line in f if line.strip()]
        return [e for e in entries if "kind" in e]


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

    def stop(self) -> PingRecord:
        self._proc.terminate()
        self._proc.wait(5)
        stopped = time.time()
        answered = [
            float(line.split("]")[0].lstrip("["))
            for line in self.log.read_text().splitlines()
            if line.startswith("[") and "bytes from" in line
        ]
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
