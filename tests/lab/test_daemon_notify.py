"""`tunlock run` speaks sd_notify: what a systemd would receive, on a datagram socket of our own.

No systemd here (tests/systemd/ boots a real one): the daemon runs in the lab exactly as under
a ``Type=notify`` unit, with ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` set, and the test reads
the datagrams. What matters is the order a service manager relies on: READY=1 only once the lock
is in force and the control socket answers, STATUS= on each state, WATCHDOG=1 while the loop
turns, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.control.client import request
from tests.lab.conftest import LabUnderTest

pytestmark = pytest.mark.lab(servers=1, per_test=True)


@pytest.fixture
def notify_socket(lab: LabUnderTest) -> Iterator[tuple[socket.socket, Path]]:
    # A path, not the abstract namespace: the daemon runs in another network namespace, and
    # abstract unix sockets belong to one.
    path = lab.lab.dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock, path
    finally:
        sock.close()


def receive_until(sock: socket.socket, wanted: bytes, timeout: float = 20.0) -> list[bytes]:
    """Datagrams in arrival order, up to and including the first that is ``wanted``."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not got or got[-1] != wanted:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            raise AssertionError(f"no {wanted!r} within {timeout} s; received {got}") from None
    return got


def test_ready_after_the_lock_then_status_watchdog_and_stopping(
    lab: LabUnderTest, notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    daemon = lab.daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    try:
        daemon.start(wait_for=None)
        before_ready = receive_until(sock, b"READY=1\n")
        # At READY: the lock is in the kernel and the socket answers, with no wait at all.
        assert "table inet" in lab.lab.run("client", "nft", "list", "tables")
        assert request(daemon.socket, "status", timeout=2.0)["lock"]["installed"]
        assert any(m.startswith(b"STATUS=") for m in before_ready), before_ready

        # READY does not wait for the tunnel, so a quick handshake may come before it or after.
        if b"STATUS=connected, server vpn1\n" not in before_ready:
            receive_until(sock, b"STATUS=connected, server vpn1\n")
        receive_until(sock, b"WATCHDOG=1\n")  # the loop keeps feeding the watchdog

        os.kill(daemon.pid, signal.SIGTERM)
        end = receive_until(sock, b"STATUS=stopped\n")
        assert b"STOPPING=1\n" in end
        assert end.index(b"STOPPING=1\n") < end.index(b"STATUS=stopped\n")
        assert daemon.process is not None and daemon.process.wait(15) == 0
    finally:
        daemon.stop()
