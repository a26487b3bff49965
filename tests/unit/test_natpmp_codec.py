"""NAT-PMP messages (RFC 6886), byte for byte, and replies that must be refused."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugins.natpmp import codec


def test_requests_are_the_rfc_layout():
    assert codec.encode_external_address() == b"\x00\x00"
    # version 0, op 1 (UDP), reserved, internal 1, suggested 0, lifetime 60
    assert codec.encode_map("udp", 1, 0, 60) == bytes.fromhex("0001 0000 0001 0000 0000003c")
    assert codec.encode_map("tcp", 51413, 51413, 0) == bytes.fromhex("0002 0000 c8d5 c8d5 00000000")


def test_a_map_reply_is_decoded_and_checked_against_the_request():
    reply = bytes.fromhex("0081 0000 00001234 0001 b26c 0000003c")
    assert codec.decode_map(reply, "udp", 1) == codec.Mapping("udp", 0x1234, 1, 0xB26C, 60)
    with pytest.raises(codec.NatPmpError, match="opcode"):
        codec.decode_map(reply, "tcp", 1)  # a UDP answer to a TCP request
    with pytest.raises(codec.NatPmpError, match="internal port"):
        codec.decode_map(reply, "udp", 2)
    with pytest.raises(codec.NatPmpError, match="too short"):
        codec.decode_map(b"\x00", "udp", 1)
    with pytest.raises(codec.NatPmpError, match="16 expected"):
        codec.decode_map(reply[:12], "udp", 1)
    with pytest.raises(codec.NatPmpError, match="version"):
        codec.decode_map(b"\x02" + reply[1:], "udp", 1)


def test_a_refusal_names_the_result():
    reply = bytes.fromhex("0082 0002 00000001 0001 0000 00000000")
    with pytest.raises(codec.NatPmpRefused, match="not authorized") as caught:
        codec.decode_map(reply, "tcp", 1)
    assert caught.value.code == 2


def test_external_address_reply():
    reply = codec.encode_external_address_reply(7, IPv4Address("198.51.100.6"))
    assert reply == bytes.fromhex("0080 0000 00000007 c6336406")
    assert codec.decode_external_address(reply) == codec.ExternalAddress(7, IPv4Address("198.51.100.6"))


def test_retries_start_at_250_ms_and_double():
    assert codec.retry_timeouts(4) == [0.25, 0.5, 1.0, 2.0]
    assert len(codec.retry_timeouts()) == 9


@given(
    st.sampled_from(["udp", "tcp"]),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
)
def test_request_and_reply_round_trip_through_the_gateway_side(protocol, internal, external, lifetime, epoch):
    op, fields = codec.decode_request(codec.encode_map(protocol, internal, external, lifetime))
    assert op == codec.OP_MAP[protocol] and fields == (internal, external, lifetime)
    reply = codec.encode_map_reply(op, epoch, internal, external, lifetime)
    assert codec.decode_map(reply, protocol, internal) == codec.Mapping(
        protocol, epoch, internal, external, lifetime
    )


@given(st.binary(max_size=32))
def test_any_datagram_decodes_or_raises_a_natpmp_error(data):
    with contextlib.suppress(codec.NatPmpError):
        codec.decode_map(data, "udp", 1)


def test_bad_requests_are_refused_before_sending():
    with pytest.raises(ValueError):
        codec.encode_map("sctp", 1, 0, 60)
    with pytest.raises(ValueError):
        codec.encode_map("udp", 70000, 0, 60)
