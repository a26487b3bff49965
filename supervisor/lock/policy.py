"""The lock policy: a frozen description of everything the lock lets through.

The policy is data so that deciding (the state machine: which endpoints may be
reached now) and rendering (one nft transaction) never share a function, and so
that a property test can check every policy the machine could produce.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_network

from msgspec import Struct
from msgspec.structs import replace

from supervisor.servers import Endpoint, IPAddress, IPNetwork, Server, network_within


class LockPolicy(Struct, frozen=True):
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
    # The administrator's way in on the physical side (lock.admin_tcp, supervisor.lock.admin):
    # TCP ports that connections from outside may reach, from ``admin_sources`` (empty: from
    # anywhere); the replies of those connections, and nothing else, leave outside the tunnel.
    admin_tcp: tuple[int, ...] = ()
    admin_sources: tuple[IPNetwork, ...] = ()
    # DHCP and NDP keep the physical link up; without them a lease or a neighbour expires.
    link_upkeep: bool = True
    # What belongs to the tunnel: the servers' address prefixes (with_servers) and the tunnel-side
    # addresses the config names (probe target, NAT-PMP gateway); with the tunnel's resolvers,
    # never LAN, even where a LAN's range holds them (tunnel_owned).
    tunnel_prefixes: frozenset[IPNetwork] = frozenset()
    tunnel_targets: frozenset[IPAddress] = frozenset()
    # The physical uplinks as configured (``lock.uplinks``); empty: found from the routes when
    # the lock is applied (supervisor.net.bypass).
    uplinks: tuple[str, ...] = ()
    # Read when the lock is applied, like ``onlink`` (supervisor.lock.links): the devices that
    # get the egress chain (every frame leaving them, a macvlan child's or a bridged VM's
    # included), and the host's bridges without an uplink, whose port-to-port traffic the
    # forward chain lets through when br_netfilter hands it over.
    egress_devices: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    # Whether the transaction touches the netdev family at all (the egress table, or removing a
    # stale one). False for the boot file, which knows no links, and where the kernel refused the
    # egress table: a kernel built without netdev tables must still get the lock.
    netdev: bool = True

    @property
    def tunnel_owned(self) -> frozenset[IPNetwork]:
        """Every prefix of the tunnel's own: addresses, resolvers, configured targets."""
        hosts = {ip_network(a) for a in (*self.tunnel_dns, *self.tunnel_targets)}
        return self.tunnel_prefixes | hosts

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
            tunnel_prefixes=frozenset(a.network for s in servers for a in s.addresses),
        )


def exclude(networks: Iterable[IPNetwork], holes: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """``networks`` without the addresses of ``holes`` (each split around the hole it holds)."""
    out = list(networks)
    for hole in holes:
        kept: list[IPNetwork] = []
        for net in out:
            if network_within(net, hole):
                continue
            if network_within(hole, net):
                kept.extend(net.address_exclude(hole))  # type: ignore[arg-type]
            else:
                kept.append(net)
        out = kept
    return tuple(sorted(set(out), key=lambda n: (n.version, int(n.network_address), n.prefixlen)))
