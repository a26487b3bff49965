"""The UAPI client: requests it builds, replies it accepts, and every malformed reply it refuses.

Replies come from a fake wireguard-go (a unix socket server in a temp dir) so that garbage,
truncation and errors can be served on purpose; the round trip against the real wireguard-go
is in tests/lab/test_wireguard_backend.py.
"""

from __future__ import annotations

import base64
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import ip_network
from pathlib import Path

import anyio
import pytest

from supervisor.addresses import parse_endpoint
from supervisor.redact import Secret
from supervisor.servers import Peer
from supervisor.wireguard.backend import DeviceConfig
from supervisor.wireguard.uapi import (
    UapiClient,
    UapiDevice,
    UapiErrno,
    UapiError,
    UapiProtocolError,
    UapiUnavailable,
    key_from_hex,
    key_to_hex,
    parse_get_reply,
    remove_peers_request,
    set_request,
)

pytestmark = pytest.mark.anyio

PRIVATE = base64.b64encode(bytes(range(1, 33))).decode()
PRIVATE_HEX = bytes(range(1, 33)).hex()
PUBLIC = base64.b64encode(b"\x22" * 32).decode()
PSK = base64.b64encode(b"\x33" * 32).decode()

# What wireguard-go 0.0.20220316 answered in the lab (keys replaced), one peer after a handshake.
REAL_GET = (
    f"private_key={PRIVATE_HEX}\n"
    "listen_port=34367\n"
    "fwmark=51820\n"
    f"public_key={'22' * 32}\n"
    f"preshared_key={'33' * 32}\n"
    "protocol_version=1\n"
    "endpoint=198.51.100.11:51820\n"
    "last_handshake_time_sec=1764028800\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=1240\n"
    "rx_bytes=92\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=0.0.0.0/0\n"
    "allowed_ip=::/0\n"
    "errno=0\n\n"
).encode()


def config() -> DeviceConfig:
    return DeviceConfig(
        private_key=Secret(PRIVATE),
        fwmark=0xCA6C,
        listen_port=None,
        peer=Peer(
            public_key=PUBLIC,
            endpoint=parse_endpoint("[2001:db8::11]:51820"),
            allowed_ips=(ip_network("0.0.0.0/0"), ip_network("::/0")),
            preshared_key=Secret(PSK),
            persistent_keepalive=25,
        ),
    )


# --- pure parts -------------------------------------------------------------------------------


def test_keys_round_trip_between_base64_and_hex() -> None:
    assert key_to_hex(PRIVATE) == PRIVATE_HEX
    assert key_from_hex(PRIVATE_HEX) == PRIVATE


@pytest.mark.parametrize("bad", ["zz" * 32, "ab" * 31, "ab" * 33])
def test_bad_hex_key_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        key_from_hex(bad)
    assert bad not in str(err.value)


def test_get_reply_parses_device_peer_handshake_and_counters() -> None:
    device = parse_get_reply(REAL_GET, "tl0")
    assert device.private_key == Secret(PRIVATE)
    assert (device.listen_port, device.fwmark) == (34367, 51820)
    (peer,) = device.peers
    assert peer.public_key == PUBLIC
    assert peer.preshared_key == Secret(PSK)
    assert str(peer.endpoint) == "198.51.100.11:51820"
    assert peer.last_handshake == 1764028800.5
    assert (peer.rx_bytes, peer.tx_bytes, peer.persistent_keepalive) == (92, 1240, 25)
    assert peer.allowed_ips == (ip_network("0.0.0.0/0"), ip_network("::/0"))
    assert PRIVATE not in repr(device) and PRIVATE_HEX not in repr(device)


def test_get_reply_without_handshake_or_peers() -> None:
    assert parse_get_reply(b"listen_port=1\nerrno=0\n\n", "tl0").peers == ()
    reply = REAL_GET.replace(b"last_handshake_time_sec=1764028800", b"last_handshake_time_sec=0")
    reply = reply.replace(b"last_handshake_time_nsec=500000000", b"last_handshake_time_nsec=0")
    assert parse_get_reply(reply, "tl0").peers[0].last_handshake is None


def test_zero_private_key_means_none_set() -> None:
    device = parse_get_reply(f"private_key={'0' * 64}\nerrno=0\n\n".encode(), "tl0")
    assert device.private_key is None


def test_unknown_keys_from_a_newer_wireguard_are_skipped() -> None:
    reply = REAL_GET.replace(b"protocol_version=1\n", b"protocol_version=1\nfuture_thing=7\n")
    assert parse_get_reply(reply, "tl0").peers[0].rx_bytes == 92


def test_set_request_replaces_peers_in_one_request_with_hex_keys() -> None:
    text = set_request(config()).decode()
    lines = text.split("\n")
    assert lines[0] == "set=1" and text.endswith("\n\n")
    assert f"private_key={PRIVATE_HEX}" in lines
    assert lines.index("replace_peers=true") < lines.index(f"public_key={'22' * 32}")
    assert f"preshared_key={'33' * 32}" in lines
    assert "endpoint=[2001:db8::11]:51820" in lines
    assert "fwmark=51820" in lines and "persistent_keepalive_interval=25" in lines
    assert lines.index("replace_allowed_ips=true") < lines.index("allowed_ip=0.0.0.0/0")
    assert "allowed_ip=::/0" in lines
    assert not any(line.startswith("listen_port") for line in lines)  # none asked: keep the current


def test_remove_peers_request_keeps_the_device() -> None:
    assert remove_peers_request() == b"set=1\nreplace_peers=true\n\n"


MALFORMED = {
    "garbage": (b"\x00\x01garbage without lines\n\n", "expected key=value"),
    "binary": (b"\xff\xfe\n\n", "not ASCII"),
    "no errno": (b"listen_port=1\n\n", "truncated"),
    "errno not a number": (b"errno=x\n\n", "not a number"),
    "errno in the middle": (b"errno=0\nlisten_port=1\nerrno=0\n\n", "errno before the end"),
    "bad port": (b"listen_port=99999\nerrno=0\n\n", "listen_port"),
    "peer field before public_key": (b"rx_bytes=1\nerrno=0\n\n", "before any public_key"),
    "bad endpoint": (f"public_key={'22' * 32}\nendpoint=nowhere\nerrno=0\n\n".encode(), "endpoint"),
    "bad allowed_ip": (f"public_key={'22' * 32}\nallowed_ip=1.2.3/99\nerrno=0\n\n".encode(), "allowed_ip"),
    "short key": (f"private_key={PRIVATE_HEX[:-2]}\nerrno=0\n\n".encode(), "private_key is malformed"),
    "key not hex": (f"private_key={PRIVATE_HEX[:-2]}zz\nerrno=0\n\n".encode(), "private_key is malformed"),
    "no end": (b"errno=0\n", "truncated"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_get_reply_is_a_clear_protocol_error(name: str) -> None:
    reply, says = MALFORMED[name]
    with pytest.raises(UapiProtocolError) as err:
        parse_get_reply(reply, "tl0")
    assert says in str(err.value)
    assert "tl0" in str(err.value)
    assert PRIVATE_HEX[:-2] not in str(err.value)


@pytest.mark.parametrize("written", [b"errno=22\n\n", b"errno=-22\n\n"])  # wireguard-go: -22
def test_errno_reply_names_the_error(written: bytes) -> None:
    with pytest.raises(UapiErrno) as err:
        parse_get_reply(written, "tl0")
    assert err.value.code == 22
    assert "errno=22 (EINVAL)" in str(err.value)


def test_a_line_holding_a_key_is_never_echoed() -> None:
    reply = f"{PRIVATE_HEX} {PRIVATE}\nerrno=0\n\n".encode()
    with pytest.raises(UapiProtocolError) as err:
        parse_get_reply(reply, "tl0")
    assert PRIVATE_HEX not in str(err.value) and PRIVATE not in str(err.value)


# --- the client against a fake wireguard-go ---------------------------------------------------


@pytest.fixture
def uapi_dir() -> Iterator[Path]:
    # Short path: a unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="tluapi", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


Answer = Callable[[anyio.abc.SocketStream], Awaitable[None]]
Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


async def serve(
    uapi_dir: Path, ifname: str, answer: Answer, seen: list[bytes]
) -> tuple[anyio.abc.SocketListener, Handler]:
    listener = await anyio.create_unix_listener(uapi_dir / f"{ifname}.sock")

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = bytearray()
            with anyio.move_on_after(1):
                while b"\n\n" not in request:
                    request += await stream.receive()
            seen.append(bytes(request))
            await answer(stream)

    return listener, handle


def replying(*chunks: bytes, then_wait: float = 0.0) -> Answer:
    async def answer(stream: anyio.abc.SocketStream) -> None:
        for chunk in chunks:
            await stream.send(chunk)
        await anyio.sleep(then_wait)

    return answer


async def exchange_with(
    uapi_dir: Path, answer: Answer, operation: str = "get", timeout: float = 2.0
) -> tuple[UapiDevice | None, list[bytes]]:
    seen: list[bytes] = []
    listener, handle = await serve(uapi_dir, "tlfake0", answer, seen)
    client = UapiClient("tlfake0", directory=uapi_dir, timeout=timeout)
    result: UapiDevice | None = None
    error: Exception | None = None
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            if operation == "get":
                result = await client.get()
            else:
                await client.configure(config())
        except Exception as err:  # raised outside the task group, so the test sees it bare
            error = err
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result, seen


async def test_client_get_round_trip(uapi_dir: Path) -> None:
    device, seen = await exchange_with(uapi_dir, replying(REAL_GET[:100], REAL_GET[100:]))
    assert seen == [b"get=1\n\n"]
    assert device is not None and device.peers[0].rx_bytes == 92


async def test_client_set_sends_the_request_and_accepts_errno_0(uapi_dir: Path) -> None:
    _, seen = await exchange_with(uapi_dir, replying(b"errno=0\n\n"), operation="set")
    assert seen == [set_request(config())]


async def test_client_set_refused_raises_errno(uapi_dir: Path) -> None:
    with pytest.raises(UapiErrno) as err:
        await exchange_with(uapi_dir, replying(b"errno=1\n\n"), operation="set")
    assert err.value.code == 1
    assert "set" in str(err.value)


async def test_client_truncated_reply_then_close(uapi_dir: Path) -> None:
    with pytest.raises(UapiProtocolError) as err:
        await exchange_with(uapi_dir, replying(REAL_GET[:60]))
    assert "truncated" in str(err.value) and "60 bytes" in str(err.value)
    assert PRIVATE_HEX[:50] not in str(err.value)


async def test_client_garbage_reply(uapi_dir: Path) -> None:
    with pytest.raises(UapiProtocolError, match="expected key=value"):
        await exchange_with(uapi_dir, replying(b"HTTP/1.1 400 Bad Request\r\n\r\n\n\n"))


async def test_client_data_after_the_end(uapi_dir: Path) -> None:
    with pytest.raises(UapiProtocolError, match="goes on after"):
        await exchange_with(uapi_dir, replying(b"errno=0\n\nmore"))


async def test_client_silent_server_times_out(uapi_dir: Path) -> None:
    with pytest.raises(UapiError, match=r"no UAPI reply from tlfake0 within 0\.2 s"):
        await exchange_with(uapi_dir, replying(then_wait=5), timeout=0.2)


async def test_client_without_server_is_unavailable(uapi_dir: Path) -> None:
    with pytest.raises(UapiUnavailable, match="wireguard-go for tlnone0 is not running"):
        await UapiClient("tlnone0", directory=uapi_dir).get()


async def test_client_stale_socket_file_is_unavailable(uapi_dir: Path) -> None:
    path = uapi_dir / "tlstale0.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # bound, never listening, then closed: the file stays, as after a crash
    assert path.exists()
    with pytest.raises(UapiUnavailable, match="not running"):
        await UapiClient("tlstale0", directory=uapi_dir).get()
