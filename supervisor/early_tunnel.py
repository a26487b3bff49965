"""The tunnel first, then the daemon: ``tunlock run``'s early bring-up at boot (issue #27).

At boot the early-boot unit loads the lock (``tunlock lock export``'s file) long before ``tunlock
run`` starts, and the daemon then spent ~150 ms importing itself before it even started
wireguard-go. When that lock is in the kernel already, ``tunlock run`` now does the least a tunnel
needs with the standard library alone, the way ``wg-quick`` does it with small C programs:

1. wireguard-go is started (supervisor/wireguard/wireguard_go.py, as the daemon starts it);
2. the first server's peer is set over its UAPI socket (one ``set``, the daemon's request);
3. the interface's addresses and MTU, the administrator's reply rule and the full-tunnel policy
   routing are put in place by one ``ip -batch`` run rendered from the daemon's own description
   of them (supervisor/net/routing_plan.py): there is no second description of the routing.

The daemon's code is imported after it, and the daemon then *adopts* the tunnel as it adopts one
left by a crash (``Tunnel.adopt``: wireguard-go followed as its child, routes checked and
completed, resolvers set), puts its own lock and owned twin in place over the boot lock and
starts the guard.

Nothing here writes to nftables, so the lock in place is what guarantees that nothing leaks: the
boot lock lets out only WireGuard's UDP to a configured server, sent with the tunnel's fwmark, and
drops every other packet whatever the routes say. It runs only when all of these hold
(:func:`refusal` says which did not):

- the configured ``lock.table`` exists in the ``inet`` family (read through libnftables);
- the backend is wireguard-go (``userspace``, or ``auto`` on a kernel without WireGuard);
- whole-host mode (no ``tunnel.namespace``);
- no tunnel interface exists yet (one that does is the daemon's to adopt, as before);
- the process may lock here at all (``supervisor.safety``) and the control socket's path is
  usable (the daemon would otherwise exit 2 on it, and nothing may be left up).

Any failure undoes what was made (wireguard-go and with it the interface and its routes, then the
policy rules), and the daemon's normal start runs: the early bring-up is never fatal. What
happened is logged once the daemon's logging is set up (:meth:`EarlyOutcome.log`).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from msgspec import Struct

from supervisor.config import Config, ConfigFile
from supervisor.errors import SafetyError
from supervisor.servers import Server
from supervisor.wireguard.wireguard_go import UAPI_DIR, StartedWireguardGo, start_wireguard_go

if TYPE_CHECKING:
    from supervisor.lock.libnftables import Libnftables
    from supervisor.net.ip_batch import IpBatch
    from supervisor.net.routing_plan import TunnelPlan

_T = TypeVar("_T")

BRING_UP_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 3.0
_SERVED_POLL_S = 0.001


class EarlyTunnel(Struct):
    """A tunnel brought up ahead of the daemon, for the daemon to adopt."""

    server: Server
    wireguard_go: StartedWireguardGo
    up_at: float  # wall clock: routes in place, the first packet can go
    took_s: float  # from the start of the bring-up


class EarlyOutcome(Struct):
    """What the early bring-up did: a tunnel, or why not (``skipped``), or how it failed."""

    tunnel: EarlyTunnel | None = None
    skipped: str | None = None
    error: str | None = None

    def log(self) -> None:
        """Say what happened, once the daemon's logging is configured."""
        from supervisor.log import get_logger

        log = get_logger(__name__)
        if self.tunnel is not None:
            log.info(
                "tunnel up ahead of the daemon, which adopts it",
                server=self.tunnel.server.name,
                took_ms=round(1000 * self.tunnel.took_s, 1),
                up_at=self.tunnel.up_at,
            )
        elif self.error is not None:
            log.warning(
                "could not bring the tunnel up ahead of the daemon; the daemon starts it", error=self.error
            )
        else:
            log.info("the daemon starts the tunnel", reason=self.skipped)


def refusal(
    settings: ConfigFile, *, lock_present: bool, kernel: bool, link_present: bool, uapi_served: bool
) -> str | None:
    """Why the early bring-up does not run for ``settings`` on this host, or None when it runs.

    ``lock_present``: the lock's table is in the kernel (``inet`` family); ``kernel``: the kernel
    has WireGuard; ``link_present``/``uapi_served``: a link with the tunnel's name, or a
    wireguard-go serving it, exists already.
    """
    tunnel = settings.tunnel
    if tunnel.namespace is not None:
        return "namespace mode"
    if tunnel.backend == "kernel" or (tunnel.backend == "auto" and kernel):
        return "the kernel backend"
    if link_present or uapi_served:
        return "the tunnel interface exists already (the daemon adopts it)"
    if not lock_present:
        return f"the lock (table inet {settings.lock.table}) is not in place"
    return None


def first_server(config: Config, let_through: list[Server], rng: random.Random | None = None) -> Server:
    """The server the tunnel comes up to, of those the lock in place lets through (in the
    configured order): the first (sequential), or any (random). The machine then adopts it, as it
    is configured and, at boot, its path was just brought up."""
    if config.settings.rotation.strategy == "random":
        return (rng or random.SystemRandom()).choice(let_through)
    return let_through[0]


def bring_up(config: Config) -> EarlyOutcome:
    """Bring the tunnel up to :func:`first_server` ahead of the daemon when :func:`refusal`
    allows; never raises (a failure leaves nothing of it behind and is in the outcome)."""
    began = time.monotonic()
    try:
        reason, let_through = _read_host(config)
    except Exception as err:
        return EarlyOutcome(error=f"cannot read the host: {_describe(err)}")
    if reason is not None:
        return EarlyOutcome(skipped=reason)
    if not let_through:
        # A container's first table blocks everything until the daemon's lock; a lock a stopped
        # daemon left lets through only the server it was on. A handshake the lock drops is
        # tried again only 5 s later: the daemon, which puts its own lock in first, is sooner.
        return EarlyOutcome(skipped="the lock in place lets none of the servers through")
    server = first_server(config, let_through)
    try:
        started = start_wireguard_go(config.settings.tunnel.interface)
    except OSError as err:
        return EarlyOutcome(error=f"cannot start wireguard-go: {err.strerror or err}")
    try:
        _configure(config, server, started)
    except Exception as err:
        _undo(config, server, started)
        return EarlyOutcome(error=_describe(err))
    up_at = time.time()
    return EarlyOutcome(tunnel=EarlyTunnel(server, started, up_at, time.monotonic() - began))


def _read_host(config: Config) -> tuple[str | None, list[Server]]:
    """:func:`refusal`, with the facts read from this host (each only when still needed), and
    the servers the lock in place lets through."""
    from supervisor.safety import ensure_safe_to_lock

    settings = config.settings
    try:
        ensure_safe_to_lock()
    except SafetyError:
        return "not a namespace this process may lock", []  # the daemon says so and exits
    from supervisor.control.socket_path import config_problem

    if config_problem(config) is not None:
        return "the control socket's path is not usable", []  # the daemon exits 2 on it
    from supervisor.wireguard.kernel_module import kernel_has_wireguard

    ifname = settings.tunnel.interface
    backend = settings.tunnel.backend
    wireguard_go = settings.tunnel.namespace is None and (
        backend == "userspace" or (backend == "auto" and not kernel_has_wireguard())
    )
    let_through = servers_let_through(config) if wireguard_go else None
    reason = refusal(
        settings,
        lock_present=let_through is not None,
        kernel=not wireguard_go,
        link_present=_link_present(ifname),
        uapi_served=(UAPI_DIR / f"{ifname}.sock").exists(),
    )
    return reason, let_through or []


def servers_let_through(config: Config) -> list[Server] | None:
    """The configured servers whose WireGuard endpoint is in the lock's sets, in order (with the
    ``sequential`` strategy only the first is needed, and looked for); None when the lock's
    table (``lock.table``, ``inet``) is not in the kernel, or cannot be read (the normal start
    then applies the lock). The lock's rule for them also asks for the tunnel's fwmark, which a
    lock loaded from this configuration has."""
    from supervisor.lock.endpoint_sets import endpoint_query
    from supervisor.lock.libnftables import LockError

    table = config.settings.lock.table
    only_first = config.settings.rotation.strategy == "sequential"

    def look(nft: Libnftables) -> list[Server] | None:
        if f"table inet {table}" not in nft.run("list tables inet").splitlines():
            return None
        found: list[Server] = []
        for server in config.servers:
            try:
                nft.run(endpoint_query(table, server.endpoint))
            except LockError:
                continue  # not in the set
            found.append(server)
            if only_first:
                break
        return found

    return _reading_the_lock(look)


def _reading_the_lock(read: Callable[[Libnftables], _T]) -> _T | None:
    """``read`` with a libnftables context; None when there is none (no library)."""
    from supervisor.lock.libnftables import Libnftables, LockError

    try:
        nft = Libnftables()
    except LockError:
        return None
    try:
        return read(nft)
    except LockError:
        return None
    finally:
        nft.free()


def _link_present(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _configure(config: Config, server: Server, started: StartedWireguardGo) -> None:
    """Wait for wireguard-go to serve, set the peer, put the link and the routing in place."""
    from supervisor.net.ip_batch import ip_batches, ip_undo_batches
    from supervisor.net.routing_plan import enable_src_valid_mark, without_link_local
    from supervisor.wireguard.backend import DeviceConfig
    from supervisor.wireguard.uapi import set_blocking, set_request

    settings = config.settings
    ifname = settings.tunnel.interface
    path = UAPI_DIR / f"{ifname}.sock"
    _wait_served(started, path, ifname)
    set_blocking(path, set_request(DeviceConfig.for_server(server, settings.tunnel.fwmark)), ifname)
    plan = _plan(config, server)
    if 4 in plan.routing.families:
        enable_src_valid_mark()
    without_link_local(ifname)  # before the batches bring the link up
    # The clearing runs side by side; the making ones in order (the first brings the link up,
    # which the second's routes need).
    _run_ip(ip_undo_batches(plan, admin=True))
    for batch in ip_batches(plan):
        _run_ip([batch])
    _start_handshake(config, server)


def _start_handshake(config: Config, server: Server) -> None:
    """One probe through the tunnel, as the daemon sends them: WireGuard starts its handshake
    only when it has a packet to send, and the daemon's first look at the adopted tunnel then
    finds it answering. Without it the first packet was the daemon's first probe, ~120 ms later,
    and its ``connected`` ~250 ms after that (two samples at the connecting pace). Best effort:
    the daemon probes anyway."""
    from supervisor.net.probe import probe_address, probe_socket, send_probe

    target = probe_address(config.settings.health.probe_target, server)
    if target is None:
        return
    ifname = config.settings.tunnel.interface
    for raw in (True, False):
        try:
            with probe_socket(target.version == 6, ifname, raw) as sock:
                send_probe(sock, raw, target, os.getpid() & 0xFFFF, 0, b"tunlock")
            return
        except OSError:
            continue  # no CAP_NET_RAW: the DNS query instead


def _plan(config: Config, server: Server, families: tuple[int, ...] | None = None) -> TunnelPlan:
    """The daemon's description of the tunnel's plumbing for ``server``; by default for the
    families routed into the interface (which must exist then)."""
    from supervisor.net.routing_plan import ConfiguredRouting, TunnelPlan, routed_families

    routing = ConfiguredRouting.from_config(config.settings)
    return TunnelPlan.for_server(routing, server, families or routed_families(routing.ifname))


def _wait_served(started: StartedWireguardGo, path: Path, ifname: str) -> None:
    """Until wireguard-go serves its UAPI socket (polled, bounded: nothing announces it)."""
    from supervisor.wireguard.uapi import listener_pid_blocking

    deadline = time.monotonic() + BRING_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if started.popen.poll() is not None:
            raise RuntimeError(
                f"wireguard-go for {ifname} exited at start ({started.popen.returncode}): {_said(started)}"
            )
        if listener_pid_blocking(path) == started.pid:
            return
        time.sleep(_SERVED_POLL_S)
    raise RuntimeError(
        f"wireguard-go for {ifname} did not open {path} within {BRING_UP_TIMEOUT_S:g} s: {_said(started)}"
    )


def _said(started: StartedWireguardGo) -> str:
    """wireguard-go's last lines so far (one datagram each), or "no output"."""
    lines: list[str] = []
    with contextlib.suppress(OSError):  # BlockingIOError: nothing more
        while True:
            lines.append(started.output.recv(65536).decode(errors="replace").strip())
    return "; ".join(lines[-3:]) or "no output"


def _run_ip(batches: list[IpBatch]) -> None:
    """Run ``batches`` side by side; RuntimeError naming the first that failed (unless it is a
    ``-force`` one, which goes on past what is not there)."""
    runs = []
    for batch in batches:
        # The commands are written into the pipe before the run starts (a few hundred bytes,
        # within a pipe's buffer), so that every run reads its own while the others go on.
        readable, writable = os.pipe()
        try:
            os.write(writable, batch.stdin.encode())
            os.close(writable)
            run = subprocess.Popen(
                batch.argv, stdin=readable, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        finally:
            os.close(readable)
        runs.append((batch, run))
    failed: list[str] = []
    for batch, run in runs:
        try:
            _, error = run.communicate(timeout=BRING_UP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            run.kill()
            _, error = run.communicate()
        if run.returncode != 0 and "-force" not in batch.argv:
            failed.append(f"{' '.join(batch.argv)}: {error.strip() or f'exit {run.returncode}'}")
    if failed:
        raise RuntimeError("; ".join(failed))


def _undo(config: Config, server: Server, started: StartedWireguardGo) -> None:
    """wireguard-go stopped (its interface, addresses and routes go with it), then the policy
    rules taken away; what was never made is fine. Best effort: the lock holds regardless."""
    from supervisor.net.ip_batch import ip_undo_batches

    process = started.popen
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    started.output.close()
    # Both families: the interface is gone, so which one was routed cannot be read any more.
    with contextlib.suppress(Exception):
        _run_ip(ip_undo_batches(_plan(config, server, (4, 6))))


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
