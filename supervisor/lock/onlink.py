"""The subnets the host reaches without a gateway: read from the kernel when the lock is applied.

"LAN" in the lock means on-link (supervisor.lock.render.onlink_lan): a private
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
address space LAN either. A subnet reached only through a route without an
address on it (rare) is not on-link for the lock: it stays closed (fails closed).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from ipaddress import ip_interface

from supervisor.servers import IPNetwork

_TIMEOUT_S = 5.0
# The widest prefix of an address that still makes its subnet on-link, per IP version.
MIN_PREFIXLEN = {4: 8, 6: 64}


def onlink_subnets(links: Iterable[dict], exclude: Iterable[str] = ()) -> tuple[IPNetwork, ...]:
    """Subnets of the addresses in ``ip -j addr`` entries (pure: links in, subnets out).

    Addresses on ``exclude`` (the tunnel) and loopback, of host scope, or with a prefix wider
    than ``MIN_PREFIXLEN`` are left out.
    """
    skip = {"lo", *exclude}
    out: set[IPNetwork] = set()
    for link in links:
        if link.get("ifname") in skip:
            continue
        for addr in link.get("addr_info", ()):
            if addr.get("scope") == "host" or "local" not in addr or "prefixlen" not in addr:
                continue
            try:
                network = ip_interface(f"{addr['local']}/{addr['prefixlen']}").network
            except ValueError:
                continue
            if network.prefixlen >= MIN_PREFIXLEN[network.version]:
                out.add(network)
    return tuple(sorted(out, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def read_onlink(exclude: Iterable[str] = ()) -> tuple[IPNetwork, ...]:
    """The on-link subnets of this network namespace's interfaces, IPv4 and IPv6."""
    try:
        done = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()  # nothing known: the LAN stays closed, link-local aside (fails closed)
    if done.returncode != 0 or not done.stdout.strip():
        return ()
    try:
        links = json.loads(done.stdout)
    except json.JSONDecodeError:
        return ()
    return onlink_subnets(links, exclude)
