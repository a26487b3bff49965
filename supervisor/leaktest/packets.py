"""Reading captured IP packets and telling which probe each belongs to (pure).

The capture is a packet socket (``AF_PACKET``, ``SOCK_DGRAM``: the link header already
stripped, so Ethernet and the tunnel's layer-3 device read alike) that sees every packet an
interface sends or receives, before the host's firewall judges what arrives: a reply the lock's
input chain drops is still seen. A probe is known by what the kernel gave its socket: the
local port (UDP, TCP) or the echo identifier and sequence (ICMP), with the target and its port;
an ICMP error quotes the offending packet's headers, which are matched the same way.

Parsed by hand: a few fixed header offsets, as the lab's observer does; a packet library would
be a large dependency for this.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address

from supervisor.servers import IPAddress

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58
_TCP_SYN, _TCP_RST, _TCP_ACK = 0x02, 0x04, 0x10
# ICMP types: (echo request, echo reply, destination unreachable, time exceeded) per family.
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
UNREACHABLE = {4: 3, 6: 1}
TIME_EXCEEDED = {4: 11, 6: 3}
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options


@dataclass(frozen=True)
class Packet:
    """The fields of one IP packet a judgement needs; ``quoted`` is what an ICMP error quotes."""

    family: int
    proto: int
    src: IPAddress
    dst: IPAddress
    sport: int = 0  # UDP/TCP ports; for an ICMP echo: its identifier and sequence
    dport: int = 0
    tcp_flags: int = 0
    icmp_type: int = -1
    icmp_code: int = -1
    quoted: Packet | None = None


def parse(data: bytes, quoted: bool = False) -> Packet | None:
    """One IPv4 or IPv6 packet (None when it is neither or too short to say).

    ``quoted``: the copy inside an ICMP error, whose transport header may be cut after 8 bytes.
    """
    if not data:
        return None
    version = data[0] >> 4
    if version == 4 and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        proto, l4 = data[9], data[ihl:]
        src: IPAddress = IPv4Address(data[12:16])
        dst: IPAddress = IPv4Address(data[16:20])
        if struct.unpack("!H", data[6:8])[0] & 0x1FFF:
            return Packet(4, proto, src, dst)  # a later fragment: no transport header
    elif version == 6 and len(data) >= 40:
        proto, l4 = data[6], data[40:]
        src, dst = IPv6Address(data[8:24]), IPv6Address(data[24:40])
        while proto in _IPV6_EXTENSIONS and len(l4) >= 8:
            proto, l4 = l4[0], l4[(l4[1] + 1) * 8 :]
    else:
        return None
    family = version
    if proto in (PROTO_UDP, PROTO_TCP) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
        flags = l4[13] if proto == PROTO_TCP and len(l4) >= 14 else 0
        return Packet(family, proto, src, dst, sport, dport, tcp_flags=flags)
    if proto in (PROTO_ICMP, PROTO_ICMPV6) and len(l4) >= 8:
        kind, code = l4[0], l4[1]
        if kind in (ECHO_REQUEST[family], ECHO_REPLY[family]):
            ident, seq = struct.unpack("!HH", l4[4:8])
            return Packet(family, proto, src, dst, ident, seq, icmp_type=kind, icmp_code=code)
        inner = None
        if not quoted and kind in (UNREACHABLE[family], TIME_EXCEEDED[family]):
            inner = parse(l4[8:], quoted=True)
        return Packet(family, proto, src, dst, icmp_type=kind, icmp_code=code, quoted=inner)
    return Packet(family, proto, src, dst)


@dataclass(frozen=True)
class ProbeKey:
    """How a sent probe is recognised: its transport, target and what the kernel gave its socket.

    ``local`` is the source port of a UDP or TCP probe and the echo identifier of an ICMP one
    (``seq`` its sequence); ``port`` the target's port.
    """

    family: int
    transport: str  # icmp | udp | tcp
    target: IPAddress
    port: int
    local: int
    seq: int = 0


class ReplyKind(StrEnum):
    TIME_EXCEEDED = "ICMP time exceeded"
    ECHO_REPLY = "ICMP echo reply"
    UNREACHABLE = "ICMP destination unreachable"
    SYN_ACK = "TCP SYN-ACK"
    RESET = "TCP reset"
    UDP_ANSWER = "UDP answer"
    DNS_ANSWER = "DNS answer"


def _proto(key: ProbeKey) -> int:
    if key.transport == "icmp":
        return PROTO_ICMP if key.family == 4 else PROTO_ICMPV6
    return PROTO_TCP if key.transport == "tcp" else PROTO_UDP


def is_probe(packet: Packet, key: ProbeKey) -> bool:
    """Whether ``packet`` is the probe itself (as sent, or as quoted in an ICMP error)."""
    if packet.family != key.family or packet.proto != _proto(key) or packet.dst != key.target:
        return False
    if key.transport == "icmp":
        return (
            packet.icmp_type == ECHO_REQUEST[key.family]
            and packet.sport == key.local
            and packet.dport == key.seq
        )
    return packet.sport == key.local and packet.dport == key.port


def reply_to(packet: Packet, key: ProbeKey) -> tuple[ReplyKind, int] | None:
    """What ``packet`` (arriving at this host) says about the probe ``key``, with the ICMP code
    (0 for other kinds); None when it is not about it."""
    if packet.family != key.family:
        return None
    if packet.quoted is not None and is_probe(packet.quoted, key):
        if packet.icmp_type == TIME_EXCEEDED[key.family]:
            return ReplyKind.TIME_EXCEEDED, packet.icmp_code
        return ReplyKind.UNREACHABLE, packet.icmp_code
    if packet.proto != _proto(key) or packet.src != key.target:
        return None
    if key.transport == "icmp":
        if packet.icmp_type == ECHO_REPLY[key.family] and (packet.sport, packet.dport) == (
            key.local,
            key.seq,
        ):
            return ReplyKind.ECHO_REPLY, 0
        return None
    if (packet.sport, packet.dport) != (key.port, key.local):
        return None
    if key.transport == "tcp":
        if packet.tcp_flags & _TCP_RST:
            return ReplyKind.RESET, 0
        if packet.tcp_flags & (_TCP_SYN | _TCP_ACK) == _TCP_SYN | _TCP_ACK:
            return ReplyKind.SYN_ACK, 0
        return None
    return (ReplyKind.DNS_ANSWER if key.port == 53 else ReplyKind.UDP_ANSWER), 0
