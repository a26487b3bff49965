"""Which addresses make a subnet on-link (pure: `ip -j addr` and `ip -j route` entries in,
subnets out)."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

from supervisor.lock.onlink import onlink_subnets


def _addr(local: str, prefixlen: int, scope: str = "global") -> dict:
    return {
        "family": "inet6" if ":" in local else "inet",
        "local": local,
        "prefixlen": prefixlen,
        "scope": scope,
    }


LINKS: list[dict[str, Any]] = [
    {"ifname": "lo", "addr_info": [_addr("127.0.0.1", 8, "host"), _addr("::1", 128, "host")]},
    {
        "ifname": "eth0",
        "addr_info": [
            _addr("192.168.1.5", 24),
            _addr("2001:db8:c::2", 64),
            _addr("fe80::2", 64, "link"),
            _addr("2001:db8:d::7", 128),  # DHCPv6: a /128, on-link only itself
        ],
    },
    {"ifname": "docker0", "addr_info": [_addr("172.17.0.1", 16)]},
    {"ifname": "tunlock0", "addr_info": [_addr("10.99.0.2", 24)]},  # the tunnel's own
    {"ifname": "eth1", "addr_info": [_addr("10.200.0.9", 4), _addr("2001:db8:e::9", 48)]},  # too wide
    {"ifname": "eth2"},  # no addresses at all
]


ROUTES: list[dict[str, Any]] = [
    {"dst": "default", "gateway": "192.168.1.1", "dev": "eth0", "protocol": "dhcp"},
    {"dst": "192.168.1.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link"},
    {"dst": "2001:db8:c::/64", "dev": "eth0", "protocol": "kernel"},
    {"dst": "2001:db8:d::7", "dev": "eth0", "protocol": "kernel"},
    {"dst": "fe80::/64", "dev": "eth0", "protocol": "kernel"},
    {"dst": "2000::/3", "dev": "eth0", "protocol": "ra"},  # a rogue RA's on-link prefix
    {"dst": "172.17.0.0/16", "dev": "docker0", "protocol": "kernel", "scope": "link"},
    {"dst": "10.99.0.0/24", "dev": "tunlock0", "scope": "link"},
    {"dst": "10.200.0.0/4", "dev": "eth1"},
    {"dst": "2001:db8:e::/48", "dev": "eth1"},
    {"dst": "10.50.0.0/16", "dev": "eth2", "scope": "link"},  # a route without an address
]


def test_the_interfaces_own_prefixes_outside_the_tunnel_count():
    assert onlink_subnets(LINKS, ROUTES, exclude=("tunlock0",)) == tuple(
        ip_network(n)
        for n in ("172.17.0.0/16", "192.168.1.0/24", "2001:db8:c::/64", "2001:db8:d::7/128", "fe80::/64")
    )


def test_a_prefix_wider_than_a_sane_length_is_not_on_link():
    """A hostile DHCP netmask or a wide static prefix does not make half the space LAN."""
    subnets = onlink_subnets(LINKS, ROUTES, exclude=("tunlock0",))
    assert not any(n.prefixlen < 8 for n in subnets if n.version == 4)
    assert not any(n.prefixlen < 64 for n in subnets if n.version == 6)


def test_a_prefix_the_main_table_routes_through_the_gateway_is_not_on_link():
    """An address added with noprefixroute, or whose prefix route is gone: its subnet goes to
    the gateway, which is the ISP's."""
    without_prefix_route = [r for r in ROUTES if r["dst"] != "192.168.1.0/24"]
    assert ip_network("192.168.1.0/24") not in onlink_subnets(LINKS, without_prefix_route)


def test_a_wide_route_on_the_same_link_still_reaches_the_address_prefix():
    only_wide = [{"dst": "2000::/3", "dev": "eth0", "protocol": "ra"}]
    assert onlink_subnets(LINKS, only_wide) == tuple(
        ip_network(n) for n in ("2001:db8:c::/64", "2001:db8:d::7/128")
    )


def test_no_addresses_means_nothing_on_link():
    assert onlink_subnets([], ROUTES, exclude=("tunlock0",)) == ()
