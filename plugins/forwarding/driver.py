"""The one port-forwarding driver: a plugin that serves any ``PortForwarder`` per connection.

At every new connection (a new ``session`` in the view: connect, failover, rotation, reconnect)
it obtains a lease from its provider, judges the ports (``trust.grant_refusal``), asks the lock to
accept them through the tunnel, and renews the lease halfway through its lifetime (RFC 6886
section 3.3 for NAT-PMP; a lease without lifetime is held as long as the connection). A renewal
that brings other ports is an ordinary change: judged, and the lock and every consumer follow
it. A failure is retried with a doubling delay (bounded) while the connection lasts; once the
lease ran out unrenewed its ports are withdrawn. An exchange still under way with a server just
left is abandoned at the failover. At ``stopping`` the lease is released.

A refused port is released to the provider, logged, shown as ``refused`` in the status and
asked for again when a renewal would have been due.

Each connection's first request suggests the port held before (``suggested_port``): a provider
that can keep it (NAT-PMP's suggested external port) gives it back, and then neither the torrent
client nor the peers' caches need a change; the status says whether the port changed.

With ``required = true`` the user needs the port (a seedbox nobody reaches is no seedbox): while
a connection has no port, each request that fails after the provider's tries (a gateway that
refuses or stays silent) makes the host tell the machine its server is unfit
(``PluginContext.server_unfit``), which leaves it like a failed server, or stays on it when no
other can be tried; the first grant of each connection tells it the server forwards ports
(``port_granted``), which rotation prefers.

Time is the event loop's clock (``anyio.current_time``) unless a clock is given: the unit tests
run the driver on a virtual clock, so its minutes of leases and retries take milliseconds.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable

import anyio
from msgspec import field

from plugins.forwarding import trust
from plugins.forwarding.provider import ForwardingError, Lease, NotForwardedHere, PortForwarder
from plugins.sockets import Program, Socket
from supervisor.errors import describe
from supervisor.plugins import PluginContext, PluginOptions, TunnelView
from supervisor.tables import FieldProblem

RETRY_INITIAL_S = 2.0
RETRY_MAX_S = 30.0
RENEW_MIN_S = 1.0  # never renew more often than once a second, whatever the lifetime
# A refused lease that does not expire (a static port held by another program) is judged again
# this often: the program may have gone.
REJUDGE_S = RETRY_MAX_S
_ALL_UNPRIVILEGED: list[int | str] = [f"{trust.FIRST_UNPRIVILEGED}-65535"]


class ForwardingOptions(PluginOptions, frozen=True):
    """The options every port-forwarding plugin has, whatever its provider."""

    servers: list[str] = field(default_factory=list)  # only these servers (empty: every server)
    allowed_ports: list[int | str] = field(default_factory=lambda: _ALL_UNPRIVILEGED.copy())
    listeners: list[str] = field(default_factory=lambda: list(trust.DEFAULT_LISTENERS))
    required: bool = False  # true: a server that forwards no port is left like a dead one

    def __post_init__(self) -> None:
        try:
            trust.port_ranges(self.allowed_ports)
        except ValueError as err:
            raise FieldProblem("allowed_ports", str(err)) from None
        if not all(self.listeners):
            raise FieldProblem(
                "listeners",
                "a list of program names (the executable's file name, such as qbittorrent-nox) or "
                '"uid:N" entries that may already listen on a granted port',
            )

    @property
    def port_ranges(self) -> tuple[range, ...]:
        return trust.port_ranges(self.allowed_ports)


class PortForwarding:
    """The plugin: ``provider``'s leases, judged, in the lock and the status."""

    def __init__(
        self,
        provider: PortForwarder,
        options: ForwardingOptions,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.servers = frozenset(options.servers)
        self.allowed_ports = options.port_ranges
        self.listeners = frozenset(options.listeners)
        self.required = options.required
        self.clock = clock or anyio.current_time
        self.wall = wall

    async def read_holders(self, port: int) -> list[tuple[Socket, list[Program]]]:
        """Who accepts on ``port`` here (the kernel's socket table, in a thread)."""
        return await anyio.to_thread.run_sync(trust.holders, port)

    async def refusal(self, ports: tuple[int, ...]) -> tuple[int, str] | None:
        """The first of ``ports`` the lock must not accept, and why; None when it may take all."""
        for port in ports:
            reason = trust.grant_refusal(
                port, self.allowed_ports, await self.read_holders(port), self.listeners
            )
            if reason is not None:
                return port, reason
        return None

    async def run(self, ctx: PluginContext) -> None:
        session: int | None = None  # the connection being served
        held: Lease | None = None  # the lease whose ports the lock accepts, for ``session``
        expires = math.inf  # when ``held`` runs out unrenewed, on ``self.clock``
        due: float | None = None  # when to ask the provider next, on ``self.clock``
        retry = RETRY_INITIAL_S
        previous: int | None = None  # the last port held, on any connection: asked for again
        granted_here = False  # ``session`` got a port at least once
        tunnel = ctx.view.tunnel
        ctx.report(provider=self.provider.name, port=None, required=self.required)
        while True:
            view = await ctx.next(None if due is None else due - self.clock())
            if view is not None:
                tunnel = view.tunnel
            if tunnel.state == "stopping":
                if held is not None:
                    await self._release(ctx, tunnel, held)
                session, held, due = None, None, None
                continue
            if not tunnel.connected or (self.servers and tunnel.server not in self.servers):
                session, held, due = None, None, None  # the host dropped the ports with the connection
                ctx.report(port=None, gateway=None)
                continue
            if session == tunnel.session and view is not None:
                continue  # the same connection, and nothing due: nothing to do
            if session != tunnel.session:
                session, held, retry = tunnel.session, None, RETRY_INITIAL_S
                granted_here = False
            try:
                if held is None:
                    asking = functools.partial(self.provider.obtain, tunnel, previous)
                else:
                    asking = functools.partial(self.provider.renew, tunnel, held)
                lease = await self._while_connected(ctx, tunnel, asking)
            except NotForwardedHere as err:
                ctx.report(last_error=describe(err), last_error_at=round(self.wall(), 3))
                due = None  # nothing to retry before the next connection
                if not granted_here:
                    await self._unfit(ctx, tunnel, err)
                continue
            except (OSError, ForwardingError) as err:
                ctx.log.warning(
                    "port forwarding failed", provider=self.provider.name, error=describe(err), retry_s=retry
                )
                ctx.report(last_error=describe(err), last_error_at=round(self.wall(), 3))
                if not granted_here:
                    await self._unfit(ctx, tunnel, err)
                if held is not None and self.clock() >= expires:
                    # The lease ran out unrenewed: its ports no longer reach us; stop announcing them.
                    ctx.log.warning("forwarded port expired", port=held.port)
                    held = None
                    await ctx.forward_ports(None)
                    ctx.report(port=None)
                due, retry = self.clock() + retry, min(retry * 2, RETRY_MAX_S)
                continue
            if lease is None:
                continue  # the connection changed meanwhile: the next view says what to do
            retry = RETRY_INITIAL_S
            # Ports this connection already holds were judged when they came (and the torrent
            # client has since been moved onto them); new ones are judged now.
            new = held is None or lease.ports != held.ports
            refused = await self.refusal(lease.ports) if new else None
            if refused is not None:
                port, reason = refused
                ctx.log.warning(
                    "granted port refused: not accepted by the lock",
                    port=port,
                    server=tunnel.server,
                    reason=reason,
                )
                if held is not None:
                    await ctx.forward_ports(None)  # the provider moved us off the ports we held
                held = None
                ctx.report(port=None, refused={"port": port, "reason": reason, "at": round(self.wall(), 3)})
                await self._release(ctx, tunnel, lease)
                due = self.clock() + (self._renew_after(lease) or REJUDGE_S)  # asked again as a renewal
                continue
            if new:
                changed = previous is not None and lease.port != previous
                ctx.log.info(
                    "port forwarded",
                    port=lease.port,
                    server=tunnel.server,
                    lifetime_s=lease.lifetime_s,
                    provider=self.provider.name,
                    previous_port=previous,
                    port_changed=changed,
                )
                ctx.report(previous_port=previous, port_changed=changed)
                previous = lease.port
            if not granted_here:
                granted_here = True
                if self.required:
                    await ctx.port_granted()
            held = lease
            expires = math.inf if lease.lifetime_s is None else self.clock() + lease.lifetime_s
            await ctx.forward_ports(lease.ports)
            ctx.report(
                provider=self.provider.name,
                port=lease.port,
                ports=list(lease.ports),
                gateway=lease.via,
                lifetime_s=lease.lifetime_s,
                mapped_at=round(self.wall(), 3),
                last_error=None,
                refused=None,
            )
            renew_after = self._renew_after(lease)
            due = None if renew_after is None else self.clock() + renew_after

    async def _unfit(self, ctx: PluginContext, tunnel: TunnelView, err: Exception) -> None:
        """With ``required``: tell the machine this connection's server forwards no port, at each
        failed try while it has none (a server whose cooldown ran out may be tried meanwhile);
        the reason goes into the status too."""
        if not self.required:
            return
        reason = f"no forwarded port: {describe(err)}"
        ctx.log.warning("server unfit: it forwards no port", server=tunnel.server, reason=reason)
        ctx.report(unfit={"server": tunnel.server, "reason": reason, "at": round(self.wall(), 3)})
        await ctx.server_unfit(reason)

    @staticmethod
    def _renew_after(lease: Lease) -> float | None:
        """Halfway to expiry (RFC 6886 section 3.3), at most once a second; None: never."""
        return None if lease.lifetime_s is None else max(RENEW_MIN_S, lease.lifetime_s / 2)

    async def _while_connected(
        self,
        ctx: PluginContext,
        tunnel: TunnelView,
        call: Callable[[], Awaitable[Lease]],
    ) -> Lease | None:
        """``call()`` for ``tunnel``, abandoned (None) as soon as the connection it was for is
        gone: retries to a server just left must not hold up the next one, nor answer for it."""
        got: Lease | None = None
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while True:
                    await ctx.wait_for_change()
                    now = ctx.view.tunnel
                    if now.session != tunnel.session or not now.connected:
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            try:
                got = await call()
            except Exception as err:  # raised below, not as a group from the task group
                failure = err
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return got

    async def _release(self, ctx: PluginContext, tunnel: TunnelView, lease: Lease) -> None:
        try:
            await self.provider.release(tunnel, lease)
        except (OSError, ForwardingError) as err:
            ctx.log.warning("could not give the forwarded port up", port=lease.port, error=describe(err))
            return
        ctx.log.info("forwarded port given up", port=lease.port)
