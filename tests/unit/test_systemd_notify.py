"""The sd_notify protocol: pure encoding, and the sender against a real datagram socket.

The receiving end is an AF_UNIX datagram socket bound here, as systemd binds its own: a path
in a temporary directory, or a name in the abstract namespace. No root, no systemd needed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.systemd import notify


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"tunlock-test-notify-{os.getpid()}-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


# --- pure -------------------------------------------------------------------------------------


def test_encode_is_key_value_lines() -> None:
    assert notify.encode({"READY": "1", "STATUS": "connected, server vpn1"}) == (
        b"READY=1\nSTATUS=connected, server vpn1\n"
    )


def test_a_value_with_a_line_break_stays_one_assignment() -> None:
    # "x\nREADY=1" must not smuggle a READY in.
    assert notify.encode({"STATUS": "x\nREADY=1"}) == b"STATUS=x READY=1\n"


@pytest.mark.parametrize("key", ["", "ready", "STATUS=", "A B"])
def test_encode_refuses_what_is_not_a_key(key: str) -> None:
    with pytest.raises(ValueError, match="not a notify key"):
        notify.encode({key: "1"})


def test_status_names_state_server_and_reason() -> None:
    assert notify.status_text("connected", "vpn1") == "connected, server vpn1"
    assert notify.status_text("offline", None, "no route to any server") == "offline (no route to any server)"
    assert (
        notify.status("connecting", "vpn2", "vpn1 silent")
        == b"STATUS=connecting, server vpn2 (vpn1 silent)\n"
    )
    assert len(notify.status_text("blocked", None, "x" * 1000)) == notify.MAX_STATUS_CHARS


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, None),
        ("", None),
        ("@", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/123", "\0/org/freedesktop/systemd1/notify/123"),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_socket_address(value: str | None, address: str | None) -> None:
    assert notify.socket_address(value) == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_is_half_the_period_for_this_pid(environ: dict, interval: float | None) -> None:
    assert notify.watchdog_interval(environ, pid=42) == interval


# --- the sender, against a real socket --------------------------------------------------------


def test_messages_arrive_as_datagrams(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sender = notify.Notifier.from_environ({"NOTIFY_SOCKET": path}, pid=1)
    assert sender.ready() and sender.status("connected", "vpn1") and sender.stopping()
    assert [sock.recv(4096) for _ in range(3)] == [
        b"READY=1\n",
        b"STATUS=connected, server vpn1\n",
        b"STOPPING=1\n",
    ]
    sender.close()


def test_the_abstract_namespace(abstract_receiver: tuple[socket.socket, str]) -> None:
    sock, name = abstract_receiver
    sender = notify.Notifier.from_environ({"NOTIFY_SOCKET": name}, pid=1)
    assert sender.ready()
    assert sock.recv(4096) == b"READY=1\n"
    sender.close()


def test_from_environ_takes_the_variables_out_for_children() -> None:
    environ = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7", "PATH": "/bin"}
    sender = notify.Notifier.from_environ(environ, pid=7)
    assert (sender.address, sender.watchdog_s) == ("/x", 0.5)
    assert environ == {"PATH": "/bin"}


def test_without_systemd_every_send_is_a_no_op() -> None:
    sender = notify.Notifier.from_environ({}, pid=1)
    assert not sender.enabled
    assert not sender.ready() and not sender.status("blocked", None) and not sender.stopping()


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    sender = notify.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")}, pid=1)
    assert sender.enabled
    assert not sender.ready()
    assert not sender.ready()  # and again, quietly
    sender.close()


def test_a_full_socket_never_blocks(receiver: tuple[socket.socket, str]) -> None:
    """systemd that does not read (hung, or busy) must not stall the daemon's loop: once the
    receiver's queue is full, sends fail at once instead of waiting."""
    _, path = receiver
    sender = notify.Notifier.from_environ({"NOTIFY_SOCKET": path}, pid=1)
    results = [sender.send(b"STATUS=" + b"x" * 1000 + b"\n") for _ in range(5000)]
    assert results[0] and not results[-1]
    sender.close()


def test_the_watchdog_pings_again_and_again(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sock.setblocking(False)
    sender = notify.Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"}, pid=1)
    pings: list[bytes] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.keep_watchdog_fed)
            with anyio.fail_after(10):
                while len(pings) < 3:
                    await anyio.wait_readable(sock)
                    pings.append(sock.recv(64))
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert pings == [b"WATCHDOG=1\n"] * 3
    sender.close()


def test_no_watchdog_means_no_task() -> None:
    sender = notify.Notifier.from_environ({"NOTIFY_SOCKET": "/x"}, pid=1)

    async def main() -> None:
        with anyio.fail_after(1):
            await sender.keep_watchdog_fed()  # returns at once

    anyio.run(main)
