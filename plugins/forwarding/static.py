"""A static forwarded port: ``[plugins.static_port] ports = [N]``, for providers that assign one
port to an account for good (AirVPN, some WireGuard configs of others).

Nothing is asked of anyone: the lease is the configured ports, held as long as each connection
lasts. What makes it a provider rather than a line in the lock is the driver around it: the
ports are accepted through the tunnel only while connected (to one of ``servers``, when set),
judged like a gateway's grant (a port another program holds is refused), shown in the status and
handed to the torrent clients like any forwarded port.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from plugins.forwarding import trust
from plugins.forwarding.driver import ForwardingOptions, PortForwarding
from plugins.forwarding.provider import Lease
from supervisor.plugins import MAX_FORWARDED_PORTS, PluginSpec, TunnelView


class StaticPortOptions(ForwardingOptions, frozen=True, kw_only=True):
    ports: Annotated[
        list[Annotated[int, Meta(ge=trust.FIRST_UNPRIVILEGED, le=65535)]],
        Meta(min_length=1, max_length=MAX_FORWARDED_PORTS),
    ]

    def __post_init__(self) -> None:
        super().__post_init__()
        ranges = self.port_ranges
        outside = [port for port in self.ports if not any(port in r for r in ranges)]
        if outside:
            raise ValueError(f"ports {outside} are outside allowed_ports")


class StaticPorts:
    """The configured ports, for every connection."""

    name = "static"

    def __init__(self, ports: tuple[int, ...]) -> None:
        self.lease = Lease(tuple(dict.fromkeys(ports)), lifetime_s=None)

    async def obtain(self, tunnel: TunnelView, suggested_port: int | None) -> Lease:
        return self.lease

    async def renew(self, tunnel: TunnelView, lease: Lease) -> Lease:
        return self.lease

    async def release(self, tunnel: TunnelView, lease: Lease) -> None:
        return None


def _make(options: StaticPortOptions) -> PortForwarding:
    return PortForwarding(StaticPorts(tuple(options.ports)), options)


factory = PluginSpec(StaticPortOptions, _make)
