"""The lock policy: a frozen description of everything the lock lets through.

The policy is data so that deciding (the state machine: which endpoints may be
reached now) and rendering (one nft transaction) never share a function, and so
that a property test can check every policy the machine could produce.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from supervisor.servers import Endpoint, IPAddress, IPNetwork, Server


@dataclass(frozen=True)
class LockPolicy:
    """What may leave or reach this host outside the default drop."""

    table: str
    tunnel_interface: str
    fwmark: int
    endpoints: frozenset[Endpoint] = frozenset()
    tunnel_dns: frozenset[IPAddress] = frozenset()
    allow_lan: bool = False
    lan_ranges: tuple[IPNetwork, ...] = ()
    inbound_tcp: tuple[int, ...] = ()
    # The on-link subnets of the host's interfaces (the tunnel's aside), read when the lock is
    # applied (supervisor.lock.onlink): LAN ranges count only where they are on-link, and
    # neighbour discovery reaches unicast neighbours only in them. Empty: link-local only.
    onlink: tuple[IPNetwork, ...] = ()
    # What may arrive through the tunnel besides replies: ("tcp" | "udp", port) pairs, the
    # configured ones plus those a plugin forwards (NAT-PMP). A provider that hands out a public
    # address must not expose the host's SSH or web UI.
    tunnel_inbound: frozenset[tuple[str, int]] = frozenset()
    # DHCP and NDP keep the physical link up; without them a lease or a neighbour expires.
    link_upkeep: bool = True
    # The physical uplinks as configured (``lock.uplinks``); empty: found from the routes when
    # the lock is applied (supervisor.net.bypass).
    uplinks: tuple[str, ...] = ()
    # Read when the lock is applied, like ``onlink`` (supervisor.lock.links): the devices that
    # get the egress chain (every frame leaving them, a macvlan child's or a bridged VM's
    # included), and the host's bridges without an uplink, whose port-to-port traffic the
    # forward chain lets through when br_netfilter hands it over.
    egress_devices: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()

    def with_endpoints(self, endpoints: Iterable[Endpoint]) -> LockPolicy:
        """The same policy letting the tunnel reach ``endpoints`` (a subset of the configured)."""
        return replace(self, endpoints=frozenset(endpoints))

    def with_tunnel_inbound(self, extra: Iterable[tuple[str, int]]) -> LockPolicy:
        """The same policy also accepting ``extra`` (protocol, port) pairs through the tunnel."""
        return replace(self, tunnel_inbound=self.tunnel_inbound | frozenset(extra))

    def with_servers(self, servers: Iterable[Server]) -> LockPolicy:
        """The same policy narrowed to ``servers``: their endpoints and their tunnel DNS."""
        servers = tuple(servers)
        return replace(
            self,
            endpoints=frozenset(s.endpoint for s in servers),
            tunnel_dns=frozenset(d for s in servers for d in s.dns),
        )
