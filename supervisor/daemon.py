"""``tunlock run``: the real adapters wired to the runtime, in one task group.

Order at start, so that nothing leaves before the lock is in force:

1. make the runtime's inbox (its event queue), then open the tunnel backend and *take over* a
   tunnel left running (by an earlier daemon, or by ``tunlock run`` just before: see
   supervisor/early_tunnel.py), its server identified, nothing changed; a backend report
   (wireguard-go died) from now on waits in the inbox, and before ``Start`` the machine only
   records it for the status;
2. with nothing taken over, start the path monitor (read only): its first report is queued
   before ``Start``, so the first server is one that can be reached;
3. ``Start`` → the machine's first action installs the whole lock, letting through at most one
   server (the adopted tunnel's, or the one it connects to: one transaction for the first
   connect), and only then configures a peer; the lock guard starts watching.
   With no tunnel to adopt, the interface is created meanwhile (wireguard-go started, no peer:
   nothing can pass through it), so the first connect only sets the peer and the routes.
   A taken-over tunnel carries traffic already: its routes and resolvers are checked (the
   machine's ``CompleteAdoption``, right after its lock; a failure is a failed connect's), and
   the path monitor started, once the lock is in force rather than before;
4. the signal handlers, then the machine runs; the control socket, the metrics and the plugins
   start while its first actions (lock, peer, routes) get the tunnel carrying traffic, and the
   start-up's freed memory is handed back once it is connected.
5. under systemd (``Type=notify``): READY=1 once the lock is in force and the control socket
   answers (not once connected: an offline host must still finish booting), STATUS= on every
   state change, WATCHDOG=1 from this event loop, STOPPING=1 on SIGTERM/SIGINT.

Stopping (SIGTERM, SIGINT) is an event like any other: the machine tears the tunnel down and
keeps the lock (``permanent``). A crash or SIGKILL skips all of that on purpose: the lock stays,
wireguard-go (its own session) keeps the tunnel up, and the next start adopts it.
The lock's owned twin (the copy no other program can flush, docs/lock.md) lives only as long
as the daemon's libnftables context: it goes at any exit, SIGKILL included; the ordinary table
stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.abc
from pyroute2 import AsyncIPRoute

from supervisor import __version__
from supervisor.config import Config, key_lines, load_config
from supervisor.connections import DESCRIPTORS_WANTED, raise_descriptor_limit
from supervisor.control import server as control_server
from supervisor.control.commands import ControlCommands
from supervisor.control.socket_path import config_problem as control_socket_problem
from supervisor.errors import ConfigError, TunlockError
from supervisor.health import IcmpProber
from supervisor.lock.configured import policy_from_config
from supervisor.lock.guarded import GuardedLock
from supervisor.log import get_logger
from supervisor.machine import events as ev
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import Machine
from supervisor.net import monitor
from supervisor.net.probe import probe_address
from supervisor.net.wake import PacketWatch
from supervisor.runtime import Inbox, LockFailed, Reconfiguration, Runtime, Status
from supervisor.safety import ensure_safe_to_lock
from supervisor.servers import Endpoint, Server
from supervisor.status import StatusReport
from supervisor.systemd.notify import Notifier
from supervisor.wireguard import backend as wg
from supervisor.wireguard.tunnel import TunnelSettings, open_tunnel
from supervisor.wireguard.wireguard_go import StartedWireguardGo

if TYPE_CHECKING:
    # Imported where used, so that a daemon pays only for what its configuration turns on: the
    # plugin host (entry points, option models) when a plugin is enabled, namespace mode's code
    # when ``tunnel.namespace`` is set, the control client under systemd (_announce_ready).
    from supervisor.net.netns import Placement
    from supervisor.plugins import PluginHost

log = get_logger(__name__)

ADOPT_TIMEOUT_S = 15.0
PATHS_TIMEOUT_S = 5.0
RELOAD_READ_TIMEOUT_S = 30.0
STUCK_THREAD_GRACE_S = 1.0
STOP_PREPARED_TIMEOUT_S = 10.0
# Start-up's garbage goes back once connected, or this long after start whatever the state.
RETURN_MEMORY_AFTER_S = 30.0
# MachineSettings that name things already built (the interface, the table, the socket): changing
# them needs a restart, so a reload that changes them is refused as a whole.
RESTART_ONLY = (
    ("tunnel", "interface"),
    ("tunnel", "backend"),
    ("tunnel", "fwmark"),
    ("tunnel", "route_table"),
    ("tunnel", "namespace"),
    ("namespace", "ui_tcp"),
    ("namespace", "ui_subnet"),
    ("lock", "table"),
    ("lock", "mode"),
    ("control", "socket"),
    ("metrics", "listen"),
)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings of ``RESTART_ONLY`` that differ between ``old`` and ``new`` ("lock.table")."""
    return [
        f"{section}.{name}"
        for section, name in RESTART_ONLY
        if getattr(getattr(new.settings, section), name) != getattr(getattr(old.settings, section), name)
    ]


def machine_settings(config: Config) -> MachineSettings:
    s = config.settings
    return MachineSettings(
        servers=tuple(server.name for server in config.servers),
        strategy=s.rotation.strategy,
        cooldown_s=s.rotation.cooldown_s,
        backoff_initial_s=s.rotation.backoff_initial_s,
        backoff_max_s=s.rotation.backoff_max_s,
        interval_s=s.health.interval_s,
        idle_interval_s=s.health.idle_interval_s,
        probe_interval_s=s.health.probe_interval_s,
        idle_probe_s=s.health.idle_probe_s,
        doubt_probe_interval_s=s.health.doubt_probe_interval_s,
        min_unanswered_probes=s.health.min_unanswered_probes,
        dead_after_s=s.health.dead_after_s,
        probe_reply_s=s.health.probe_reply_s,
        handshake_max_age_s=s.health.handshake_max_age_s,
        connect_timeouts_s=tuple(s.health.connect_timeouts_s),
        lock_mode=s.lock.mode,
        unprobed=frozenset(server.name for server in config.servers if probe_target(config)(server) is None),
    )


def probe_target(config: Config) -> Callable[[Server], IPv4Address | IPv6Address | None]:
    """Where probes go (supervisor/net/probe.py's ``probe_address``)."""
    return functools.partial(probe_address, config.settings.health.probe_target)


async def serve(
    config: Config, placement: Placement | None = None, early: StartedWireguardGo | None = None
) -> int:
    """Run the daemon until stopped; the exit status.

    ``placement``: namespace mode, entered already (:func:`run_daemon`); this thread is in the app
    namespace and the host keeps only the tunnel's UDP (supervisor/net/netns.py). ``early``: the
    wireguard-go of a tunnel ``tunlock run`` brought up before the daemon (supervisor/early_tunnel.py),
    adopted with the tunnel as our child.
    """
    ensure_safe_to_lock()
    _log_warnings(config)
    settings = config.settings
    servers = {server.name: server for server in config.servers}
    tunnel_settings = TunnelSettings.from_config(settings)
    notifier = Notifier.from_environ()
    first_status = anyio.Event()
    # The machine's queue, made first: the tunnel backend and the lock guard report into it from
    # the moment they exist, and the runtime takes what waits there once it runs.
    inbox = Inbox()
    if placement is not None:
        from supervisor.net.netns import loopback_up

        await loopback_up()

    def published(status: Status) -> None:
        notifier.status(status.state, status.server, status.reason)
        first_status.set()

    async def backend_event(event: wg.BackendEvent) -> None:
        if isinstance(event, wg.BackendDied):
            await inbox.post(lambda now: ev.BackendDown(now, event.reason))
        elif isinstance(event, wg.BackendRestarted):
            await inbox.post(lambda now: ev.BackendUp(now))

    async def lock_tampered(reason: str) -> None:
        await inbox.post(lambda now: ev.LockTampered(now, reason))

    async with (
        anyio.create_task_group() as tg,
        open_tunnel(
            tunnel_settings,
            report=backend_event,
            placement=placement,
            **({"started": early} if early is not None else {}),
        ) as tunnel,
        IcmpProber() as prober,
    ):
        with anyio.fail_after(ADOPT_TIMEOUT_S):
            adopted = await tunnel.take_over(config.servers)
        if adopted is None:
            # The interface (wireguard-go's start, ~60 ms) is made while the lock is applied
            # rather than after it: without a peer nothing passes through it, and the peer is set
            # only once the lock is in force and watched, as before (issue #27 item 4).
            tg.start_soon(tunnel.prepare)
        lock = GuardedLock(policy_from_config(config, servers=()), tg, lock_tampered)
        runtime = Runtime(
            Machine.initial(machine_settings(config)),
            servers,
            lock,
            tunnel,
            prober,
            ifname=tunnel.ifname,
            probe_target=probe_target(config),
            inbox=inbox,
            on_publish=published,
            traffic=PacketWatch(),
        )
        host = _plugin_host(config, lock, runtime)
        if host is not None:
            runtime.subscribe(host.publish)
        runtime.status.backend = tunnel.backend.kind
        runtime.status.namespace = placement.name if placement else None

        async def paths(observation: monitor.Observation) -> None:
            if isinstance(observation, monitor.TunnelLinkGone):
                await runtime.post(lambda now: ev.TunnelLost(now))
                return
            reachable = frozenset(
                n for n, s in runtime.servers.items() if s.endpoint in observation.reachable
            )
            await runtime.post(lambda now: ev.PathsChanged(now, reachable))

        watcher = monitor.PathMonitor(
            (s.endpoint for s in config.servers), settings.tunnel.fwmark, tunnel.ifname, placement
        )
        if adopted is None:
            # Its first report before Start: the first server is one that can be reached.
            await tg.start(watcher.run, paths)
        await runtime.post(
            lambda now: ev.Start(now, int.from_bytes(os.urandom(8), "big"), adopted.name if adopted else None)
        )

        async def status() -> StatusReport:
            return await status_now(runtime, host)

        # The machine first (issue #27 item 4): its first actions (the lock, the peer, the routes)
        # are all the first packet waits for. The signal handlers go in before it runs; the
        # control socket, the metrics, the plugins and the rest start while it works (each
        # waits for nothing but its own start-up; the lock is watched from its apply on, as
        # before). The start-up's garbage is handed back only once the tunnel is set up.
        stopped = anyio.Event()

        async def machine() -> None:
            try:
                await runtime.run(tg)
            except BaseException:
                # Ended before its first connect (the lock failed): the interface made ahead of
                # it goes too. A tunnel that carried traffic stays, for the next start to adopt.
                with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_PREPARED_TIMEOUT_S):
                    await tunnel.abandon_prepared()
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await lock.close()
                stopped.set()

        await tg.start(_signals, runtime, config, watcher, notifier, host)
        tg.start_soon(machine)
        if adopted is not None:
            # A tunnel taken over carries traffic already: the lock comes first, then the
            # machine's CompleteAdoption (routes, resolvers) and the path monitor, until whose
            # first report every server counts as reachable. Run beside the lock's apply, their
            # netlink parsing would hold the interpreter lock it needs (issue #27 item 4). The
            # first status is published once the lock is in force and the adoption completed.
            async def monitor_once_locked() -> None:
                await first_status.wait()
                await tg.start(watcher.run, paths)

            tg.start_soon(monitor_once_locked)
        await tg.start(control_server.serve, settings.control.socket, ControlCommands(runtime, status))
        if settings.metrics.address is not None:
            await tg.start(_serve_metrics, runtime, lock, status, settings.metrics.address, placement)
        if host is not None:
            await tg.start(host.run)
        tg.start_soon(_announce_ready, notifier, first_status, settings.control.socket)
        if placement is not None and settings.namespace.ui_tcp:
            tg.start_soon(_ui_link_once_locked, placement, settings.namespace.ui_subnet, first_status)
        tg.start_soon(notifier.keep_watchdog_fed)
        tg.start_soon(tunnel.keep_resolvers)
        log.info(
            "tunlock running",
            interface=tunnel.ifname,
            namespace=placement.name if placement else None,
            backend=tunnel.backend.kind,
            servers=len(servers),
            adopted=adopted.name if adopted else None,
            pid=os.getpid(),
        )
        tg.start_soon(_return_freed_memory_once_up, runtime, stopped)
        await stopped.wait()
        tg.cancel_scope.cancel()
    log.info("tunlock stopped", lock="kept" if settings.lock.mode == "permanent" else "removed")
    return 0


async def _serve_metrics(
    runtime: Runtime,
    lock: GuardedLock,
    status_now: Callable[[], Awaitable[StatusReport]],
    address: Endpoint,
    placement: Placement | None = None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Prometheus metrics at ``[metrics] listen``: the status built fresh at each scrape
    (namespace mode: listening in the host's namespace, where the scraper is)."""
    # Imported here: a daemon without metrics does not carry prometheus_client and h11 (~2 MB).
    # One `nft list` per scrape: the lock's state and counters come from the same reading.
    from supervisor import metrics

    async def snapshot() -> metrics.Snapshot:
        report = await status_now()
        return metrics.Snapshot(
            status=report.as_json(),
            version=__version__,
            servers=len(runtime.servers),
            entered=dict(runtime.status.entered),
            failures=dict(runtime.status.failures),
            lock_counters=dict(report.lock.counters),
            lock_restores=lock.restores,
            inbound_packets=dict(report.lock.inbound),
        )

    bind = None
    if placement is not None:
        host_side = placement

        async def bind(host: str, port: int) -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listen = functools.partial(socket.create_server, (host, port), family=family)
            return await host_side.in_host(listen)

    await metrics.serve(str(address.host), address.port, snapshot, bind=bind, task_status=task_status)


def _log_warnings(config: Config) -> None:
    """What `tunlock check` would warn about (ignored hooks, loose file modes...), in the log."""
    for problem in config.warnings:
        log.warning("configuration", problem=str(problem))


# glibc's mallopt parameters (malloc.h) and the values its dynamic scheme starts from.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_THRESHOLD_BYTES = 128 * 1024


def _fix_allocator_thresholds() -> None:
    """Keep glibc from holding on to memory a long-running daemon freed.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MB)
    and its trim threshold to twice that, so after the first large buffers (an nft listing, a
    netlink dump read in a worker thread) every later one comes from an arena that is never
    trimmed again: the resident size crept up with each link cycle and status request in the lab.
    Fixing both thresholds at their starting values turns the dynamic scheme off: large blocks are
    mapped and unmapped, and arenas give back free tops above 128 kB.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_THRESHOLD_BYTES)


def _raise_descriptor_limit() -> None:
    """systemd's default soft limit is 1024 descriptors: raise it to what the daemon may need
    (the unit sets LimitNOFILE too; this covers a container or a shell start)."""
    before, after = raise_descriptor_limit()
    if after < DESCRIPTORS_WANTED:
        log.warning(
            "the limit on open files is below what the daemon may need; raise the hard limit",
            limit=after,
            wanted=DESCRIPTORS_WANTED,
        )
    elif after != before:
        log.debug("raised the limit on open files", before=before, after=after)


async def _return_freed_memory_once_up(runtime: Runtime, stopped: anyio.Event) -> None:
    """``_return_freed_memory`` once the first connect is settled (connected, or anything but
    connecting): a full collection of start-up's objects takes tens of milliseconds of the event
    loop, which the first packet should not wait for."""
    settled = anyio.Event()

    def published(status: Status) -> None:
        if status.state not in ("blocked", "connecting"):
            settled.set()

    runtime.subscribe(published)
    with anyio.move_on_after(RETURN_MEMORY_AFTER_S):
        await settled.wait()
    if not stopped.is_set():
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the heap that start-up used and freed (config parsing, imports) back to the kernel.

    glibc keeps freed memory for reuse; a daemon that runs for months never needs start-up's
    peak again, so trimming once here lowers its resident size for good (a few MB).
    """
    # Start-up's objects live as long as the daemon: out of the collector's sight (gc.freeze),
    # they no longer make its full collections rare. CPython runs one only once the objects that
    # survived into the oldest generation grew by a quarter of those already there; with ~200,000
    # start-up objects that let ~50,000 objects of cyclic garbage (cancelled scopes, exceptions
    # and their tracebacks, closed sockets) pile up between two: megabytes, in the lab's link flaps.
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Announcer(Protocol):
    """What the daemon tells its service manager (systemd.notify.Notifier)."""

    @property
    def enabled(self) -> bool: ...

    def ready(self) -> object: ...

    def stopping(self) -> object: ...


class Reconfigurable(Protocol):
    """What a reload asks of the runtime (runtime.Runtime)."""

    @property
    def ifname(self) -> str: ...

    async def reconfigure(self, change: Reconfiguration) -> bool: ...


class SignalTarget(Reconfigurable, Protocol):
    """What the signals ask of the runtime: a reload, or a Stop event."""

    async def post(self, make: Callable[[float], ev.Event]) -> None: ...


class EndpointWatcher(Protocol):
    """Told the endpoints a reload brought (net.monitor.PathMonitor); it knows where their
    routes are (the host's namespace, in namespace mode)."""

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None: ...

    async def route_socket(self) -> AsyncIPRoute: ...


class StoppingPlugins(Protocol):
    """Asked to act on "stopping" before the tunnel goes (plugins.PluginHost)."""

    async def stopping(self, timeout: float, /) -> None: ...


async def _announce_ready(notifier: Announcer, first_status: anyio.Event, socket_path: Path) -> None:
    """READY=1 for systemd once the lock is in force and the control socket answers.

    The machine's first status comes after its first action, the whole lock (a lock that fails
    ends the daemon before any status); the socket is then asked, as ``tunlock status`` would.
    """
    if not notifier.enabled:
        return
    from supervisor.control.client import request as control_request

    await first_status.wait()
    try:
        await anyio.to_thread.run_sync(control_request, socket_path, "status")
    except TunlockError as err:
        # No READY then: systemd's start timeout fails the unit and restarts it, lock in place.
        log.error("the control socket does not answer; not telling systemd ready", error=str(err))
        return
    notifier.ready()
    log.info("ready: the lock is in place and the control socket answers")


async def status_now(runtime: Runtime, host: PluginHost | None) -> StatusReport:
    """``tunlock status`` and the metrics: built now from the lock read for it, the runtime's
    status and the plugins' reports.

    The lock is read first. The machine's status and the plugins' report are then taken with no
    await between them: one publish changes both (the host follows it synchronously), so only
    then do they describe the same moment. Taken on either side of the lock's read (which waits
    for the lock's thread, busy with a rotation's swap), they paired a rotation's
    ``connecting vpn2`` with vpn1's forwarded port, which the lock had already closed again.
    """
    lock_state = await runtime.lock_state()
    plugins_report = host.report() if host is not None else None
    return StatusReport.build(runtime.status, lock_state, plugins_report, namespace=runtime.status.namespace)


async def _ui_link_once_locked(placement: Placement, subnet: IPv4Network, first_status: anyio.Event) -> None:
    """Namespace mode's web-UI link, made once the lock inside is in force (the machine's first
    status comes after its first action, the whole lock): the pair is never there unguarded."""
    from supervisor.net.ui_link import UiLinkError, ensure_ui_link

    await first_status.wait()
    try:
        await ensure_ui_link(placement, subnet)
    except UiLinkError as err:  # the tunnel goes on; only the way to the web UIs is missing
        log.error("the web-UI link could not be made", error=str(err))


def _plugin_host(config: Config, lock: GuardedLock, runtime: Runtime) -> PluginHost | None:
    """The enabled plugins (ConfigError for an unknown one or bad options), or None."""
    section = config.settings.plugins
    if not section.enabled:
        return None
    from supervisor import plugins

    lines = key_lines(config.path.read_text(encoding="utf-8"))
    made = plugins.load(section.enabled, section.options, config.path, lines)
    return plugins.PluginHost(
        made,
        lock,
        interface=config.settings.tunnel.interface,
        server_of=lambda name: runtime.servers.get(name),
        stall_timeout_s=section.stall_timeout_s,
        backoff_initial_s=section.backoff_initial_s,
        backoff_max_s=section.backoff_max_s,
        post=runtime.post,
    )


async def _signals(
    runtime: SignalTarget,
    config: Config,
    watcher: EndpointWatcher,
    notifier: Announcer | None = None,
    host: StoppingPlugins | None = None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    current = config
    reloading = anyio.Lock()

    async def reload() -> None:
        nonlocal current
        async with reloading:  # one at a time, in the order the signals came
            try:
                current = await _reload(runtime, current, watcher)
            except Exception:  # a bug in a reload must cost the reload, not the daemon
                log.exception("reload failed; still running on the configuration before it")

    async with anyio.create_task_group() as reloads:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # In a task of its own: a stop is heard even while a reload is under way.
                    reloads.start_soon(reload)
                else:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    if notifier is not None:
                        notifier.stopping()
                    if host is not None:
                        # Plugins act on "stopping" while the tunnel still stands (unmap, clear files).
                        await host.stopping(config.settings.plugins.stop_timeout_s)
                    await runtime.post(lambda now: ev.Stop(now))


async def _reload(runtime: Reconfigurable, config: Config, watcher: EndpointWatcher) -> Config:
    """Read the configuration again; keep running on the old one if the new one is bad."""
    try:
        with anyio.fail_after(RELOAD_READ_TIMEOUT_S):
            # Abandoned, not waited for, if a file blocks the read: the daemon goes on.
            # One reader at a time, apart from the threads the lock and the tunnel need: reads that
            # block for good cannot pile up and starve them.
            new = await anyio.to_thread.run_sync(
                load_config, config.path, abandon_on_cancel=True, limiter=_config_readers()
            )
    except ConfigError as err:
        log.error("reload refused: the configuration has errors", problems=[str(p) for p in err.problems])
        return config
    except TimeoutError:
        log.error(f"reload refused: reading the configuration took over {RELOAD_READ_TIMEOUT_S:g} s")
        return config
    changed = restart_only_changes(config, new)
    if changed:
        log.error("reload refused: these settings need a restart", settings=changed)
        return config
    # Everything that can fail on the new configuration, before anything of it is used.
    targets = probe_target(new)
    base = policy_from_config(new, servers=())
    settings = machine_settings(new)
    _log_warnings(new)
    if new.settings.plugins != config.settings.plugins:
        log.warning("reload: plugin settings take effect at the next start; the running ones go on")
    reachable = await _reachable_now(new, runtime.ifname, watcher)
    # Through the runtime's loop, between two events: the lock, the servers and the machine
    # follow the new configuration together, never half of it while an action is on its way.
    change = Reconfiguration({s.name: s for s in new.servers}, targets, base, settings, reachable)
    if not await runtime.reconfigure(change):
        return config
    # Only now: the monitor's report for the new list must not reach the machine before the
    # list itself (it would name servers the machine does not know yet).
    watcher.set_endpoints(s.endpoint for s in new.servers)
    log.info("configuration reloaded", servers=len(new.servers))
    return new


_CONFIG_READERS: list[anyio.CapacityLimiter] = []


def _config_readers() -> anyio.CapacityLimiter:
    if not _CONFIG_READERS:  # made inside the event loop, once
        _CONFIG_READERS.append(anyio.CapacityLimiter(1))
    return _CONFIG_READERS[0]


async def _reachable_now(
    config: Config, tunnel_ifname: str, watcher: EndpointWatcher | None = None
) -> frozenset[str] | None:
    """Which of ``config``'s servers have a path right now, for the reload to act on at once
    (the monitor reports only changes of the endpoints' reachability, not of their names);
    ``None`` (the machine keeps what it knows) if the lookup fails."""
    endpoints = frozenset(server.endpoint for server in config.servers)
    try:
        with anyio.fail_after(PATHS_TIMEOUT_S):
            # Where the endpoints' routes are: the host, in namespace mode (the monitor knows).
            async with AsyncIPRoute() if watcher is None else await watcher.route_socket() as ipr:
                reachable = await monitor.reachable_endpoints(
                    ipr, endpoints, config.settings.tunnel.fwmark, tunnel_ifname
                )
    except Exception as err:  # the monitor's next report corrects it
        log.warning("could not look up the paths to the reloaded servers", error=str(err))
        return None
    return frozenset(server.name for server in config.servers if server.endpoint in reachable)


def _first_error(error: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups: what the user needs to read."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def run_daemon(config: Config, early: StartedWireguardGo | None = None) -> int:
    """``tunlock run``: serve until stopped. 0 after a clean stop; 2 for a control socket path
    that cannot be used (a configuration error, as ``check`` reports it); 1 (logged) after an
    error, with the lock left exactly as it was. ``early``: see :func:`serve`."""
    problem = control_socket_problem(config)
    if problem is not None:
        log.error("tunlock cannot start: the configuration has errors", problems=[str(problem)])
        return 2
    _fix_allocator_thresholds()
    _raise_descriptor_limit()
    placement: Placement | None = None
    namespace = config.settings.tunnel.namespace
    if namespace is not None:
        # Namespace mode's code is imported only when it is on.
        from supervisor.net import netns

        # Before the event loop and its threads: they inherit the namespace of this thread.
        try:
            placement = netns.enter(namespace)
        except TunlockError as err:
            log.error("tunlock cannot enter its namespace; nothing was changed", error=str(err))
            return 1
        log.info("running in the namespace", namespace=namespace, path=str(netns.namespace_path(namespace)))
    try:
        code = anyio.run(serve, config, placement, early, backend="asyncio")
    except (Exception, BaseExceptionGroup) as caught:
        error = _first_error(caught)
        if isinstance(error, KeyboardInterrupt):
            code = 130
        elif isinstance(error, (TunlockError, LockFailed)):
            log.error("tunlock failed; the lock stays as it is", error=str(error))
            code = 1
        else:
            log.exception("tunlock crashed; the lock stays as it is", exc_info=error)
            code = 1
    _exit_past_stuck_threads(code)
    return code


def _exit_past_stuck_threads(code: int) -> None:
    """End the process now if a worker thread is stuck (a reload abandoned a read that blocks
    for good): Python would otherwise wait for it at exit, and a stopped daemon would never
    end. The daemon's own teardown is done by now; only the interpreter's is skipped."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in stuck:
        thread.join(STUCK_THREAD_GRACE_S)  # idle workers end on their own in a moment
    if any(thread.is_alive() for thread in stuck):
        log.warning("a worker thread is stuck (a file that blocks reading?); exiting without it")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
