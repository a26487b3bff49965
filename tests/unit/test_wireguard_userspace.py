"""The userspace backend without root: the child's environment, its log lines, DeviceConfig, and
how it follows a process (exit, restart, stop, adoption) with a stand-in for wireguard-go."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import structlog

from supervisor.addresses import parse_endpoint
from supervisor.redact import Secret
from supervisor.servers import Peer, Server
from supervisor.wireguard import userspace
from supervisor.wireguard.backend import (
    BackendDied,
    BackendError,
    BackendEvent,
    BackendRestarted,
    DeviceConfig,
    TunnelStats,
    handshake_age,
)
from supervisor.wireguard.userspace import UserspaceBackend, _Process, open_userspace_backend
from supervisor.wireguard.wireguard_go import child_env

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def test_child_environment_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WG_TUN_FD", "7")
    monkeypatch.setenv("WG_UAPI_FD", "8")
    monkeypatch.setenv("TUNLOCK_SECRET_THING", "x")
    env = child_env("verbose")
    assert env["WG_PROCESS_FOREGROUND"] == "1" and env["LOG_LEVEL"] == "verbose"
    assert not {"WG_TUN_FD", "WG_UAPI_FD", "TUNLOCK_SECRET_THING"} & set(env)


def test_wireguard_go_lines_become_log_events_with_their_level() -> None:
    backend = UserspaceBackend("tl0")
    process = _Process(pid=42, pidfd=-1)
    with structlog.testing.capture_logs() as logs:
        backend._log = structlog.get_logger().bind(ifname="tl0")
        backend._log_line(process, "ERROR: (tl0) 2026/11/24 23:40:02 Failed to send handshake initiation")
        backend._log_line(process, "DEBUG: (tl0) 2026/11/24 23:40:02 Interface up requested")
        backend._log_line(process, "something unexpected")
    assert [(e["log_level"], e["output"]) for e in logs] == [
        ("error", "Failed to send handshake initiation"),
        ("debug", "Interface up requested"),
        ("info", "something unexpected"),
    ]
    assert process.last_lines[-1] == "something unexpected"


def test_device_config_for_a_server_carries_its_peer_and_our_fwmark() -> None:
    server = Server(
        name="vpn1",
        path=Path("vpn1.conf"),
        private_key=Secret(KEY),
        addresses=(ip_interface("10.99.0.2/32"),),
        peer=Peer(
            public_key=KEY,
            endpoint=parse_endpoint("198.51.100.11:51820"),
            allowed_ips=(ip_network("0.0.0.0/0"),),
            persistent_keepalive=25,
        ),
        listen_port=51000,
    )
    config = DeviceConfig.for_server(server, fwmark=0xCA6C)
    assert (config.fwmark, config.listen_port, config.peer.persistent_keepalive) == (0xCA6C, 51000, 25)
    assert config.peer.endpoint == server.endpoint and config.private_key == server.private_key
    assert KEY not in repr(config.private_key)


def test_handshake_age() -> None:
    assert handshake_age(None) is None
    assert handshake_age(100.0, now=103.5) == 3.5
    assert handshake_age(110.0, now=103.5) == 0.0  # a clock step back never gives a negative age


@pytest.mark.anyio
async def test_a_missing_wireguard_go_is_a_clear_error(tmp_path: Path) -> None:
    async with open_userspace_backend(
        "tlnone0", binary=str(tmp_path / "wireguard-go"), uapi_dir=tmp_path
    ) as b:
        with pytest.raises(BackendError, match=r"cannot start .*wireguard-go: No such file"):
            await b.ensure_interface()


@pytest.mark.anyio
async def test_a_wireguard_go_that_exits_at_start_says_how(tmp_path: Path) -> None:
    fake = tmp_path / "fake-wireguard-go"
    line = "ERROR: (tl0) 2026/11/24 23:40:02 Failed to create TUN device: busy"
    fake.write_text(f"#!/bin/sh\necho '{line}' >&2\nexit 1\n")
    fake.chmod(0o755)
    async with open_userspace_backend("tlnone0", binary=str(fake), uapi_dir=tmp_path) as backend:
        with pytest.raises(BackendError) as err:
            await backend.ensure_interface()
    assert "exited with status 1 at start: Failed to create TUN device: busy" in str(err.value)


# --- the process, without root: a stand-in for wireguard-go ----------------------------------
#
# A stand-in, not wireguard-go: wireguard-go needs root to create its TUN device. The stand-in
# does what the backend watches: it listens on the UAPI socket (the backend knows a start is done
# when that socket names its PID), answers each request with an empty device (errno=0), logs a
# line per request, and lives until a signal ends it. No TUN: the interface name never exists here.
#
# Its log lines go out as wireguard-go's do: a failed write is ignored (Go's log package drops the
# error). Once our end of the output socket is closed (we left, or died), every write fails with
# ECONNREFUSED; a write that raised would kill the stand-in at its next line, where wireguard-go
# lives on and the next daemon adopts it.

FAKE_WIREGUARD_GO = """#!{python}
import os, signal, socket, sys
ifname = sys.argv[-1]
path = os.path.join({directory!r}, ifname + ".sock")

def log(level, message):
    try:
        os.write(2, f"{{level}}: ({{ifname}}) 2026/11/25 10:00:00 {{message}}\\n".encode())
    except OSError:
        pass  # as Go's logger: the line is lost, the program goes on

if os.path.exists(path):
    os.unlink(path)  # a killed one leaves its socket file behind, as wireguard-go would
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen()
log("INFO", "UAPI listener started")
while True:
    connection = server.accept()[0]
    with connection:
        connection.settimeout(10)
        request = b""
        try:
            while b"\\n\\n" not in request:
                chunk = connection.recv(4096)
                if not chunk:
                    break  # a look at who listens (SO_PEERCRED): no request
                request += chunk
            if request:
                log("DEBUG", "UAPI: " + request.split(b"=", 1)[0].decode(errors="replace"))
                connection.sendall(b"errno=0\\n\\n")
        except OSError:
            pass  # the client went away
"""


class Recorded:
    """The backend's reports, and a way to wait for the n-th one."""

    def __init__(self) -> None:
        self.events: list[BackendEvent] = []
        self.sleeps: SleepCounter | None = None
        self.sleeps_at: list[int] = []  # anyio.sleep calls so far, at each report
        self._changed = anyio.Event()

    async def __call__(self, event: BackendEvent) -> None:
        self.events.append(event)
        self.sleeps_at.append(self.sleeps.calls if self.sleeps else 0)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> list[BackendEvent]:
        while len(self.events) < count:
            await self._changed.wait()
        return self.events


class SleepCounter:
    """Counts anyio.sleep calls: a wait that polls sleeps, one that waits on an event does not."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real_sleep = anyio.sleep

        async def counting_sleep(delay: float, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real_sleep(delay, *args, **kwargs)

        monkeypatch.setattr(anyio, "sleep", counting_sleep)


@pytest.fixture
def uapi_dir() -> Iterator[Path]:
    # Short: a unix socket's path has at most 107 bytes, and pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="tlu-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fake_wireguard_go(uapi_dir: Path) -> Iterator[tuple[str, list[int]]]:
    """The stand-in's path, and a list where the test notes every PID it started."""
    binary = uapi_dir / "fake-wireguard-go"
    binary.write_text(FAKE_WIREGUARD_GO.format(python=sys.executable, directory=str(uapi_dir)))
    binary.chmod(0o755)
    pids: list[int] = []
    yield str(binary), pids
    for pid in pids:  # our own stand-ins only, by PID, also when the test failed
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.anyio
async def test_a_killed_wireguard_go_is_seen_through_its_pidfd_and_restarted(
    uapi_dir: Path, fake_wireguard_go: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    binary, pids = fake_wireguard_go
    reports = Recorded()
    async with open_userspace_backend("tlfake0", report=reports, binary=binary, uapi_dir=uapi_dir) as backend:
        assert await backend.ensure_interface() is True  # started, its socket answered
        first = backend.pid
        assert first is not None
        pids.append(first)
        reports.sleeps = SleepCounter(monkeypatch)
        with anyio.fail_after(30):  # a guard against a hang, not a speed limit
            os.kill(first, signal.SIGKILL)
            died = (await reports.wait_for(1))[0]
            assert died == BackendDied("tlfake0", "killed by SIGKILL")
            assert reports.sleeps_at[0] == 0  # the exit came from the pidfd, not from a polling loop
            restarted = (await reports.wait_for(2))[1]
        assert restarted == BackendRestarted("tlfake0")
        second = backend.pid
        assert second is not None and second != first
        pids.append(second)
        assert listener_pid_of(uapi_dir / "tlfake0.sock") == second
        with anyio.fail_after(30):
            await backend.close(keep_interface=False)
        assert not process_alive(second)
    assert len(reports.events) == 2  # the stop on purpose is not reported as a death


@pytest.mark.anyio
async def test_a_stop_and_the_watcher_wait_for_the_same_exit(
    uapi_dir: Path, fake_wireguard_go: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """anyio lets one task wait on a descriptor; the watcher follows the process while a stop
    (here: the interface vanished, so ensure_interface replaces wireguard-go) waits for it too."""
    binary, pids = fake_wireguard_go
    reports = Recorded()
    async with open_userspace_backend("tlfake0", report=reports, binary=binary, uapi_dir=uapi_dir) as backend:
        await backend.ensure_interface()
        first = backend._process
        assert first is not None and first.popen is not None
        pids.append(first.pid)
        await wait_until_watched(backend, first)
        # The stand-in has no TUN device, so to ensure_interface its interface is gone: it stops
        # the running one (SIGTERM, then waits for the exit) and starts another.
        with anyio.fail_after(30):
            assert await backend.ensure_interface() is True
        assert first.popen.returncode == -signal.SIGTERM  # stopped, and reaped
        second = backend.pid
        assert second is not None and second != first.pid
        pids.append(second)
        sleeps = SleepCounter(monkeypatch)
        with anyio.fail_after(30):
            await backend.close(keep_interface=False)
        assert sleeps.calls == 0  # the stop waited for the exit, it did not poll for it
        assert not process_alive(second)


async def left_running(binary: str, pids: list[int], uapi_dir: Path) -> int:
    """Start (the stand-in for) wireguard-go in a backend and leave its context, as a daemon that
    ends without closing the tunnel does: its PID, noted for the fixture's clean-up."""
    async with open_userspace_backend("tlfake0", binary=binary, uapi_dir=uapi_dir) as backend:
        await backend.ensure_interface()
        pid = backend.pid
        assert pid is not None
        pids.append(pid)
    return pid


@pytest.mark.anyio
async def test_leaving_the_context_leaves_wireguard_go_running_for_the_next_to_adopt(
    uapi_dir: Path, fake_wireguard_go: tuple[str, list[int]]
) -> None:
    binary, pids = fake_wireguard_go
    pid = await left_running(binary, pids, uapi_dir)
    assert process_alive(pid)  # as after a crash of the daemon
    reports = Recorded()
    async with open_userspace_backend("tlfake0", report=reports, binary=binary, uapi_dir=uapi_dir) as backend:
        assert await backend.adopt() is True
        assert backend.pid == pid
        with anyio.fail_after(30):
            os.kill(pid, signal.SIGTERM)
            assert (await reports.wait_for(1))[0] == BackendDied(
                "tlfake0", "exited (adopted process: status unknown)"
            )
            assert (await reports.wait_for(2))[1] == BackendRestarted("tlfake0")
        assert backend.pid not in (None, pid)
        pids.append(backend.pid)
        with anyio.fail_after(30):
            await backend.close(keep_interface=False)


@pytest.mark.anyio
async def test_an_adopted_wireguard_go_whose_log_lines_go_nowhere_still_answers(
    uapi_dir: Path, fake_wireguard_go: tuple[str, list[int]]
) -> None:
    """After the daemon that started it is gone, wireguard-go's log writes fail (ECONNREFUSED on
    the output socket); it goes on serving, and the next daemon adopts it and reads it."""
    binary, pids = fake_wireguard_go
    pid = await left_running(binary, pids, uapi_dir)
    reports = Recorded()
    async with open_userspace_backend("tlfake0", report=reports, binary=binary, uapi_dir=uapi_dir) as backend:
        assert await backend.adopt() is True
        with anyio.fail_after(30):
            # The stand-in logs a line for this request before it answers.
            assert await backend.stats() == TunnelStats.no_peer(None, 0)
        assert backend.pid == pid and process_alive(pid)
        with anyio.fail_after(30):
            await backend.close(keep_interface=False)
    assert reports.events == []


@pytest.mark.anyio
@pytest.mark.parametrize("exits", ["before the second look", "after the second look"])
async def test_a_wireguard_go_that_exits_while_being_adopted_is_replaced(
    uapi_dir: Path, fake_wireguard_go: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch, exits: str
) -> None:
    """Adoption looks at the UAPI socket twice (SO_PEERCRED, then again after opening a pidfd, to
    rule out a reused PID) and reads the program's name; the process may exit at any point of it,
    as on a busy host after a daemon restart. The exit is forced between two steps: the lookup is
    wrapped so that the process is killed and reaped around the second look."""
    binary, pids = fake_wireguard_go
    pid = await left_running(binary, pids, uapi_dir)

    def kill_and_reap() -> None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # our child (the first context started it): gone from /proc after this

    looks = 0
    real_listener_pid = userspace.listener_pid

    async def listener_pid(path: Path, timeout: float = 2.0) -> int:
        nonlocal looks
        looks += 1
        if looks == 2 and exits == "before the second look":
            kill_and_reap()
        found = await real_listener_pid(path, timeout)
        if looks == 2 and exits == "after the second look":
            kill_and_reap()
        return found

    monkeypatch.setattr(userspace, "listener_pid", listener_pid)
    reports = Recorded()
    async with open_userspace_backend("tlfake0", report=reports, binary=binary, uapi_dir=uapi_dir) as backend:
        with anyio.fail_after(30):
            started = await backend.ensure_interface()
            if exits == "before the second look":
                assert started is True  # nothing left to adopt: a new one started
                assert reports.events == []
            else:
                assert started is False  # adopted, then seen dead and restarted by the watcher
                assert await reports.wait_for(2) == [
                    BackendDied("tlfake0", "exited (adopted process: status unknown)"),
                    BackendRestarted("tlfake0"),
                ]
        replacement = backend.pid
        assert replacement is not None and replacement != pid
        pids.append(replacement)
        assert listener_pid_of(uapi_dir / "tlfake0.sock") == replacement
        with anyio.fail_after(30):
            await backend.close(keep_interface=False)


@pytest.mark.anyio
async def test_an_output_reader_started_after_its_process_was_released_ends_quietly() -> None:
    """The watcher starts a reader for the process just set; a close() that was waiting for the
    lock can stop and release that process before the reader's first step."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.close()
    process = _Process.watch(os.getpid(), output=ours)
    process.release()
    with anyio.fail_after(30):
        await UserspaceBackend("tl0")._read_output(process)  # returns, no error


async def wait_until_watched(backend: UserspaceBackend, process: _Process) -> None:
    """Let the watcher and the process's follower reach their waits (a few task switches)."""
    while process not in backend._followed:
        await anyio.lowlevel.checkpoint()
    for _ in range(10):
        await anyio.lowlevel.checkpoint()


def listener_pid_of(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        pid, _uid, _gid = struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: it has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
