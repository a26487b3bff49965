"""NAT-PMP port forwarding: the first ``PortForwarder``, on the generic driver.

The provider maps UDP and TCP at once through the tunnel's gateway (RFC 6886) and gives the
mapping up on release; when to map, refresh, retry, judge the granted port and tell the lock is
the driver's (``plugins.forwarding.driver``), shared with every other provider.

Providers such as Proton forward the external port to the *same* port on the tunnel address,
so the external port is the one a torrent client must listen on. The first request of a
connection asks for internal port ``internal_port`` (0 by default) and suggests the external port
held before (a gateway that can keep it gives it back: the torrent client and the peers need no
change), or 1 at the very first, which is Proton's documented ``natpmpc -a 1 0 udp 60``; a
refresh suggests the port it holds.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Annotated

from msgspec import Meta

from plugins.forwarding.driver import ForwardingOptions, PortForwarding
from plugins.forwarding.provider import ForwardingError, Lease, NotForwardedHere
from plugins.natpmp import codec
from plugins.natpmp.client import NatPmpClient
from supervisor.errors import describe
from supervisor.plugins import PluginSpec, TunnelView

UNMAP_TRIES = 2
FIRST_SUGGESTION = 1  # Proton's documented first request


class NatPmpOptions(ForwardingOptions, frozen=True):
    # default: the server's first IPv4 DNS address (Proton's 10.2.0.1 is both)
    gateway: IPv4Address | None = None
    lifetime_s: Annotated[int, Meta(ge=2, le=86400)] = 60  # the lease asked for
    internal_port: Annotated[int, Meta(ge=0, le=65535)] = 0
    tries: Annotated[int, Meta(ge=1, le=codec.MAX_TRIES)] = 6  # 250 ms, doubling


class NatPmpForwarder:
    """Leases from the tunnel's NAT-PMP gateway."""

    name = "natpmp"

    def __init__(self, options: NatPmpOptions) -> None:
        self.gateway = options.gateway
        self.lifetime_s = options.lifetime_s
        self.internal_port = options.internal_port
        self.tries = options.tries

    def client(self, tunnel: TunnelView, tries: int) -> NatPmpClient:
        gateway = self.gateway or tunnel.gateway
        if gateway is None:
            raise NotForwardedHere("no gateway: set [plugins.natpmp] gateway")
        return NatPmpClient(gateway, tunnel.address_v4, codec.retry_timeouts(tries))

    async def _map(self, tunnel: TunnelView, suggested: int) -> Lease:
        """UDP first, then TCP asked for the same port."""
        client = self.client(tunnel, self.tries)
        try:
            udp = await client.map("udp", self.internal_port, suggested, self.lifetime_s)
            tcp = await client.map("tcp", self.internal_port, udp.external_port, self.lifetime_s)
        except codec.NatPmpError as err:
            raise ForwardingError(describe(err)) from err
        if tcp.external_port != udp.external_port:
            raise ForwardingError(f"TCP got port {tcp.external_port}, UDP {udp.external_port}")
        return Lease((udp.external_port,), min(udp.lifetime_s, tcp.lifetime_s), via=str(client.gateway))

    async def obtain(self, tunnel: TunnelView, suggested_port: int | None) -> Lease:
        return await self._map(tunnel, suggested_port or FIRST_SUGGESTION)

    async def renew(self, tunnel: TunnelView, lease: Lease) -> Lease:
        return await self._map(tunnel, lease.port)

    async def release(self, tunnel: TunnelView, lease: Lease) -> None:
        client = self.client(tunnel, UNMAP_TRIES)
        failures = []
        for protocol in ("udp", "tcp"):
            try:
                await client.unmap(protocol, self.internal_port)
            except (OSError, codec.NatPmpError) as err:
                failures.append(f"{protocol}: {describe(err)}")
        if failures:
            raise ForwardingError("; ".join(failures))


def _make(options: NatPmpOptions) -> PortForwarding:
    return PortForwarding(NatPmpForwarder(options), options)


factory = PluginSpec(NatPmpOptions, _make)
