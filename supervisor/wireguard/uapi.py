"""A small, strict, async client for WireGuard's cross-platform userspace API (UAPI).

wireguard-go listens on ``/var/run/wireguard/<iface>.sock``. The protocol is
text: a request is ``get=1`` or ``set=1`` followed by ``key=value`` lines and an
empty line; the reply is ``key=value`` lines ending with ``errno=N`` and an
empty line (https://www.wireguard.com/xplatform/). Keys travel as hex.

Written here rather than shelling out to ``wg``: the daemon reads statistics
every second, and a process per read costs far more than one socket round trip;
and parsing ``wg``'s output would be a protocol of its own. The parser is
strict about framing (a reply that is not ``key=value`` lines ending in
``errno=``, or that is cut short, is an error) and about the values it knows;
keys it does not know are skipped so that a newer wireguard-go still works.

No error message ever contains a key or a line that could hold one: they name
the line number and the key, never the value.
"""

from __future__ import annotations

import base64
import binascii
import errno as errno_names
import functools
import os
import socket
import struct
from ipaddress import ip_network
from pathlib import Path

import anyio
import anyio.abc
from msgspec import Struct

from supervisor.addresses import parse_endpoint
from supervisor.redact import Secret
from supervisor.servers import Endpoint, IPNetwork
from supervisor.wireguard.backend import BackendError, DeviceConfig
from supervisor.wireguard.wireguard_go import UAPI_DIR as UAPI_DIR  # where it serves

# A reply larger than this is not from a WireGuard with one peer (or even a thousand).
MAX_REPLY_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S = 2.0
_SECRET_KEYS = frozenset({"private_key", "preshared_key"})


class UapiError(BackendError):
    """The UAPI exchange failed."""


class UapiUnavailable(UapiError):
    """Nothing serves the interface's UAPI socket (no socket file, or nobody listening)."""


class UapiProtocolError(UapiError):
    """The reply does not follow the UAPI protocol (garbage, truncated, or a bad value)."""


class UapiErrno(UapiError):
    """The WireGuard process refused the request with ``errno=N`` (N != 0)."""

    def __init__(self, ifname: str, operation: str, code: int) -> None:
        self.code = code
        name = errno_names.errorcode.get(code, "unknown")
        super().__init__(f"wireguard-go refused the UAPI {operation} on {ifname}: errno={code} ({name})")


# --- keys -------------------------------------------------------------------------------------


def key_to_hex(key: str) -> str:
    """A base64 WireGuard key as the 64 hex characters the UAPI wants."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a WireGuard key is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"a WireGuard key is 32 bytes, this one {len(raw)}")
    return raw.hex()


def key_from_hex(text: str) -> str:
    """64 hex characters (UAPI) as a base64 WireGuard key; ValueError without echoing the value."""
    if len(text) != 64:
        raise ValueError(f"a hex key is 64 characters, got {len(text)}")
    try:
        return base64.b64encode(bytes.fromhex(text)).decode()
    except ValueError:
        raise ValueError("a hex key holds a character that is not hex") from None


# --- the data --------------------------------------------------------------------------------

_KEYS = ("private_key", "preshared_key")


def _repr_without_keys(record: Struct) -> str:
    """The record's usual repr with its key left out altogether: msgspec has no per-field
    ``repr=False``, and a key has no business in a repr even redacted."""
    shown = (f"{name}={getattr(record, name)!r}" for name in record.__struct_fields__ if name not in _KEYS)
    return f"{type(record).__qualname__}({', '.join(shown)})"


class UapiPeer(Struct, frozen=True):
    """One peer as ``get`` reports it."""

    public_key: str
    endpoint: Endpoint | None = None
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0
    allowed_ips: tuple[IPNetwork, ...] = ()
    preshared_key: Secret | None = None  # never in the repr
    protocol_version: int | None = None

    __repr__ = _repr_without_keys


class UapiDevice(Struct, frozen=True):
    """The device as ``get`` reports it."""

    private_key: Secret | None = None  # never in the repr
    listen_port: int | None = None
    fwmark: int = 0
    peers: tuple[UapiPeer, ...] = ()

    __repr__ = _repr_without_keys


# --- building requests (pure) ---------------------------------------------------------------


def set_request(config: DeviceConfig) -> bytes:
    """One ``set`` that makes ``config`` the whole device: key, fwmark, port, and the only peer.

    ``replace_peers`` and the new peer travel together, so a swap never leaves an instant with
    no peer or two.
    """
    peer = config.peer
    lines = ["set=1", f"private_key={key_to_hex(config.private_key.reveal())}", f"fwmark={config.fwmark}"]
    if config.listen_port is not None:
        lines.append(f"listen_port={config.listen_port}")
    lines += [
        "replace_peers=true",
        f"public_key={key_to_hex(peer.public_key)}",
        f"endpoint={peer.endpoint}",
        f"persistent_keepalive_interval={peer.persistent_keepalive or 0}",
        "replace_allowed_ips=true",
    ]
    if peer.preshared_key is not None:
        lines.append(f"preshared_key={key_to_hex(peer.preshared_key.reveal())}")
    lines += [f"allowed_ip={network}" for network in peer.allowed_ips]
    return ("\n".join(lines) + "\n\n").encode()


def remove_peers_request() -> bytes:
    """A ``set`` that removes every peer and keeps the device."""
    return b"set=1\nreplace_peers=true\n\n"


GET_REQUEST = b"get=1\n\n"


# --- parsing replies (pure) -----------------------------------------------------------------


def _lines(reply: bytes, ifname: str) -> list[tuple[int, str, str]]:
    """Split a reply into (line number, key, value); check the framing and the final errno."""
    if not reply.endswith(b"\n\n"):
        raise UapiProtocolError(f"UAPI reply from {ifname} is truncated: it does not end with an empty line")
    try:
        text = reply[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise UapiProtocolError(f"UAPI reply from {ifname} is not ASCII text") from None
    out: list[tuple[int, str, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        key, eq, value = line.partition("=")
        if not eq or not key or not key.replace("_", "").isalnum() or not key.islower():
            raise UapiProtocolError(
                f"UAPI reply from {ifname}, line {number}: expected key=value "
                f"(a line of {len(line)} characters is not)"
            )
        out.append((number, key, value))
    return out


def check_errno(reply: bytes, ifname: str, operation: str) -> list[tuple[int, str, str]]:
    """The reply's lines before ``errno=``; raise UapiErrno when errno is not 0."""
    lines = _lines(reply, ifname)
    number, key, value = lines[-1]
    if key != "errno":
        raise UapiProtocolError(
            f"UAPI reply from {ifname} is truncated: line {number} is {key!r}, the last must be errno"
        )
    # wireguard-go writes the negated errno (errno=-22); the specification shows it positive.
    if not value.removeprefix("-").isdigit() or len(value) > 12:
        raise UapiProtocolError(
            f"UAPI reply from {ifname}, line {number}: errno {value[:12]!r} is not a number"
        )
    if int(value) != 0:
        raise UapiErrno(ifname, operation, abs(int(value)))
    for other_number, other_key, _ in lines[:-1]:
        if other_key == "errno":
            raise UapiProtocolError(f"UAPI reply from {ifname}, line {other_number}: errno before the end")
    return lines[:-1]


class _PeerBuilder:
    """A peer's values as the reply's lines give them, one by one."""

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self.endpoint: Endpoint | None = None
        self.preshared_key: Secret | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.persistent_keepalive = 0
        self.protocol_version: int | None = None
        self.allowed: list[IPNetwork] = []
        self.handshake_sec = 0
        self.handshake_nsec = 0

    def build(self) -> UapiPeer:
        last = None
        if self.handshake_sec or self.handshake_nsec:
            last = self.handshake_sec + self.handshake_nsec / 1e9
        return UapiPeer(
            public_key=self.public_key,
            endpoint=self.endpoint,
            last_handshake=last,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            persistent_keepalive=self.persistent_keepalive,
            allowed_ips=tuple(self.allowed),
            preshared_key=self.preshared_key,
            protocol_version=self.protocol_version,
        )


def _number(ifname: str, number: int, key: str, value: str, maximum: int) -> int:
    if not value.isdigit() or int(value) > maximum:
        raise UapiProtocolError(
            f"UAPI reply from {ifname}, line {number}: {key} {value[:24]!r} is not a number up to {maximum}"
        )
    return int(value)


# The endpoint and allowed IPs repeat in every read of a 1 s stats loop and parsing them is most
# of a read's cost (ipaddress is slow); the few distinct values are remembered.
@functools.lru_cache(maxsize=256)
def _endpoint(text: str) -> Endpoint:
    return parse_endpoint(text)


@functools.lru_cache(maxsize=1024)
def _network(text: str) -> IPNetwork:
    return ip_network(text, strict=False)


def parse_get_reply(reply: bytes, ifname: str) -> UapiDevice:
    """Turn a ``get`` reply into a :class:`UapiDevice`; raise a UapiError on anything malformed."""
    private_key: Secret | None = None
    listen_port: int | None = None
    fwmark = 0
    peers: list[UapiPeer] = []
    peer: _PeerBuilder | None = None
    for number, key, value in check_errno(reply, ifname, "get"):
        where = f"UAPI reply from {ifname}, line {number}"
        try:
            if key in _SECRET_KEYS:
                hex_key = key_from_hex(value)
                secret = None if int(value, 16) == 0 else Secret(hex_key)
                if key == "private_key" and peer is None:
                    private_key = secret
                elif key == "preshared_key" and peer is not None:
                    peer.preshared_key = secret
                else:
                    raise UapiProtocolError(f"{where}: {key} out of place")
            elif key == "public_key":
                if peer is not None:
                    peers.append(peer.build())
                peer = _PeerBuilder(key_from_hex(value))
            elif peer is None:
                if key == "listen_port":
                    listen_port = _number(ifname, number, key, value, 65535)
                elif key == "fwmark":
                    fwmark = _number(ifname, number, key, value, 0xFFFFFFFF)
                elif key in _PEER_FIELDS:
                    raise UapiProtocolError(f"{where}: {key} before any public_key")
            elif key == "endpoint":
                peer.endpoint = _endpoint(value)
            elif key == "allowed_ip":
                peer.allowed.append(_network(value))
            elif key == "last_handshake_time_sec":
                peer.handshake_sec = _number(ifname, number, key, value, 2**63)
            elif key == "last_handshake_time_nsec":
                peer.handshake_nsec = _number(ifname, number, key, value, 999_999_999)
            elif key == "rx_bytes":
                peer.rx_bytes = _number(ifname, number, key, value, 2**64 - 1)
            elif key == "tx_bytes":
                peer.tx_bytes = _number(ifname, number, key, value, 2**64 - 1)
            elif key == "persistent_keepalive_interval":
                peer.persistent_keepalive = _number(ifname, number, key, value, 65535)
            elif key == "protocol_version":
                peer.protocol_version = _number(ifname, number, key, value, 2**32 - 1)
            # Any other key is from a newer WireGuard: skipped, the ones we rely on were checked.
        except ValueError as err:  # a bad key, endpoint or network; the message holds no key
            raise UapiProtocolError(f"{where}: {key} is malformed: {err}") from None
    if peer is not None:
        peers.append(peer.build())
    return UapiDevice(private_key=private_key, listen_port=listen_port, fwmark=fwmark, peers=tuple(peers))


_PEER_FIELDS = frozenset(
    {
        "endpoint",
        "allowed_ip",
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "rx_bytes",
        "tx_bytes",
        "persistent_keepalive_interval",
        "protocol_version",
    }
)


# --- the client -------------------------------------------------------------------------------


class UapiClient:
    """Talks to the wireguard-go serving ``ifname``: one connection per request, like ``wg`` does.

    A connection per request keeps the client stateless across wireguard-go restarts; it costs
    one ``connect`` on a local socket (measured in bench/bench_wireguard.py).
    """

    def __init__(self, ifname: str, directory: Path = UAPI_DIR, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.ifname = ifname
        self.path = directory / f"{ifname}.sock"
        self.timeout = timeout

    async def get(self) -> UapiDevice:
        """The device's configuration, peers and counters."""
        return parse_get_reply(await self.exchange(GET_REQUEST, "get"), self.ifname)

    async def set(self, request: bytes) -> None:
        """Send a ``set`` request (see :func:`set_request`); raise UapiErrno when refused."""
        if not request.startswith(b"set=1\n"):
            raise ValueError("a UAPI set request starts with set=1")
        check_errno(await self.exchange(request, "set"), self.ifname, "set")

    async def configure(self, config: DeviceConfig) -> None:
        """Make ``config`` the device's whole configuration in one ``set``."""
        await self.set(set_request(config))

    async def remove_peers(self) -> None:
        await self.set(remove_peers_request())

    async def exchange(self, request: bytes, operation: str) -> bytes:
        """Send one request and read its whole reply (up to the empty line after ``errno=``)."""
        try:
            with anyio.fail_after(self.timeout):
                stream = await anyio.connect_unix(self.path)
                async with stream:
                    await stream.send(request)
                    return await self._read_reply(stream, operation)
        except TimeoutError:
            raise UapiError(
                f"no UAPI reply from {self.ifname} within {self.timeout:g} s ({self.path}): "
                "wireguard-go is stuck or not the program listening there"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise UapiUnavailable(
                f"nothing serves {self.path} ({os.strerror(err.errno or 0)}): wireguard-go for "
                f"{self.ifname} is not running"
            ) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as err:
            raise UapiError(
                f"UAPI {operation} on {self.ifname} failed: {err.__class__.__name__} {err}"
            ) from None

    async def _read_reply(self, stream: anyio.abc.SocketStream, operation: str) -> bytes:
        reply = bytearray()
        while not _reply_complete(reply, self.ifname, operation):
            try:
                chunk = await stream.receive(65536)
            except anyio.EndOfStream:
                raise _truncated(reply, self.ifname, operation) from None
            reply += chunk
        return bytes(reply)


def _reply_complete(reply: bytearray, ifname: str, operation: str) -> bool:
    """Whether ``reply`` holds a whole reply (up to the empty line after ``errno=``); an error
    when it can never become one."""
    if len(reply) > MAX_REPLY_BYTES:
        raise UapiProtocolError(f"UAPI {operation} reply from {ifname} exceeds {MAX_REPLY_BYTES} bytes")
    if b"\n\n" not in reply:
        return False
    if not reply.endswith(b"\n\n"):
        raise UapiProtocolError(
            f"UAPI {operation} reply from {ifname} goes on after the empty line that ends it"
        )
    return True


def _truncated(reply: bytearray, ifname: str, operation: str) -> UapiProtocolError:
    return UapiProtocolError(
        f"UAPI {operation} reply from {ifname} is truncated: the connection closed "
        f"after {len(reply)} bytes, before the empty line that ends a reply"
    )


def set_blocking(path: Path, request: bytes, ifname: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """:meth:`UapiClient.set`, blocking: for ``tunlock run``'s early bring-up, which runs before
    any event loop (supervisor/early_tunnel.py). UapiError when it fails or is refused."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(request)
            reply = bytearray()
            while not _reply_complete(reply, ifname, "set"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise _truncated(reply, ifname, "set")
                reply += chunk
    except TimeoutError:
        raise UapiError(f"no UAPI reply from {ifname} within {timeout:g} s ({path})") from None
    except OSError as err:
        raise UapiError(f"UAPI set on {ifname} failed: {err.__class__.__name__} {err}") from None
    check_errno(bytes(reply), ifname, "set")


def listener_pid_blocking(path: Path) -> int | None:
    """:func:`listener_pid`, blocking, None when nothing listens at ``path`` (yet)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        return _peer_pid(sock)


def _peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid)


async def listener_pid(path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """PID of the process listening on the UAPI socket ``path`` (SO_PEERCRED), for adoption.

    Raises UapiUnavailable when nothing listens there.
    """
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_unix(path)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
        raise UapiUnavailable(f"nothing serves {path}") from None
    async with stream:
        return _peer_pid(stream.extra(anyio.abc.SocketAttribute.raw_socket))
