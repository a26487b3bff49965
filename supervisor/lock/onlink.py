"""The subnets the host reaches without a gateway: read from the kernel when the lock is applied.

"LAN" in the lock means on-link (``onlink_lan`` below): a private
destination routed through the gateway goes to the ISP, so the configured LAN
ranges count only where they overlap a subnet some interface reaches directly.
nftables cannot compare a packet's next hop with its destination at packet
time (``rt nexthop`` compares only with constants), so the subnets are read
here each time the lock is applied.

They are the prefixes of the interfaces' own addresses, not the routes: a
router advertisement may put any prefix on-link (an RA announcing ``2000::/3``
is accepted from any LAN peer, hop limit 255), and with it in the set a
neighbour solicitation carrying data to a global address left the host. An
RA can give an address only a /64 (SLAAC), so from addresses an RA gets no
wider than that. A prefix wider than a sane length (IPv4 shorter than /8,
IPv6 shorter than /64: what SLAAC, DHCPv6 and every hosting provider's static
IPv6 use) is left out: a hostile DHCP server's netmask does not make half the
address space LAN either.

An address's prefix counts only while the main table also reaches it on the
same interface without a gateway (a route whose destination holds the prefix):
an address added with ``noprefixroute``, or whose prefix route was deleted, has
its subnet routed through the gateway, to the ISP. A subnet reached only through
a route without an address on it (rare) is not on-link for the lock: it stays
closed (fails closed).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_interface, ip_network

from supervisor.net.ipjson import IpState, read_ip_state
from supervisor.servers import IPNetwork, network_within

# The widest prefix of an address that still makes its subnet on-link, per IP version.
MIN_PREFIXLEN = {4: 8, 6: 64}


def onlink_subnets(
    links: Iterable[dict], routes: Iterable[dict], exclude: Iterable[str] = ()
) -> tuple[IPNetwork, ...]:
    """Subnets of the addresses in ``ip -j addr`` entries that ``ip -j route`` entries reach
    on-link (pure: links and routes in, subnets out).

    Addresses on ``exclude`` (the tunnel) and loopback, of host scope, or with a prefix wider
    than ``MIN_PREFIXLEN`` are left out, and so is a prefix no gateway-less unicast route on the
    same interface holds.
    """
    skip = {"lo", *exclude}
    direct = _direct_routes(routes)
    out: set[IPNetwork] = set()
    for link in links:
        dev = str(link.get("ifname") or "")
        if dev in skip:
            continue
        for addr in link.get("addr_info", ()):
            if addr.get("scope") == "host" or "local" not in addr or "prefixlen" not in addr:
                continue
            try:
                network = ip_interface(f"{addr['local']}/{addr['prefixlen']}").network
            except ValueError:
                continue
            if network.prefixlen < MIN_PREFIXLEN[network.version]:
                continue
            if any(network_within(network, reach) for reach in direct.get(dev, ())):
                out.add(network)
    return tuple(sorted(out, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def _direct_routes(routes: Iterable[dict]) -> dict[str, list[IPNetwork]]:
    """Destinations of unicast routes without a gateway, by interface."""
    out: dict[str, list[IPNetwork]] = {}
    for route in routes:
        dst = route.get("dst", "")
        if (
            route.get("type", "unicast") != "unicast"
            or "gateway" in route
            or "via" in route
            or "nexthops" in route
            or not route.get("dev")
            or dst in ("default", "")
        ):
            continue
        try:
            out.setdefault(route["dev"], []).append(ip_network(dst, strict=False))
        except ValueError:
            continue
    return out


def read_onlink(exclude: Iterable[str] = (), state: IpState | None = None) -> tuple[IPNetwork, ...]:
    """The on-link subnets of this network namespace's interfaces, IPv4 and IPv6 (from
    ``state`` when read already)."""
    state = state if state is not None else read_ip_state()
    return onlink_subnets(state.addresses, state.routes, exclude)


# Ranges that never leave the link whatever the routes say: link-local unicast (routers do not
# forward it) and multicast (only a multicast router forwards it, and the LAN check in config
# admits only link- and organisation-scoped groups).
LINK_SCOPED = tuple(ip_network(n) for n in ("169.254.0.0/16", "224.0.0.0/4", "fe80::/10", "ff00::/8"))


def onlink_lan(ranges: Iterable[IPNetwork], onlink: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The configured LAN ranges narrowed to what is on-link: a range that is link-scoped by
    nature stays; any other keeps only its overlap with an on-link subnet (the smaller of the
    two). An off-link private destination goes through the gateway, which is the ISP's."""
    onlink = tuple(onlink)
    out: set[IPNetwork] = set()
    for lan in ranges:
        if any(network_within(lan, scoped) for scoped in LINK_SCOPED):
            out.add(lan)
            continue
        for subnet in onlink:
            if subnet.version != lan.version:
                continue
            if network_within(subnet, lan):
                out.add(subnet)
            elif network_within(lan, subnet):
                out.add(lan)
    return widest(out)


def widest(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The networks without those nested in another (an interval set refuses overlaps)."""
    kept = sorted(set(networks), key=lambda n: (n.version, n.prefixlen, int(n.network_address)))
    return tuple(n for i, n in enumerate(kept) if not any(network_within(n, k) for k in kept[:i]))
