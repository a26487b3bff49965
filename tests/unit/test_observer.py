"""The ISP observer's classifier, on hand-built frames: what counts as a leak and what does not."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from supervisor.lab.observer import SYNC_MAGIC, classify, is_wireguard

ENDPOINTS = {("198.51.100.6", 51820), ("2001:db8:100:1::2", 51820)}
MAC = b"\x02\x00\x00\x00\x00\x01" * 2


def ipv4_udp(dst: str, dport: int, payload: bytes, sport: int = 40000) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        ip_address("192.0.2.2").packed,
        ip_address(dst).packed,
    )
    return MAC + b"\x08\x00" + ip + udp


def ipv6(dst: str, next_header: int, l4: bytes, hop_limit: int = 64) -> bytes:
    ip = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(l4),
        next_header,
        hop_limit,
        ip_address("2001:db8:c::2").packed,
        ip_address(dst).packed,
    )
    return MAC + b"\x86\xdd" + ip + l4


@pytest.mark.parametrize(
    ("payload", "real"),
    [
        (b"\x01\0\0\0" + bytes(144), True),  # handshake initiation, 148 bytes
        (b"\x02\0\0\0" + bytes(88), True),  # response, 92
        (b"\x03\0\0\0" + bytes(60), True),  # cookie reply, 64
        (b"\x04\0\0\0" + bytes(28), True),  # keepalive, 32
        (b"\x04\0\0\0" + bytes(92), True),  # data, a multiple of 16
        (b"\x04\0\0\0" + bytes(29), False),  # data of a wrong size
        (b"\x01\0\0\0" + bytes(100), False),  # initiation of a wrong size
        (b"\x01\0\x01\0" + bytes(144), False),  # reserved bytes not zero
        (b"\x05\0\0\0" + bytes(28), False),  # no such type
        (b"hello", False),
    ],
)
def test_wireguard_shape(payload, real):
    assert is_wireguard(payload) is real


def kind_of(frame: bytes) -> str | None:
    """The kind of leak ``frame`` is, None for upkeep and WireGuard to an endpoint."""
    leak = classify(frame, ENDPOINTS)
    return None if leak is None else leak["kind"]


def test_wireguard_to_an_endpoint_is_not_a_leak():
    assert classify(ipv4_udp("198.51.100.6", 51820, b"\x04\0\0\0" + bytes(44)), ENDPOINTS) is None


def test_other_udp_to_the_endpoint_port_is_a_leak():
    leak = classify(ipv4_udp("198.51.100.6", 51820, b"plain program"), ENDPOINTS)
    assert leak is not None and leak["kind"] == "udp-to-endpoint-not-wireguard"


def test_wireguard_shaped_udp_elsewhere_is_a_leak():
    leak = classify(ipv4_udp("203.0.113.10", 51820, b"\x01\0\0\0" + bytes(144)), ENDPOINTS)
    assert leak is not None and leak["kind"] == "udp" and leak["dst"] == "203.0.113.10"


def test_dns_and_dhcp():
    assert kind_of(ipv4_udp("192.0.2.1", 53, b"q")) == "dns-udp"
    assert classify(ipv4_udp("255.255.255.255", 67, b"d", sport=68), ENDPOINTS) is None


def test_dhcp_to_a_unicast_address_is_a_leak():
    """What the lock no longer lets out: the audit's datagram from port 68 to a server anywhere."""
    leak = classify(ipv4_udp("203.0.113.100", 67, b"data", sport=68), ENDPOINTS)
    assert leak is not None and leak["kind"] == "udp"
    assert classify(ipv6("ff02::1:2", 17, struct.pack("!HHHH", 546, 547, 9, 0) + b"x"), ENDPOINTS) is None
    assert classify(ipv6("2001:db8:203::10", 17, struct.pack("!HHHH", 546, 547, 9, 0) + b"x"), ENDPOINTS)


def test_ndp_beyond_the_link_is_a_leak():
    ns = bytes([135, 0, 0, 0]) + bytes(20) + b"payload"
    assert kind_of(ipv6("2001:db8:203::10", 58, ns, hop_limit=255)) == "icmpv6"
    assert classify(ipv6("2001:db8:c::1", 58, ns, hop_limit=255), ENDPOINTS) is None  # a neighbour
    assert classify(ipv6("fe80::1", 58, ns, hop_limit=255), ENDPOINTS) is None


def test_ndp_with_hop_limit_255_is_upkeep_but_not_otherwise():
    ns = bytes([135, 0, 0, 0]) + bytes(20)
    assert classify(ipv6("ff02::1:ff00:1", 58, ns, hop_limit=255), ENDPOINTS) is None
    assert kind_of(ipv6("ff02::1:ff00:1", 58, ns, hop_limit=64)) == "icmpv6"


def test_echo_request_over_ipv6_is_a_leak():
    assert kind_of(ipv6("2001:db8:203::10", 58, bytes([128, 0, 0, 0]) + bytes(4))) == "icmpv6"


def test_sync_frames_and_arp_are_not_leaks():
    assert classify(MAC + b"\x08\x06" + SYNC_MAGIC + b"token", ENDPOINTS) == {"sync": "token"}
    assert classify(MAC + b"\x08\x06" + b"token", ENDPOINTS) is None  # an ARP packet, upkeep
    assert classify(MAC + b"\x08\x06" + bytes(28), ENDPOINTS) is None


def ipv4_tcp(dst: str, sport: int, dport: int, src: str = "192.0.2.2") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x12, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp),
        0,
        0,
        64,
        6,
        0,
        ip_address(src).packed,
        ip_address(dst).packed,
    )
    return MAC + b"\x08\x00" + ip + tcp


ADMIN = frozenset({("192.0.2.2", 22, "203.0.113.10")})


def test_an_allowed_administrators_session_is_recorded_apart_and_nothing_beside_it():
    reply = classify(ipv4_tcp("203.0.113.10", 22, 50000), ENDPOINTS, ADMIN)
    assert reply is not None and reply["admin"] is True
    others = {
        "without the allowance": classify(ipv4_tcp("203.0.113.10", 22, 50000), ENDPOINTS),
        "to another peer": classify(ipv4_tcp("203.0.113.11", 22, 50000), ENDPOINTS, ADMIN),
        "from another port": classify(ipv4_tcp("203.0.113.10", 23, 50000), ENDPOINTS, ADMIN),
        "the client's own connection to port 22": classify(
            ipv4_tcp("203.0.113.10", 50000, 22), ENDPOINTS, ADMIN
        ),
        "udp from port 22": classify(ipv4_udp("203.0.113.10", 50000, b"x", sport=22), ENDPOINTS, ADMIN),
    }
    for what, verdict in others.items():
        assert verdict is not None and not verdict.get("admin"), what
