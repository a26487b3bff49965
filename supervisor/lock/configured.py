"""Where the configuration meets the lock: the ``LockPolicy`` a ``Config`` describes.

Kept apart from ``supervisor.lock.policy`` so that the policy and its renderer stay plain data
and pure functions that import without the configuration stack (msgspec, the loader).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_network

from supervisor.config import Config
from supervisor.lock.policy import LockPolicy
from supervisor.net.routing_plan import configured_targets
from supervisor.servers import Server


def policy_from_config(config: Config, servers: Iterable[Server] | None = None) -> LockPolicy:
    """The lock for ``config``, letting the tunnel reach ``servers`` (default: every server).

    The daemon narrows it to the server it is connecting to; ``tunlock lock apply`` and the
    boot file allow every configured server so that any of them can be reached at start.
    """
    settings = config.settings
    chosen = config.servers if servers is None else tuple(servers)
    admin_tcp, admin_sources = ui_admission(config)
    return LockPolicy(
        table=settings.lock.table,
        tunnel_interface=settings.tunnel.interface,
        fwmark=settings.tunnel.fwmark,
        allow_lan=settings.lock.allow_lan,
        lan_ranges=tuple(settings.lock.lan_ranges),
        inbound_tcp=tuple(settings.lock.inbound_tcp),
        admin_tcp=admin_tcp,
        admin_sources=admin_sources,
        uplinks=tuple(settings.lock.uplinks),
        tunnel_inbound=frozenset(
            [("tcp", p) for p in settings.lock.tunnel_inbound_tcp]
            + [("udp", p) for p in settings.lock.tunnel_inbound_udp]
        ),
        tunnel_targets=frozenset(configured_targets(settings)),
    ).with_servers(chosen)


def ui_admission(config: Config) -> tuple[tuple[int, ...], tuple[IPv4Network | IPv6Network, ...]]:
    """``lock.admin_tcp`` and ``lock.admin_sources`` as the lock takes them.

    Namespace mode with ``namespace.ui_tcp``: inside the namespace the web UIs' veth is the one
    non-tunnel interface, and the administrator's path is exactly what it needs (connections
    opened from outside to those ports, and their replies, nothing this side opens); its sources
    are the host's end of the pair only, so the LAN comes in through the host (docs/namespace.md).
    """
    lock, ui = config.settings.lock, config.settings.namespace
    if config.settings.tunnel.namespace is None or not ui.ui_tcp:
        return tuple(lock.admin_tcp), tuple(lock.admin_sources)
    ports = tuple(sorted({*lock.admin_tcp, *ui.ui_tcp}))
    host_end = ip_network(f"{ui.ui_ends[0]}/32")
    return ports, (*lock.admin_sources, host_end)
