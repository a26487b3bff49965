"""Which routes make a subnet on-link (pure: `ip -j route` entries in, subnets out)."""

from __future__ import annotations

from ipaddress import ip_network

from supervisor.lock.onlink import onlink_subnets

ROUTES = [
    {"dst": "default", "gateway": "192.168.1.1", "dev": "eth0", "protocol": "dhcp"},
    {"dst": "192.168.1.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link", "prefsrc": "192.168.1.5"},
    {"dst": "10.9.0.0/16", "gateway": "192.168.1.254", "dev": "eth0"},  # through a gateway
    {"dst": "172.17.0.0/16", "dev": "docker0", "protocol": "kernel", "scope": "link"},
    {"dst": "10.99.0.0/24", "dev": "tunlock0", "scope": "link"},  # the tunnel's own
    {"dst": "10.8.0.0/16", "nexthops": [{"gateway": "192.168.1.2", "dev": "eth0"}]},
    {"type": "blackhole", "dst": "10.66.0.0/16"},
    {"type": "unreachable", "dst": "10.67.0.0/16", "dev": "lo"},
    {"dst": "2001:db8:c::/64", "dev": "eth0", "protocol": "kernel", "metric": 256},
    {"dst": "fe80::/64", "dev": "eth0", "protocol": "kernel", "metric": 256},
    {"dst": "default", "gateway": "fe80::1", "dev": "eth0", "protocol": "ra"},
]


def test_only_routes_without_a_gateway_outside_the_tunnel_count():
    assert onlink_subnets(ROUTES, exclude=("tunlock0",)) == tuple(
        ip_network(n) for n in ("172.17.0.0/16", "192.168.1.0/24", "2001:db8:c::/64", "fe80::/64")
    )


def test_no_routes_means_nothing_on_link():
    assert onlink_subnets([], exclude=("tunlock0",)) == ()
