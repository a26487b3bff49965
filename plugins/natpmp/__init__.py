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

The gateway, not the user, picks that port, so a granted port is judged before the lock accepts
it: a port below 1024, one outside ``allowed_ports``, or one that a program not named in
``listeners`` (the torrent clients) already listens on would expose a service the user never
chose (a gateway granting 22 would put the host's SSH on the internet). Such a grant is refused:
given back to the gateway, logged, shown as ``refused`` in the status, and asked again when a
refresh would be due.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from ipaddress import AddressValueError, IPv4Address
from typing import Any

import anyio

from plugins import sockets
from plugins.natpmp import codec
from plugins.natpmp.client import NatPmpClient
from supervisor.errors import describe
from supervisor.plugins import PluginContext, PluginOptionError, Tunnel

RETRY_INITIAL_S = 2.0
RETRY_MAX_S = 30.0
UNMAP_TRIES = 2
FIRST_UNPRIVILEGED = 1024
# The programs a forwarded port is for: torrent clients, by executable name.
DEFAULT_LISTENERS = (
    "qbittorrent-nox",
    "qbittorrent",
    "transmission-daemon",
    "transmission-gtk",
    "transmission-qt",
    "deluged",
    "rtorrent",
    "aria2c",
)


def grant_refusal(
    port: int,
    allowed: Sequence[range],
    holders: Sequence[tuple[sockets.Socket, Sequence[sockets.Program]]],
    listeners: frozenset[str],
) -> str | None:
    """Why the lock must not accept ``port`` that a gateway granted, or None when it may.
    ``holders``: the sockets of this namespace that accept on ``port``, with their programs;
    ``listeners``: program names, or ``uid:N`` for any socket of that owner (a client in another
    container, whose process cannot be seen from here)."""
    if port < FIRST_UNPRIVILEGED:
        return f"port {port} is below {FIRST_UNPRIVILEGED}: a system service's, never forwarded"
    if not any(port in r for r in allowed):
        return f"port {port} is outside allowed_ports ({', '.join(map(_shown_range, allowed))})"
    for sock, programs in holders:
        if sock.port != port or sock.loopback_only or f"uid:{sock.uid}" in listeners:
            continue
        if not programs:
            return (
                f"port {port} ({sock.protocol}) is held by a process tunlock cannot see (uid "
                f"{sock.uid}, another PID namespace?), not by one of listeners"
            )
        foreign = next((p for p in programs if p.name not in listeners), None)
        if foreign is not None:
            return (
                f"port {port} ({sock.protocol}) is held by {foreign.name} (pid {foreign.pid}), "
                "not by one of listeners"
            )
    return None


def _shown_range(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def _port_ranges(options: Mapping[str, Any]) -> tuple[range, ...]:
    value = options.get("allowed_ports", [f"{FIRST_UNPRIVILEGED}-65535"])
    wrong = PluginOptionError(
        f'allowed_ports = {value!r}: a list of ports and ranges such as [51413, "40000-65535"], '
        f"each within {FIRST_UNPRIVILEGED}-65535"
    )
    if not isinstance(value, list) or not value:
        raise wrong
    ranges = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif (
            isinstance(item, str)
            and item.count("-") == 1
            and all(part.strip().isascii() and part.strip().isdigit() for part in item.split("-"))
        ):
            low, high = (int(part) for part in item.split("-"))
        else:
            raise wrong
        if not FIRST_UNPRIVILEGED <= low <= high <= 65535:
            raise wrong
        ranges.append(range(low, high + 1))
    return tuple(ranges)


def _holders(port: int) -> list[tuple[sockets.Socket, list[sockets.Program]]]:
    """The sockets accepting on ``port`` here, with their programs (blocking: a thread)."""
    on_port = [s for s in sockets.accepting_sockets() if s.port == port and not s.loopback_only]
    programs = sockets.programs_of(s.inode for s in on_port)
    return [(s, programs[s.inode]) for s in on_port]


def _number(options: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise PluginOptionError(f"{key} = {value!r}: a number from {low:g} to {high:g}")
    return value


class NatPmpPlugin:
    def __init__(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - {
            "gateway",
            "lifetime_s",
            "internal_port",
            "tries",
            "servers",
            "allowed_ports",
            "listeners",
        }
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
        self.allowed_ports = _port_ranges(options)
        listeners = options.get("listeners", list(DEFAULT_LISTENERS))
        if not isinstance(listeners, list) or not all(isinstance(n, str) and n for n in listeners):
            raise PluginOptionError(
                "listeners: a list of program names (the executable's file name, such as "
                "qbittorrent-nox) or \"uid:N\" entries that may already listen on a granted port"
            )
        self.listeners = frozenset(listeners)
        # Who accepts on a port (the kernel's socket table here); replaced in unit tests.
        self.holders = _holders

    async def refusal(self, port: int) -> str | None:
        """``grant_refusal`` for a port just granted, with this namespace's socket table."""
        holders = await anyio.to_thread.run_sync(self.holders, port)
        return grant_refusal(port, self.allowed_ports, holders, self.listeners)

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
                ctx.log.warning("could not give the mapping up", protocol=protocol, error=describe(err))
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
                    "port mapping failed", gateway=str(client.gateway), error=describe(err), retry_s=retry
                )
                ctx.report(last_error=describe(err), last_error_at=round(time.time(), 3))
                if port and time.monotonic() >= expires:
                    # The lease ran out unrenewed: the port no longer reaches us; stop announcing it.
                    ctx.log.warning("mapping expired", port=port)
                    port = 0
                    await ctx.forward_ports(None)
                    ctx.report(port=None)
                due, retry = time.monotonic() + retry, min(retry * 2, RETRY_MAX_S)
                continue
            retry = RETRY_INITIAL_S
            # A port this connection already holds was judged when it came (and the torrent
            # client has since been moved onto it); a new one is judged now.
            refused = await self.refusal(mapped) if mapped != port or new_connection else None
            if refused is not None:
                ctx.log.warning(
                    "granted port refused: not accepted by the lock",
                    port=mapped,
                    server=tunnel.server,
                    reason=refused,
                )
                if port:
                    await ctx.forward_ports(None)  # the gateway moved us off the port we held
                session, port = tunnel.session, 0
                ctx.report(
                    port=None,
                    refused={"port": mapped, "reason": refused, "at": round(time.time(), 3)},
                )
                await self._unmap(ctx, tunnel)
                due = time.monotonic() + max(1.0, lifetime / 2)  # asked again as a refresh would be
                continue
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
                refused=None,
            )
            # Renew halfway to expiry (RFC 6886 section 3.3), never more often than once a second.
            due = time.monotonic() + max(1.0, lifetime / 2)


def factory(options: Mapping[str, Any]) -> NatPmpPlugin:
    return NatPmpPlugin(options)
