"""WireGuard for the supervisor: two backends behind one interface, and the tunnel around them.

The runtime uses :func:`open_tunnel` and :class:`Tunnel` (``supervisor.wireguard.tunnel``);
the backends (``kernel``: generic netlink; ``userspace``: wireguard-go over its UAPI socket)
implement :class:`WireGuardBackend` (``supervisor.wireguard.backend``).

The names below load on first use (PEP 562): ``tunlock run`` starts wireguard-go through
``supervisor.wireguard.userspace`` while the tunnel's routing code (pyroute2) is still being
imported (supervisor/early_tunnel.py), which an eager import of ``tunnel`` here would serialise.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_WHERE = {
    "BackendDied": "backend",
    "BackendError": "backend",
    "BackendEvent": "backend",
    "BackendRestartFailed": "backend",
    "BackendRestarted": "backend",
    "InterfaceTaken": "backend",
    "TunnelStats": "backend",
    "WireGuardBackend": "backend",
    "Tunnel": "tunnel",
    "TunnelSettings": "tunnel",
    "open_tunnel": "tunnel",
}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
