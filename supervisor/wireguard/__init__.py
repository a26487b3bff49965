"""WireGuard for the supervisor: two backends behind one interface, and the tunnel around them.

The runtime uses :func:`open_tunnel` and :class:`Tunnel` (``supervisor.wireguard.tunnel``);
the backends (``kernel``: generic netlink; ``userspace``: wireguard-go over its UAPI socket)
implement :class:`WireGuardBackend` (``supervisor.wireguard.backend``).
"""

from supervisor.wireguard.backend import (
    BackendDied,
    BackendError,
    BackendEvent,
    BackendRestarted,
    BackendRestartFailed,
    InterfaceTaken,
    TunnelStats,
    WireGuardBackend,
)
from supervisor.wireguard.tunnel import Tunnel, TunnelSettings, open_tunnel

__all__ = [
    "BackendDied",
    "BackendError",
    "BackendEvent",
    "BackendRestartFailed",
    "BackendRestarted",
    "InterfaceTaken",
    "Tunnel",
    "TunnelSettings",
    "TunnelStats",
    "WireGuardBackend",
    "open_tunnel",
]
