"""The userspace backend: wireguard-go, started and watched by us, driven over its UAPI socket.

How the process is kept:

- **Foreground, own session.** wireguard-go runs with ``-f`` (it never forks
  away from us) in a session of its own, so a Ctrl-C on our terminal, a
  SIGKILL of our process group or our own death does not take it along: the
  tunnel outlives the daemon and the next daemon adopts it.
- **Its output into our log through a datagram socket pair, not a pipe.** Go
  programs die of SIGPIPE when they write to a broken pipe on stdout/stderr,
  so a pipe would kill wireguard-go at its first log line after our death. A
  connected unix datagram socket whose reader is gone fails the write with
  ECONNREFUSED instead, which Go's logger ignores. One datagram is one log
  line, so lines never need reassembly.
- **Death seen through a pidfd** (``pidfd_open``), which works the same for our
  child and for an adopted process that is not our child, and cannot be fooled
  by PID reuse. One task per process waits on it (anyio allows one waiter per
  descriptor) and sets an event; the watcher and a stop wait on that event, so
  nothing polls. A dead wireguard-go takes its TUN device with it; the watcher
  starts a new one, re-applies the last configuration (key, fwmark, peer) and
  reports :class:`BackendRestarted` so the tunnel puts addresses and routes back.
- **Adoption**: the UAPI socket answers, ``SO_PEERCRED`` names the process
  behind it, and that process runs in our network namespace (the socket
  directory is shared by all namespaces, so a name served from another one is
  refused, not adopted). Nothing is changed on adoption.
- **Namespace mode** (``placement``, supervisor/net/netns.py): wireguard-go is started in the
  host namespace, where its UDP socket stays, and its TUN device is moved into the app namespace
  before anyone configures it. wireguard-go takes the move: it reads and writes its TUN through
  the descriptor it opened, and it tells up from down by probing that descriptor rather than by
  netlink events (which it only hears in its own namespace). The UAPI socket is a path, reachable
  from every namespace. Adoption then asks that the process runs in the host namespace.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from msgspec import Struct, field

from supervisor.log import get_logger
from supervisor.wireguard.backend import (
    BackendDied,
    BackendError,
    BackendRestarted,
    BackendRestartFailed,
    DeviceConfig,
    InterfaceTaken,
    Report,
    TunnelStats,
    handshake_age,
    ignore_events,
)
from supervisor.wireguard.uapi import UAPI_DIR, UapiClient, UapiUnavailable, listener_pid
from supervisor.wireguard.wireguard_go import DEFAULT_BINARY, StartedWireguardGo, start_wireguard_go

if TYPE_CHECKING:  # namespace mode's placement, imported only where that mode is on
    from supervisor.net.netns import Placement

log = get_logger(__name__)

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 3.0
RESTART_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
_LOG_LEVELS = {"DEBUG": "debug", "INFO": "info", "ERROR": "error"}


def _netns_id(pid: int | str) -> tuple[int, int]:
    """Identity of a process's network namespace ("thread-self": the calling thread's)."""
    st = os.stat(f"/proc/{pid}/ns/net")
    return st.st_dev, st.st_ino


def link_exists(ifname: str) -> bool:
    """Whether a link named ``ifname`` exists in this thread's network namespace.

    if_nametoindex asks the kernel through a socket of the calling thread's namespace, unlike
    /sys/class/net, which shows the namespace sysfs was mounted in.
    """
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


class _Process(Struct, eq=False):
    """A wireguard-go serving our interface: our child (``popen``) or an adopted one.

    Its exit is awaited on its pidfd by one task only (:meth:`UserspaceBackend._follow`): anyio
    allows one waiter per descriptor, so everyone else (the watcher, a stop) waits on ``gone``.
    """

    pid: int
    pidfd: int
    popen: subprocess.Popen[bytes] | None = None
    output: socket.socket | None = None
    started: float = field(default_factory=time.monotonic)
    last_lines: list[str] = field(default_factory=list)
    gone: anyio.Event = field(default_factory=anyio.Event)

    @classmethod
    def watch(
        cls, pid: int, popen: subprocess.Popen[bytes] | None = None, output: socket.socket | None = None
    ) -> _Process:
        return cls(pid=pid, pidfd=os.pidfd_open(pid), popen=popen, output=output)

    def exited(self) -> bool:
        """Whether it has exited (or was released), right now: no waiting, no task switch."""
        if self.gone.is_set() or self.pidfd < 0:
            return True  # released: no longer watched, which happens once its exit was seen
        # A pidfd turns readable when its process exits, child or not. A zero timeout: this asks
        # once, for a decision taken now (the follower task may not have run yet).
        gone = bool(select.select([self.pidfd], [], [], 0)[0])
        if gone:
            self.reap()
        return gone

    def reap(self) -> None:
        if self.popen is not None:
            self.popen.poll()  # reap our child, which also records its exit status

    def exit_reason(self) -> str:
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return "stopped serving its UAPI socket"
            if code < 0:
                return f"killed by {signal.Signals(-code).name}"
            return f"exited with status {code}"
        return "exited (adopted process: status unknown)"

    def signal(self, signum: int) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signum)

    def release(self) -> None:
        """Close our descriptors; the process itself is left alone.

        ``notify_closing`` first: it wakes the task waiting on a descriptor (with
        ClosedResourceError) and unregisters it, so a number reused at once is not mistaken.
        """
        if self.output is not None:
            with contextlib.suppress(OSError):
                anyio.notify_closing(self.output)
            self.output.close()
            self.output = None
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                anyio.notify_closing(self.pidfd)
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1
        self.reap()  # reap it if it is gone, so no zombie stays


class UserspaceBackend:
    """wireguard-go for one interface: spawn or adopt, configure over UAPI, restart on death.

    Made by :func:`open_userspace_backend`, which runs its tasks: a watcher that reads
    wireguard-go's output into our log and restarts it when it dies, reporting
    :class:`BackendDied`, then :class:`BackendRestarted` (or :class:`BackendRestartFailed` per
    failed attempt) to ``report``, and one task per process that waits for its exit on its pidfd.
    Leaving that context stops watching and leaves wireguard-go running (as a crash would);
    :meth:`close` stops it.
    """

    kind = "userspace"

    def __init__(
        self,
        ifname: str,
        *,
        report: Report = ignore_events,
        binary: str = DEFAULT_BINARY,
        uapi_dir: Path = UAPI_DIR,
        log_level: str = "error",
        start_timeout: float = START_TIMEOUT_S,
        placement: Placement | None = None,
        started: StartedWireguardGo | None = None,
    ) -> None:
        """``started``: a wireguard-go this process started for ``ifname`` before the backend
        existed (``tunlock run``'s early bring-up): adopted as our child, its output read."""
        self.ifname = ifname
        self._placement = placement
        self._report = report
        self._binary = binary
        self._uapi_dir = uapi_dir
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._uapi = UapiClient(ifname, directory=uapi_dir)
        self._process: _Process | None = None
        self._followed: set[_Process] = set()
        self._config: DeviceConfig | None = None
        self._has_peer = False
        self._lock = anyio.Lock()
        self._process_changed = anyio.Event()
        self._closing = False
        self._started = started
        self._followers: anyio.abc.TaskGroup | None = None  # where each process's follower runs
        self._log = log.bind(ifname=ifname, backend=self.kind)

    # --- the backend interface ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the wireguard-go serving the interface, when there is one."""
        return self._process.pid if self._process else None

    async def adopt(self) -> bool:
        async with self._lock:
            return await self._adopt()

    async def ensure_interface(self) -> bool:
        async with self._lock:
            process = self._process
            if process is not None and not process.exited():
                if link_exists(self.ifname):
                    return False
                # Its TUN was deleted: this wireguard-go is on its way out; do not wait for it.
                self._log.info("the interface is gone; replacing its wireguard-go", pid=process.pid)
                await self._stop(process)
            if await self._adopt():
                return False
            await self._spawn()
            return True

    async def configure(self, config: DeviceConfig) -> None:
        async with self._lock:
            await self._uapi.configure(config)
            self._config, self._has_peer = config, True

    async def remove_peer(self) -> None:
        async with self._lock:
            await self._uapi.remove_peers()
            self._has_peer = False

    async def stats(self) -> TunnelStats:
        device = await self._uapi.get()
        if not device.peers:
            return TunnelStats.no_peer(device.listen_port, device.fwmark)
        peer = device.peers[0]
        return TunnelStats(
            public_key=peer.public_key,
            endpoint=peer.endpoint,
            last_handshake=peer.last_handshake,
            handshake_age_s=handshake_age(peer.last_handshake),
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
            listen_port=device.listen_port,
            fwmark=device.fwmark,
        )

    async def close(self, keep_interface: bool) -> None:
        async with self._lock:
            self._closing = True
            process, self._process = self._process, None
            self._process_changed.set()
            if process is None:
                if not keep_interface and await self._adopt_quietly():
                    process, self._process = self._process, None
                if process is None:
                    return
            try:
                if not keep_interface:
                    await self._stop(process)
            finally:
                process.release()

    # --- inside -------------------------------------------------------------------------------

    async def _adopt_quietly(self) -> bool:
        try:
            return await self._adopt()
        except BackendError:
            return False

    async def _adopt(self) -> bool:
        """Watch the wireguard-go already serving our interface, if there is one here."""
        path = self._uapi.path
        try:
            pid = await listener_pid(path)
        except UapiUnavailable:
            if link_exists(self.ifname):
                raise InterfaceTaken(
                    f"interface {self.ifname} exists but no wireguard-go serves it ({path}): "
                    "it is another program's; pick another tunnel.interface or delete that link"
                ) from None
            return False
        try:
            home = self._placement.host_id if self._placement else _netns_id("thread-self")
            same_netns = _netns_id(pid) == home
        except FileNotFoundError:
            return False  # it just exited
        current = self._process
        if same_netns and current is not None and current.pid == pid and not current.exited():
            return True  # already ours
        if not same_netns:
            raise InterfaceTaken(
                f"{path} is served by process {pid} in another network namespace: the UAPI socket "
                "directory is shared by all namespaces, so interface names must be unique on the "
                "machine; pick another tunnel.interface"
            )
        try:
            process = self._watch_adopted(pid)
        except ProcessLookupError:
            return False
        try:
            # The PID was reused between the two looks, or the process has exited since the first
            # (nothing serves the socket now): either way there is nothing to adopt.
            reused = await listener_pid(path) != pid
        except UapiUnavailable:
            reused = True
        except BaseException:
            process.release()
            raise
        if reused:
            process.release()
            return False
        self._set_process(self._follow(process))
        if self._placement is not None and not link_exists(self.ifname):
            # A daemon that died between starting wireguard-go and moving its TUN in.
            await self._placement.move_in(self.ifname)
        try:
            program = (await anyio.Path(f"/proc/{pid}/comm").read_text()).strip()
        except FileNotFoundError:
            # It exited since the second look; its follower has seen that already, and the
            # watcher reports the death and starts another, as for any death.
            program = "(exited)"
        self._log.info("adopted the running wireguard-go", pid=pid, program=program)
        return True

    def _watch_adopted(self, pid: int) -> _Process:
        """Follow ``pid``: as our child, with its output, when it is the wireguard-go this process
        started before the backend existed; otherwise as a stranger's."""
        started = self._started
        if started is not None and started.pid == pid:
            self._started = None
            return _Process.watch(pid, popen=started.popen, output=started.output)
        self._forget_started()  # it is gone, and another serves the name
        return _Process.watch(pid)

    def _forget_started(self) -> None:
        """Let the wireguard-go started before the backend go, once it is known not to serve
        (reaped if it has exited, so no zombie stays)."""
        started, self._started = self._started, None
        if started is not None:
            started.output.close()
            started.popen.poll()

    async def _spawn(self) -> None:
        """Start wireguard-go for our interface and wait until its UAPI socket answers."""
        self._forget_started()
        # A dead wireguard-go's TUN may take a moment to go. Polled, bounded: the event for it is
        # an RTM_DELLINK on an rtnetlink socket subscribed to link changes, a second monitor
        # opened for a rare wait that is usually over at the first look.
        with anyio.move_on_after(1.0):
            while link_exists(self.ifname):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        if link_exists(self.ifname):
            raise InterfaceTaken(f"interface {self.ifname} exists and is not served by wireguard-go")
        placement = self._placement

        def start() -> StartedWireguardGo:
            # Namespace mode: forked from a thread in the host namespace, so its UDP socket is there.
            spawn = placement.run_in_host if placement is not None else None
            return start_wireguard_go(
                self.ifname, binary=self._binary, log_level=self._log_level, spawn=spawn
            )

        try:
            started = await anyio.to_thread.run_sync(start) if placement is not None else start()
        except OSError as err:
            raise BackendError(f"cannot start {self._binary}: {err.strerror or err}") from None
        popen, ours = started.popen, started.output
        process = self._follow(_Process.watch(popen.pid, popen=popen, output=ours))
        self._log.info("started wireguard-go", pid=popen.pid)
        try:
            await self._wait_served(process)
            if self._placement is not None:
                await self._placement.move_in(self.ifname)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop(process)
                process.release()
            raise
        self._set_process(process)

    async def _wait_served(self, process: _Process) -> None:
        # Polled, bounded by start_timeout: nothing tells us that wireguard-go's UAPI socket now
        # listens (a file appearing needs inotify, which the standard library lacks, and a
        # connect would still be needed to know it answers); its exit cuts the wait short.
        with anyio.move_on_after(self._start_timeout):
            while not process.exited():
                try:
                    if await listener_pid(self._uapi.path, timeout=0.5) == process.pid:
                        return
                except UapiUnavailable:
                    pass
                self._drain_output(process)
                await anyio.sleep(0.005)
        self._drain_output(process)
        said = "; ".join(process.last_lines[-3:]) or "no output"
        if process.exited():
            raise BackendError(f"wireguard-go for {self.ifname} {process.exit_reason()} at start: {said}")
        raise BackendError(
            f"wireguard-go for {self.ifname} did not open {self._uapi.path} within "
            f"{self._start_timeout:g} s: {said}"
        )

    def _set_process(self, process: _Process) -> None:
        previous, self._process = self._process, process
        if previous is not None and previous is not process:
            previous.release()
        self._process_changed.set()

    async def _stop(self, process: _Process) -> None:
        """SIGTERM (wireguard-go removes its TUN and socket), SIGKILL if it lingers."""
        process.signal(signal.SIGTERM)
        if not await self._wait_exit(process, STOP_TIMEOUT_S):
            self._log.warning("wireguard-go ignored SIGTERM; killing it", pid=process.pid)
            process.signal(signal.SIGKILL)
            await self._wait_exit(process, STOP_TIMEOUT_S)
        self._log.info("stopped wireguard-go", pid=process.pid)

    async def _wait_exit(self, process: _Process, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for ``process`` to exit, as its follower sees it."""
        if process.exited():
            return True
        with anyio.move_on_after(timeout):
            await process.gone.wait()
        return process.exited()

    def _follow(self, process: _Process) -> _Process:
        """Start the one task that waits for ``process``'s exit on its pidfd; returns ``process``."""
        if self._followers is None:
            process.release()
            raise RuntimeError("UserspaceBackend is used outside open_userspace_backend()")
        self._followed.add(process)
        self._followers.start_soon(self._follow_exit, process)
        return process

    async def _follow_exit(self, process: _Process) -> None:
        # Shielded: a stop that must finish (shielded itself) waits on ``gone``, also while our
        # task group is being cancelled. It ends when the process exits or is released.
        try:
            if process.pidfd < 0:
                return  # released before this task ran
            with anyio.CancelScope(shield=True):
                await anyio.wait_readable(process.pidfd)
        except (anyio.ClosedResourceError, OSError):
            return  # released: we no longer follow it
        finally:
            self._followed.discard(process)
        process.reap()
        process.gone.set()

    # --- the watcher --------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Follow whichever process serves the interface; restart it when it dies."""
        while True:
            process = self._process
            # Reset before waiting (no await in between): only changes from now on wake us.
            self._process_changed = anyio.Event()
            if process is None or self._closing:
                await self._process_changed.wait()
                continue
            async with anyio.create_task_group() as tg:
                if process.output is not None:
                    tg.start_soon(self._read_output, process)
                await self._wait_exit_or_change(process)
                tg.cancel_scope.cancel()
            if self._process is not process or self._closing or not process.exited():
                continue  # replaced, closed on purpose, or woken by a change that kept it
            self._drain_output(process)
            reason = process.exit_reason()
            self._log.error("wireguard-go died", pid=process.pid, reason=reason)
            process.release()
            self._process = None
            await self._report(BackendDied(self.ifname, reason))
            await self._restart()

    async def _wait_exit_or_change(self, process: _Process) -> None:
        """Until ``process`` exited (its follower says so) or another one serves the interface."""
        changed = self._process_changed
        async with anyio.create_task_group() as tg:

            async def wait_then_stop(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait_then_stop, process.gone)
            tg.start_soon(wait_then_stop, changed)

    async def _restart(self) -> None:
        """Bring wireguard-go back with the last configuration; report how it went.

        Every BackendDied is followed by BackendRestarted, or by BackendRestartFailed per failed
        attempt until one succeeds (with a growing pause, never giving up: unattended hosts).
        """
        attempt = 0
        while not self._closing:
            try:
                async with self._lock:
                    if self._closing:
                        return
                    # ensure_interface (a reconnect) may have brought it back meanwhile.
                    if self._process is None or self._process.exited():
                        if not await self._adopt():
                            await self._spawn()
                        if self._config is not None and self._has_peer:
                            await self._uapi.configure(self._config)
            except BackendError as err:
                delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                attempt += 1
                self._log.error("restarting wireguard-go failed", attempt=attempt, error=str(err))
                await self._report(BackendRestartFailed(self.ifname, str(err), attempt))
                await anyio.sleep(delay)
                continue
            self._log.info("wireguard-go restarted", pid=self.pid, attempts=attempt + 1)
            await self._report(BackendRestarted(self.ifname))
            return

    async def _read_output(self, process: _Process) -> None:
        # None once released, which can happen before this task first runs: the watcher starts
        # it for the process just set, and a close() waiting for the lock may stop and release
        # that process before the new task's first step.
        while process.output is not None:
            try:
                await anyio.wait_readable(process.output)
            except anyio.ClosedResourceError:
                return  # released
            if not self._drain_output(process):
                return

    def _drain_output(self, process: _Process) -> bool:
        """Log every line wireguard-go wrote; False once its end is closed."""
        if process.output is None:
            return False
        while True:
            try:
                data = process.output.recv(65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            for line in data.decode(errors="replace").splitlines():
                self._log_line(process, line)

    def _log_line(self, process: _Process, line: str) -> None:
        # wireguard-go writes "LEVEL: (iface) yyyy/mm/dd hh:mm:ss message".
        level, _, rest = line.partition(": ")
        message = rest.split(") ", 1)[-1]
        message = message[20:] if message[:4].isdigit() else message
        method = _LOG_LEVELS.get(level, "info")
        process.last_lines = [*process.last_lines[-9:], message or line]
        getattr(self._log, method)("wireguard-go", pid=process.pid, output=message or line)


@contextlib.asynccontextmanager
async def open_userspace_backend(
    ifname: str,
    *,
    report: Report = ignore_events,
    binary: str = DEFAULT_BINARY,
    uapi_dir: Path = UAPI_DIR,
    log_level: str = "error",
    start_timeout: float = START_TIMEOUT_S,
    placement: Placement | None = None,
    started: StartedWireguardGo | None = None,
) -> AsyncIterator[UserspaceBackend]:
    """The userspace backend for ``ifname`` with its watcher running, for the ``async with`` body.

    Leaving it stops watching and leaves wireguard-go running, exactly as a crash would (the
    next daemon adopts it); the body's own exception goes on as it is.
    """
    backend = UserspaceBackend(
        ifname,
        report=report,
        binary=binary,
        uapi_dir=uapi_dir,
        log_level=log_level,
        start_timeout=start_timeout,
        placement=placement,
        started=started,
    )
    body_error: BaseException | None = None
    async with anyio.create_task_group() as followers:
        backend._followers = followers
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(backend._watch)
                try:
                    yield backend
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as err:
                    # Carried past the task groups, which would wrap it in an exception group.
                    body_error = err
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            # The watcher is done, a start it had under way stopped (shielded, with its follower
            # still there to see the exit). What runs on is left running: the next daemon adopts
            # it. Releasing wakes the followers, which are shielded.
            backend._followers = None
            backend._process = None
            for process in list(backend._followed):
                process.release()
    if body_error is not None:
        raise body_error
