"""Which addresses make a subnet on-link (pure: `ip -j addr` entries in, subnets out)."""

from __future__ import annotations

from ipaddress import ip_network

from supervisor.lock.onlink import onlink_subnets


def _addr(local: str, prefixlen: int, scope: str = "global") -> dict:
    return {
        "family": "inet6" if ":" in local else "inet",
        "local": local,
        "prefixlen": prefixlen,
        "scope": scope,
    }


LINKS = [
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


def test_the_interfaces_own_prefixes_outside_the_tunnel_count():
    assert onlink_subnets(LINKS, exclude=("tunlock0",)) == tuple(
        ip_network(n)
        for n in ("172.17.0.0/16", "192.168.1.0/24", "2001:db8:c::/64", "2001:db8:d::7/128", "fe80::/64")
    )


def test_a_prefix_wider_than_a_sane_length_is_not_on_link():
    """A hostile DHCP netmask or a wide static prefix does not make half the space LAN."""
    subnets = onlink_subnets(LINKS, exclude=("tunlock0",))
    assert not any(n.prefixlen < 8 for n in subnets if n.version == 4)
    assert not any(n.prefixlen < 64 for n in subnets if n.version == 6)


def test_no_addresses_means_nothing_on_link():
    assert onlink_subnets([], exclude=("tunlock0",)) == ()
