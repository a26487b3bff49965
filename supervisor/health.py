"""A light probe through the tunnel, so a silent server shows within seconds.

WireGuard alone says little about a dead server: the handshake age only grows
past 180 s before the tunnel is certainly dead, and an idle tunnel receives
nothing at all. So while the tunnel is quiet the supervisor sends an ICMP echo
*through the tunnel* (bound to the tunnel interface) to a target on the far
side, by default the server's tunnel resolver: a live server answers and the
tunnel's rx counter moves; a dead one leaves tx growing against a flat rx. The
verdict is the state machine's (from counter samples); the reply seen here is
only a detail for the log and status.

ICMP echo is built by hand because it is eight bytes and a checksum; a library
for it would bring far more than it saves.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol

import anyio

_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0
_ICMP6_ECHO_REQUEST = 128
_ICMP6_ECHO_REPLY = 129
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class Prober(Protocol):
    """Sends one probe through the tunnel; True when it was answered in time."""

    async def probe(self, target: IPv4Address | IPv6Address, ifname: str, timeout: float) -> bool: ...


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes, v6: bool) -> bytes:
    """An ICMP (or ICMPv6) echo request; for v6 the kernel fills the checksum."""
    kind = _ICMP6_ECHO_REQUEST if v6 else _ICMP_ECHO_REQUEST
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    if v6:
        return header + payload
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", kind, 0, csum, ident, seq) + payload


class IcmpProber:
    """Echo requests from a raw socket bound to the tunnel interface (needs CAP_NET_RAW)."""

    def __init__(self) -> None:
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0

    async def probe(self, target: IPv4Address | IPv6Address, ifname: str, timeout: float) -> bool:
        target = ip_address(target)
        v6 = target.version == 6
        family, proto = (
            (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
        )
        self._seq = (self._seq + 1) & 0xFFFF
        seq = self._seq
        payload = struct.pack("!d", time.monotonic())
        with socket.socket(family, socket.SOCK_RAW, proto) as sock:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, ifname.encode())
            try:
                sock.sendto(echo_request(self._ident, seq, payload, v6), (str(target), 0))
            except OSError:
                return False  # the interface is gone or the lock refused: no answer
            with anyio.move_on_after(timeout):
                while True:
                    await anyio.wait_readable(sock)
                    data, _ = sock.recvfrom(2048)
                    if _is_our_reply(data, v6, self._ident, seq):
                        return True
        return False


def _is_our_reply(data: bytes, v6: bool, ident: int, seq: int) -> bool:
    if not v6:
        data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets hand over the IP header too
    if len(data) < 8:
        return False
    kind, _code, _csum, rident, rseq = struct.unpack("!BBHHH", data[:8])
    want = _ICMP6_ECHO_REPLY if v6 else _ICMP_ECHO_REPLY
    return kind == want and rident == ident and rseq == seq
