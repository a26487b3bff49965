"""Where the configuration meets the lock: the ``LockPolicy`` a ``Config`` describes.

Kept apart from ``supervisor.lock.policy`` so that the policy and its renderer stay plain data
and pure functions that import without the configuration stack (pydantic, the loader).
"""

from __future__ import annotations

from collections.abc import Iterable

from supervisor.config import Config
from supervisor.lock.policy import LockPolicy
from supervisor.servers import Server


def policy_from_config(config: Config, servers: Iterable[Server] | None = None) -> LockPolicy:
    """The lock for ``config``, letting the tunnel reach ``servers`` (default: every server).

    The daemon narrows it to the server it is connecting to; ``tunlock lock apply`` and the
    boot file allow every configured server so that any of them can be reached at start.
    """
    settings = config.settings
    chosen = config.servers if servers is None else tuple(servers)
    return LockPolicy(
        table=settings.lock.table,
        tunnel_interface=settings.tunnel.interface,
        fwmark=settings.tunnel.fwmark,
        allow_lan=settings.lock.allow_lan,
        lan_ranges=tuple(settings.lock.lan_ranges),
        inbound_tcp=tuple(settings.lock.inbound_tcp),
        uplinks=tuple(settings.lock.uplinks),
        tunnel_inbound=frozenset(
            [("tcp", p) for p in settings.lock.tunnel_inbound_tcp]
            + [("udp", p) for p in settings.lock.tunnel_inbound_udp]
        ),
    ).with_servers(chosen)
