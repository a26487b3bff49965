"""One probe through the tunnel: where it goes, its packet and its socket (standard library only).

The daemon's prober (supervisor/health.py, which explains the probes) keeps these sockets open
and sends tens a second in doubt; the early bring-up (supervisor/early_tunnel.py) sends one the
moment the tunnel is up, since WireGuard starts its handshake only when it has a packet to send.

ICMP echo is built by hand because it is eight bytes and a checksum; a library for it would
bring far more than it saves.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

from supervisor.servers import Server

_ICMP_ECHO_REQUEST = 8
_ICMP6_ECHO_REQUEST = 128
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
# linux/icmp.h: ICMP_FILTER (SOL_RAW) takes a 32-bit mask of the types to drop; linux/icmpv6.h:
# ICMPV6_FILTER (IPPROTO_ICMPV6) takes 256 bits, a set bit blocks the type.
_SOL_RAW = 255
_ICMP_FILTER = 1
_ICMP6_FILTER = 1
_BLOCK_ALL_V4 = struct.pack("=I", 0xFFFFFFFF)
_BLOCK_ALL_V6 = b"\xff" * 32
DNS_PORT = 53


def probe_address(fixed: str | None, server: Server) -> IPv4Address | IPv6Address | None:
    """Where probes to ``server`` go: ``health.probe_target`` (``fixed``), else the server's
    first DNS address (inside the tunnel, so an answer proves the whole path); None: nowhere."""
    if fixed:
        return ip_address(fixed)
    return server.dns[0] if server.dns else None


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


def dns_probe(ident: int) -> bytes:
    """A DNS query for the root's NS records, recursion desired: what the UDP fallback sends."""
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + b"\x00" + struct.pack("!HH", 2, 1)


def probe_socket(v6: bool, ifname: str, raw: bool) -> socket.socket:
    """A non-blocking socket bound to ``ifname`` for probes: raw ICMP that receives nothing (the
    answer that counts is the one WireGuard counts), or else UDP for DNS queries with a tiny
    receive queue. PermissionError for a raw one without CAP_NET_RAW."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    if raw:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    else:
        sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, ifname.encode())
        if not raw:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        elif v6:
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, _BLOCK_ALL_V6)
        else:
            sock.setsockopt(_SOL_RAW, _ICMP_FILTER, _BLOCK_ALL_V4)
    except OSError:
        sock.close()
        raise
    return sock


def send_probe(
    sock: socket.socket, raw: bool, target: IPv4Address | IPv6Address, ident: int, seq: int, payload: bytes
) -> None:
    """One probe on a :func:`probe_socket`: an echo request, or a DNS query to port 53."""
    if raw:
        sock.sendto(echo_request(ident, seq, payload, target.version == 6), (str(target), 0))
    else:
        sock.sendto(dns_probe(seq), (str(target), DNS_PORT))
