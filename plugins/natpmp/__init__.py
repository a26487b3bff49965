"""NAT-PMP port forwarding as a plugin: map through the tunnel's gateway on every connection.

At every new connection (connect, failover, rotation, reconnect: a new ``session`` in the view)
it maps UDP and TCP at once, asks the lock to accept the granted port through the tunnel, and
refreshes halfway through the lease (RFC 6886 section 3.3). A refresh that brings another port
is an ordinary change: the lock and every consumer follow it. A failure is retried with a
doubling delay while the connection lasts. At ``stopping`` it gives the mapping up.

Providers such as Proton forward the external port to the *same* port on the tunnel address,
so the external port is the one a torrent client must listen on. The first request of a
connection asks for internal port ``internal_port`` (0 by default) and suggests external port 1,
which is Proton's documented ``natpmpc -a 1 0 udp 60``; a refresh suggests the port it holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from ipaddress import AddressValueError, IPv4Address
from typing import Any

import anyio

from plugins.natpmp import codec
from plugins.natpmp.client import NatPmpClient
from supervisor.plugins import PluginContext, PluginOptionError, Tunnel

RETRY_INITIAL_S = 2.0
RETRY_MAX_S = 30.0
UNMAP_TRIES = 2


def _number(options: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise PluginOptionError(f"{key} = {value!r}: a number from {low:g} to {high:g}")
    return value


class NatPmpPlugin:
    def __init__(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - {"gateway", "lifetime_s", "internal_port", "tries", "servers"}
        if unknown:
            raise PluginOptionError(f"unknown option(s) {', '.join(sorted(unknown))}")
        gateway = options.get("gateway")
        try:
            self.gateway = IPv4Address(gateway) if gateway is not None else None
        except (AddressValueError, ValueError):
            raise PluginOptionError(f"gateway = {gateway!r}: an IPv4 address such as 10.2.0.1") from None
        self.lifetime_s = int(_number(options, "lifetime_s", 60, 2, 86400))
        self.internal_port = int(_number(options, "internal_port", 0, 0, 65535))
        self.tries = int(_number(options, "tries", 6, 1, codec.MAX_TRIES))
        servers = options.get("servers", [])
        if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
            raise PluginOptionError("servers: a list of server names (empty: every server)")
        self.servers = frozenset(servers)

    def client(self, tunnel: Tunnel) -> NatPmpClient | None:
        gateway = self.gateway or tunnel.gateway
        if gateway is None:
            return None
        return NatPmpClient(gateway, tunnel.address_v4, codec.retry_timeouts(self.tries))

    async def _map(self, client: NatPmpClient, suggested: int) -> tuple[int, int]:
        """(port, lifetime): UDP first, then TCP asked for the same port."""
        udp = await client.map("udp", self.internal_port, suggested, self.lifetime_s)
        tcp = await client.map("tcp", self.internal_port, udp.external_port, self.lifetime_s)
        if tcp.external_port != udp.external_port:
            raise codec.NatPmpError(f"TCP got port {tcp.external_port}, UDP {udp.external_port}")
        return udp.external_port, min(udp.lifetime_s, tcp.lifetime_s)

    async def _map_while(
        self, ctx: PluginContext, tunnel: Tunnel, client: NatPmpClient, suggested: int
    ) -> tuple[int, int] | None:
        """``_map``, abandoned (None) as soon as the connection it was for is gone: retries to a
        server just left must not hold up the mapping at the next one, nor answer for it."""
        granted: tuple[int, int] | None = None
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
                granted = await self._map(client, suggested)
            except (OSError, codec.NatPmpError) as err:
                failure = err  # raised below, not as a group from the task group
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return granted

    async def _unmap(self, ctx: PluginContext, tunnel: Tunnel) -> None:
        gateway = self.gateway or tunnel.gateway
        if gateway is None:
            return
        client = NatPmpClient(gateway, tunnel.address_v4, codec.retry_timeouts(UNMAP_TRIES))
        for protocol in ("udp", "tcp"):
            try:
                await client.unmap(protocol, self.internal_port)
            except (OSError, codec.NatPmpError) as err:
                ctx.log.warning("could not give the mapping up", protocol=protocol, error=str(err))
        ctx.log.info("mapping given up")

    async def run(self, ctx: PluginContext) -> None:
        session: int | None = None  # the connection the current mapping belongs to
        port = 0
        due: float | None = None  # when to (re)map next, monotonic
        expires = 0.0  # when the current mapping's lease ends, monotonic
        retry = RETRY_INITIAL_S
        tunnel = ctx.view.tunnel
        while True:
            wait = None if due is None else due - time.monotonic()
            view = await ctx.next(wait)
            if view is not None:
                tunnel = view.tunnel
            if tunnel.state == "stopping":
                if session is not None:
                    await self._unmap(ctx, tunnel)
                session, due = None, None
                continue
            if not tunnel.connected or (self.servers and tunnel.server not in self.servers):
                session, port, due = None, 0, None
                ctx.report(port=None, gateway=None)
                continue
            if session == tunnel.session and view is not None:
                continue  # the same connection, and no refresh due: nothing to do
            new_connection = session != tunnel.session
            client = self.client(tunnel)
            if client is None:
                ctx.report(last_error="no gateway: set [plugins.natpmp] gateway")
                session, due = tunnel.session, None
                continue
            try:
                granted = await self._map_while(
                    ctx, tunnel, client, 1 if new_connection or not port else port
                )
                if granted is None:
                    continue  # the connection changed meanwhile: the next view says what to do
                mapped, lifetime = granted
            except (OSError, codec.NatPmpError) as err:
                ctx.log.warning(
                    "port mapping failed", gateway=str(client.gateway), error=str(err), retry_s=retry
                )
                ctx.report(last_error=str(err), last_error_at=round(time.time(), 3))
                if port and time.monotonic() >= expires:
                    # The lease ran out unrenewed: the port no longer reaches us; stop announcing it.
                    ctx.log.warning("mapping expired", port=port)
                    port = 0
                    await ctx.forward_ports(None)
                    ctx.report(port=None)
                due, retry = time.monotonic() + retry, min(retry * 2, RETRY_MAX_S)
                continue
            retry = RETRY_INITIAL_S
            if mapped != port or new_connection:
                ctx.log.info("port forwarded", port=mapped, server=tunnel.server, lifetime_s=lifetime)
            session, port, expires = tunnel.session, mapped, time.monotonic() + lifetime
            await ctx.forward_ports([port])
            ctx.report(
                port=port,
                gateway=str(client.gateway),
                lifetime_s=lifetime,
                mapped_at=round(time.time(), 3),
                last_error=None,
            )
            # Renew halfway to expiry (RFC 6886 section 3.3), never more often than once a second.
            due = time.monotonic() + max(1.0, lifetime / 2)


def factory(options: Mapping[str, Any]) -> NatPmpPlugin:
    return NatPmpPlugin(options)
