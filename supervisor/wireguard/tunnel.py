"""The tunnel as the supervisor drives it: a backend plus the interface, routes and DNS around it.

This is the surface the runtime uses::

    async with open_tunnel(settings, report=on_backend_event) as tunnel:
        server = await tunnel.adopt(servers)      # a running tunnel from before a crash, or None
        await tunnel.connect(server)              # first connect, and every swap after it
        stats = await tunnel.stats()              # one cheap read, fit for a 1 s loop
        await tunnel.disconnect()                 # no peer: nothing passes, nothing leaks
        await tunnel.close(keep_interface=False)  # stop: interface, routes and DNS undone

``connect`` on a tunnel that is up is the **peer swap**: one atomic backend
operation replaces the peer (private key, endpoint, allowed IPs) on the existing
interface; addresses, MTU, routes and DNS are then reconciled and change only
where the new server differs. Leaving the context without ``close`` leaves the
tunnel running, exactly as a crash would, so the next daemon can adopt it.

Every operation is idempotent and serialised by one lock, so a backend restart
(wireguard-go died: the interface is new and bare) and a swap the runtime
asked for at the same moment cannot interleave.

**One handshake initiation per server per 20 ms.** A WireGuard server drops an
initiation that comes within 20 ms of the last one it accepted from the same
peer (``HandshakeInitationRate`` in wireguard-go, ``INITIATIONS_PER_SECOND`` in
the kernel), and one whose TAI64N timestamp, kept at 2**24 ns (16.8 ms) grain,
is not later than the last. A new peer sends its initiation with its first
packet, and the initiator tries again only after ``REKEY_TIMEOUT`` (5 s). So a
peer set twice within milliseconds costs seconds: ``connect`` keeps a peer that
is already exactly the server's (a swap to the same peer, a restarted backend
that re-applied it), and a peer is never set anew sooner than
``MIN_PEER_RENEWAL_S`` after it was last set. ``restart_handshake`` is the one
way to ask for a new handshake with the same server on purpose.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from msgspec import Struct
from pyroute2 import AsyncIPRoute

from supervisor.log import get_logger
from supervisor.net.admin_route import AdminReplyRouting
from supervisor.net.dns import DEFAULT_STATE_DIR, DnsError, DnsManager, ResolvConfFile, detect_dns_manager
from supervisor.net.filewatch import file_changes
from supervisor.net.links import configure_link
from supervisor.net.routes import FullTunnelRouting
from supervisor.net.routing_plan import (
    DEFAULT_RULE_PRIORITY,
    ConfiguredRouting,
    LinkPlan,
    routed_families,
)
from supervisor.net.routing_plan import owned_prefixes as owned_prefixes
from supervisor.servers import IPAddress, Server
from supervisor.wireguard.backend import (
    BackendEvent,
    BackendRestarted,
    DeviceConfig,
    Report,
    TunnelStats,
    WireGuardBackend,
    ignore_events,
)
from supervisor.wireguard.selection import BackendKind, open_backend, resolve_backend

if TYPE_CHECKING:  # namespace mode's placement, imported only where that mode is on
    from supervisor.net.netns import Placement

log = get_logger(__name__)

# Longer than the server's 20 ms between initiations of one peer and its 16.8 ms timestamp grain
# (see the module docstring), with room for the new peer's first packet coming a little later.
MIN_PEER_RENEWAL_S = 0.05


class TunnelSettings(Struct, frozen=True):
    """What the tunnel needs from the configuration ([tunnel] and [dns])."""

    ifname: str
    fwmark: int
    route_table: int
    backend: BackendKind = "auto"
    manage_dns: bool = True
    resolv_conf: Path = Path("/etc/resolv.conf")
    state_dir: Path = DEFAULT_STATE_DIR
    rule_priority: int = DEFAULT_RULE_PRIORITY
    # Addresses inside the tunnel named by the config rather than a server file (the probe
    # target, the NAT-PMP gateway): routed into the tunnel whatever the LAN routes say.
    owned_targets: tuple[IPAddress, ...] = ()
    # Namespace mode (supervisor/net/netns.py): the namespace's name, or None for the whole host.
    namespace: str | None = None

    @classmethod
    def from_config(cls, settings: Any, state_dir: Path = DEFAULT_STATE_DIR) -> TunnelSettings:
        """From a validated ``supervisor.config.ConfigFile``."""
        namespace = settings.tunnel.namespace
        resolv_conf = settings.dns.resolv_conf
        if namespace is not None:
            # Namespace mode: the namespace's own file, which programs inside see as /etc/resolv.conf.
            from supervisor.net.netns import managed_resolv_conf

            resolv_conf = managed_resolv_conf(resolv_conf, namespace)
        routing = ConfiguredRouting.from_config(settings)
        return cls(
            ifname=routing.ifname,
            fwmark=routing.fwmark,
            route_table=routing.route_table,
            backend=settings.tunnel.backend,
            manage_dns=settings.dns.manage,
            resolv_conf=resolv_conf,
            state_dir=state_dir,
            rule_priority=routing.rule_priority,
            owned_targets=routing.owned_targets,
            namespace=namespace,
        )


class Tunnel:
    """One WireGuard interface with its peer, addresses, routes and DNS. See the module docstring."""

    def __init__(self, settings: TunnelSettings, backend: WireGuardBackend, dns: DnsManager | None) -> None:
        self.settings = settings
        self.backend = backend
        self.server: Server | None = None
        self._dns = dns
        self._dns_servers: tuple[Any, ...] | None = None
        self._lock = anyio.Lock()
        self._log = log.bind(ifname=settings.ifname, backend=backend.kind)
        # What we last set on the backend, and (peer key, monotonic time) of the last time a peer
        # was set: a peer is kept when unchanged and renewed no sooner than MIN_PEER_RENEWAL_S.
        self._configured: DeviceConfig | None = None
        self._renewed: tuple[str, float] | None = None
        # The interface was created by ``prepare`` and no connect has used it yet.
        self._prepared = False
        # A tunnel taken over whose plumbing is not checked yet (its peer's endpoint, for the log).
        self._adopted_endpoint: str | None = None

    @property
    def ifname(self) -> str:
        return self.settings.ifname

    def _routing(self, families: tuple[int, ...], server: Server | None = None) -> FullTunnelRouting:
        return FullTunnelRouting.for_server(self.settings, families, server)

    async def adopt(self, servers: Iterable[Server]) -> Server | None:
        """Take over a running tunnel whose peer is one of ``servers``, without interrupting it.

        Returns that server, with routes and DNS checked (and completed if something is missing),
        or None when there is no running tunnel or its peer is none of ``servers`` (then
        ``connect`` replaces the peer on the existing interface).
        """
        server = await self.take_over(servers)
        if server is not None:
            await self.complete_adoption()
        return server

    async def take_over(self, servers: Iterable[Server]) -> Server | None:
        """:meth:`adopt`'s first half: the running tunnel's server, its backend taken over
        (wireguard-go as our child), nothing checked around it yet; :meth:`complete_adoption`
        does that. The daemon puts its lock in between: the tunnel already carries traffic, and
        the lock should not wait for a route check and the resolvers (issue #27 item 4)."""
        async with self._lock:
            if not await self.backend.adopt():
                return None
            stats = await self.backend.stats()
            server = next((s for s in servers if s.peer.public_key == stats.public_key), None)
            if server is None:
                self._log.info("running tunnel has a peer that is not configured; it will be replaced")
                return None
            self.server = server
            self._adopted_endpoint = str(stats.endpoint)
            return server

    async def complete_adoption(self) -> None:
        """:meth:`adopt`'s second half: the taken-over tunnel's addresses, routes and resolvers
        checked, and completed where something is missing. Raises as ``connect`` does."""
        async with self._lock:
            if self.server is None or self._adopted_endpoint is None:
                return  # nothing taken over, or connected to a server since
            server, endpoint, self._adopted_endpoint = self.server, self._adopted_endpoint, None
            await self._plumb(server)
            self._log.info("adopted the running tunnel", server=server.name, endpoint=endpoint)

    async def prepare(self) -> None:
        """Create the interface ahead of the first ``connect`` (start wireguard-go, wait for its
        socket), so that it is ready by the time the lock is in force (issue #27 item 4).

        Without a peer nothing can pass through the interface, so it may exist before the lock:
        the peer is set only by ``connect``, which the machine asks for once the lock is in force
        and watched. A failure here is only logged: ``connect`` tries again and reports it to the
        machine as before. ``abandon_prepared`` undoes it if the daemon ends before connecting.
        """
        async with self._lock:
            if self.server is not None:
                return  # adopted or connected meanwhile
            try:
                self._prepared = await self.backend.ensure_interface()
            except Exception as err:  # connect meets it again and reports it to the machine
                self._log.debug("could not create the interface ahead of the first connect", error=str(err))

    async def abandon_prepared(self) -> None:
        """Take away the interface ``prepare`` created if no ``connect`` ever used it (the daemon
        ends before its first connect, as when the lock fails): nothing of this start stays."""
        async with self._lock:
            if self._prepared and self._configured is None and self.server is None:
                self._prepared = False
                await self.backend.close(keep_interface=False)

    async def connect(self, server: Server) -> None:
        """Make ``server`` the tunnel's peer: create the interface if needed, or swap the peer.

        The backend change comes first and is atomic; the plumbing after it is a no-op when the
        new server has the same addresses and DNS as the old one.
        """
        async with self._lock:
            created = await self.backend.ensure_interface() or self._prepared
            self._prepared = False
            config = DeviceConfig.for_server(server, self.settings.fwmark)
            kept = not created and await self._has_peer(config)
            if not kept:
                await self._set_peer(config)
            previous, self.server = self.server, server
            self._adopted_endpoint = None  # plumbed here
            await self._plumb(server)
            self._log.info(
                "tunnel connected"
                if created or previous is None
                else "peer kept (unchanged)"
                if kept
                else "peer swapped",
                server=server.name,
                endpoint=str(server.endpoint),
                previous=previous.name if previous else None,
            )

    async def restart_handshake(self, server: Server) -> None:
        """Set ``server``'s peer again as it is: its handshake state starts over, so the next
        packet sends an initiation at once (WireGuard's own retry comes only after 5 s)."""
        async with self._lock:
            await self._set_peer(DeviceConfig.for_server(server, self.settings.fwmark))
            self._log.debug("handshake restarted", server=server.name)

    async def _has_peer(self, config: DeviceConfig) -> bool:
        """Whether the backend runs exactly ``config`` already (as we set it, with its peer)."""
        if self._configured != config:
            return False
        return (await self.backend.stats()).public_key == config.peer.public_key

    async def _set_peer(self, config: DeviceConfig) -> None:
        renewed = self._renewed
        if renewed is not None and renewed[0] == config.peer.public_key:
            await anyio.sleep(max(0.0, renewed[1] + MIN_PEER_RENEWAL_S - time.monotonic()))
        self._configured = None  # unknown until the set succeeded
        await self.backend.configure(config)
        self._configured, self._renewed = config, (config.peer.public_key, time.monotonic())

    async def disconnect(self) -> None:
        """Remove the peer; interface, addresses and routes stay, so nothing leaves outside it."""
        async with self._lock:
            self._configured = None
            await self.backend.remove_peer()
            self.server = self._adopted_endpoint = None
            self._log.info("peer removed")

    async def stats(self) -> TunnelStats:
        """One cheap read of handshake, counters and endpoint (one UAPI get or netlink dump)."""
        return await self.backend.stats()

    async def routing_missing(self) -> list[str]:
        """What of the policy routing is absent (empty when complete): for status and checks."""
        families = routed_families(self.ifname)
        async with AsyncIPRoute() as ipr:
            admin_missing = await AdminReplyRouting(families).missing(ipr)
            return admin_missing + await self._routing(families, self.server).missing(ipr)

    async def close(self, keep_interface: bool = False) -> None:
        """Undo the tunnel: DNS restored, routes removed, interface deleted (unless kept)."""
        async with self._lock:
            if keep_interface:
                await self.backend.close(keep_interface=True)
                return
            if self._dns is not None:
                # resolvectl or resolvconf runs, or a file write: off the loop, never cut short.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._dns.restore)
                self._dns_servers = None
            async with AsyncIPRoute() as ipr:
                await self._routing((4, 6)).remove(ipr)
            await self.backend.close(keep_interface=False)
            self.server = self._adopted_endpoint = None
            self._configured = None
            self._log.info("tunnel closed")

    async def on_backend_event(self, event: BackendEvent) -> None:
        """Put addresses and routes back on the new interface of a restarted backend."""
        if isinstance(event, BackendRestarted) and self.server is not None:
            async with self._lock:
                if self._configured is not None:  # re-applied by the backend: a peer set just now
                    self._renewed = (self._configured.peer.public_key, time.monotonic())
                if self.server is not None:
                    await self._plumb(self.server)

    async def _plumb(self, server: Server) -> None:
        # The order and the parts are supervisor.net.routing_plan.TunnelPlan's, which the early
        # start applies with iproute2 (supervisor.net.ip_batch) before the daemon adopts it.
        families = routed_families(self.ifname)
        link = LinkPlan.for_server(self.ifname, server, families)
        async with AsyncIPRoute() as ipr:
            await configure_link(ipr, link.ifname, link.addresses, link.mtu)
            # The administrator's replies keep their way out before the tunnel's routes take
            # everything else; the rule stays when the tunnel closes (supervisor/net/admin_route.py).
            await AdminReplyRouting(families).apply(ipr)
            await self._routing(families, server).apply(ipr)
        if self._dns is not None and server.dns and server.dns != self._dns_servers:
            # Up to three resolvectl runs: in a thread, so the loop (and the lock guard) goes on.
            await anyio.to_thread.run_sync(self._dns.apply, server.dns)
            self._dns_servers = server.dns
        elif isinstance(self._dns, ResolvConfFile) and self._dns_servers:
            # Every connect: a file someone rewrote since is put right (see keep_resolvers).
            await anyio.to_thread.run_sync(self._dns.reassert, self._dns_servers)

    async def keep_resolvers(self) -> None:
        """Put the tunnel's resolvers back each time someone rewrites the resolv.conf file (a
        DHCP client renewing its lease does): names would otherwise stop resolving, since the
        lock refuses every other resolver. Only the file method needs it: resolved and
        resolvconf merge their sources themselves. Runs until cancelled."""
        if not isinstance(self._dns, ResolvConfFile):
            return
        dns = self._dns
        async with file_changes(dns.path) as changes:
            async for _ in changes:
                async with self._lock:
                    if self._dns_servers:
                        try:
                            await anyio.to_thread.run_sync(dns.reassert, self._dns_servers)
                        except DnsError as err:
                            self._log.warning("cannot put the tunnel's resolvers back", error=str(err))


@contextlib.asynccontextmanager
async def open_tunnel(
    settings: TunnelSettings,
    report: Report = ignore_events,
    placement: Placement | None = None,
    **backend_options: Any,
) -> AsyncIterator[Tunnel]:
    """The tunnel for ``settings``, its backend chosen (``auto``) and entered.

    ``report`` hears the backend's own events (wireguard-go died / restarted / a restart failed),
    after the tunnel has re-plumbed a restarted interface. ``placement`` (namespace mode): the
    caller runs in the app namespace, and the backend keeps WireGuard's UDP in the host.
    """
    kind = await resolve_backend(settings.backend, settings.ifname)
    tunnel: Tunnel | None = None

    async def relay(event: BackendEvent) -> None:
        if tunnel is not None:
            await tunnel.on_backend_event(event)
        await report(event)

    dns = None
    if settings.manage_dns:  # a symlink resolved, PATH searched: file system work, off the loop
        dns = await anyio.to_thread.run_sync(
            detect_dns_manager, settings.ifname, settings.resolv_conf, settings.state_dir
        )
    async with open_backend(kind, settings.ifname, relay, placement, **backend_options) as backend:
        tunnel = Tunnel(settings, backend, dns)
        yield tunnel
