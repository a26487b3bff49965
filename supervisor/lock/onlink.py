"""The subnets the host reaches without a gateway: read from the kernel when the lock is applied.

"LAN" in the lock means on-link (supervisor.lock.render.onlink_lan): a private
destination routed through the gateway goes to the ISP, so the configured LAN
ranges count only where they overlap a subnet some interface reaches directly.
nftables cannot compare a packet's next hop with its destination at packet
time (``rt nexthop`` compares only with constants), so the subnets are read
here, from the main routing table, each time the lock is applied.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from ipaddress import ip_network

from supervisor.servers import IPNetwork

_TIMEOUT_S = 5.0


def onlink_subnets(routes: Iterable[dict], exclude: Iterable[str] = ()) -> tuple[IPNetwork, ...]:
    """Subnets of ``ip -j route`` entries that have no gateway (pure: routes in, subnets out).

    Routes through ``exclude`` (the tunnel) and loopback, default routes, multipath routes and
    anything but unicast (blackhole, unreachable, local...) are left out.
    """
    skip = {"lo", *exclude}
    out: list[IPNetwork] = []
    for route in routes:
        dst = route.get("dst", "")
        if (
            route.get("type", "unicast") != "unicast"
            or "gateway" in route
            or "via" in route
            or "nexthops" in route
            or not route.get("dev")
            or route["dev"] in skip
            or dst in ("default", "")
        ):
            continue
        try:
            out.append(ip_network(dst, strict=False))
        except ValueError:
            continue
    return tuple(sorted(set(out), key=lambda n: (n.version, n.network_address, n.prefixlen)))


def read_onlink(exclude: Iterable[str] = ()) -> tuple[IPNetwork, ...]:
    """The on-link subnets of this network namespace's main table, IPv4 and IPv6."""
    routes: list[dict] = []
    for family in ("-4", "-6"):
        try:
            done = subprocess.run(
                ["ip", "-j", family, "route", "show", "table", "main"],
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue  # no routes known: the LAN stays closed, link-local aside (fails closed)
        if done.returncode == 0 and done.stdout.strip():
            try:
                routes.extend(json.loads(done.stdout))
            except json.JSONDecodeError:
                continue
    return onlink_subnets(routes, exclude)
