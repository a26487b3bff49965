"""NAT-PMP (RFC 6886) messages: pure encode and decode, no sockets.

Requests and replies are fixed-size big-endian records; a reply is checked against the request
it answers (version 0, opcode 128 + request's, the same internal port) so that a stray or
forged datagram is refused as a whole rather than half-believed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

PORT = 5351  # the gateway's NAT-PMP port
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP = {"udp": 1, "tcp": 2}
REPLY_OFFSET = 128
# Section 3.1: first retry after 250 ms, doubling; the RFC allows 9 tries (~64 s) in all.
INITIAL_TIMEOUT_S = 0.25
MAX_TRIES = 9

RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


class NatPmpError(Exception):
    """A reply that does not answer the request, or a result other than success."""


class NatPmpRefused(NatPmpError):
    """The gateway answered with a non-zero result code."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"the gateway refused: {RESULTS.get(code, 'unknown result')} ({code})")


@dataclass(frozen=True)
class ExternalAddress:
    epoch: int
    address: IPv4Address


@dataclass(frozen=True)
class Mapping:
    protocol: str
    epoch: int
    internal_port: int
    external_port: int
    lifetime_s: int


def encode_external_address() -> bytes:
    return struct.pack("!BB", VERSION, OP_EXTERNAL_ADDRESS)


def encode_map(protocol: str, internal_port: int, external_port: int, lifetime_s: int) -> bytes:
    """Ask for (``lifetime_s`` > 0) or give up (0) a mapping; ``external_port`` is a suggestion."""
    if protocol not in OP_MAP:
        raise ValueError(f"protocol {protocol!r}: udp or tcp")
    for value, what in ((internal_port, "internal port"), (external_port, "external port")):
        if not 0 <= value <= 65535:
            raise ValueError(f"{what} {value} is not in 0-65535")
    if not 0 <= lifetime_s <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime_s} is out of range")
    return struct.pack("!BBHHHI", VERSION, OP_MAP[protocol], 0, internal_port, external_port, lifetime_s)


def _header(data: bytes, opcode: int, size: int) -> tuple[int, int]:
    if len(data) < 4:
        raise NatPmpError(f"reply of {len(data)} bytes is too short")
    version, op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise NatPmpError(f"reply has version {version}, not {VERSION}")
    if op != REPLY_OFFSET + opcode:
        raise NatPmpError(f"reply opcode {op} does not answer request opcode {opcode}")
    if result != 0:
        raise NatPmpRefused(result)
    if len(data) < size:
        raise NatPmpError(f"reply of {len(data)} bytes, {size} expected")
    (epoch,) = struct.unpack_from("!I", data, 4)
    return result, epoch


def decode_external_address(data: bytes) -> ExternalAddress:
    _, epoch = _header(data, OP_EXTERNAL_ADDRESS, 12)
    return ExternalAddress(epoch, IPv4Address(data[8:12]))


def decode_map(data: bytes, protocol: str, internal_port: int) -> Mapping:
    """The mapping a reply grants, checked against the request (protocol and internal port)."""
    _, epoch = _header(data, OP_MAP[protocol], 16)
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    if internal != internal_port:
        raise NatPmpError(f"reply is for internal port {internal}, not {internal_port}")
    return Mapping(protocol, epoch, internal, external, lifetime)


def retry_timeouts(tries: int = MAX_TRIES) -> list[float]:
    """How long to wait for each try's reply: 250 ms, doubling (RFC 6886 section 3.1)."""
    return [INITIAL_TIMEOUT_S * 2**n for n in range(tries)]


# --- the gateway's side, for the lab's responder and the tests --------------------------------


def decode_request(data: bytes) -> tuple[int, tuple[int, int, int] | None]:
    """(opcode, (internal port, suggested external port, lifetime) for a map, else None)."""
    if len(data) < 2:
        raise NatPmpError("request too short")
    version, op = struct.unpack_from("!BB", data)
    if version != VERSION:
        raise NatPmpError(f"version {version}")
    if op == OP_EXTERNAL_ADDRESS:
        return op, None
    if op in OP_MAP.values() and len(data) >= 12:
        internal, external, lifetime = struct.unpack_from("!HHI", data, 4)
        return op, (internal, external, lifetime)
    raise NatPmpError(f"opcode {op}")


def encode_external_address_reply(epoch: int, address: IPv4Address, result: int = 0) -> bytes:
    return struct.pack("!BBHI", VERSION, REPLY_OFFSET, result, epoch) + address.packed


def encode_map_reply(
    op: int, epoch: int, internal: int, external: int, lifetime: int, result: int = 0
) -> bytes:
    return struct.pack("!BBHIHHI", VERSION, REPLY_OFFSET + op, result, epoch, internal, external, lifetime)
