"""The one small interface every WireGuard backend implements, and what it reports.

Two backends sit behind it: the kernel's WireGuard over generic netlink
(``supervisor.wireguard.kernel``) and wireguard-go over its UAPI socket
(``supervisor.wireguard.userspace``). They differ in how the interface comes to
exist (a ``wireguard`` link versus a process that creates a TUN device) and in
what can die (a process can; a kernel link can only be deleted), so both speak
in the same plain values: a :class:`DeviceConfig` goes in, :class:`TunnelStats`
come out, and :class:`BackendEvent` values report what happened on their own.

A peer swap is one atomic operation on the existing interface: the private key,
``replace_peers`` and the new peer travel in a single UAPI ``set`` or a single
netlink message, so there is no instant with no peer or with two.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from msgspec import Struct

from supervisor.errors import TunlockError
from supervisor.redact import Secret
from supervisor.servers import Endpoint, Peer, Server


class BackendError(TunlockError):
    """A WireGuard backend could not do what was asked; the message says why (never a key)."""


class InterfaceTaken(BackendError):
    """The interface name is in use by something this backend cannot adopt."""


class DeviceConfig(Struct, frozen=True):
    """Everything the backend sets on the interface for one server (one ``set``, atomically)."""

    private_key: Secret
    fwmark: int
    peer: Peer
    listen_port: int | None = None

    @classmethod
    def for_server(cls, server: Server, fwmark: int) -> DeviceConfig:
        """The device settings that connect to ``server``, marking WireGuard's own UDP with ``fwmark``."""
        return cls(
            private_key=server.private_key,
            fwmark=fwmark,
            listen_port=server.listen_port,
            peer=server.peer,
        )


class TunnelStats(Struct, frozen=True):
    """One cheap reading of the tunnel (one UAPI ``get`` or one netlink dump).

    ``last_handshake`` is wall-clock time (what both WireGuards report); ``handshake_age_s`` is
    its age when read, or None when no handshake ever completed with this peer. The counters
    reset when the peer is replaced or the backend restarts.
    """

    public_key: str | None
    endpoint: Endpoint | None
    last_handshake: float | None
    handshake_age_s: float | None
    rx_bytes: int
    tx_bytes: int
    listen_port: int | None = None
    fwmark: int | None = None

    @classmethod
    def no_peer(cls, listen_port: int | None = None, fwmark: int | None = None) -> TunnelStats:
        return cls(None, None, None, None, 0, 0, listen_port, fwmark)


def handshake_age(last_handshake: float | None, now: float | None = None) -> float | None:
    """Seconds since ``last_handshake`` (never negative), or None when there was none."""
    if last_handshake is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, now - last_handshake)


# --- what a backend reports on its own -------------------------------------------------------


class BackendDied(Struct, frozen=True):
    """The backend stopped serving the interface (wireguard-go exited); a restart follows."""

    ifname: str
    reason: str


class BackendRestarted(Struct, frozen=True):
    """The backend serves the interface again with the last configuration re-applied.

    The interface is new: its addresses and routes must be set again, counters start at zero.
    """

    ifname: str


class BackendRestartFailed(Struct, frozen=True):
    """One attempt to restart the backend failed; it tries again after a growing pause."""

    ifname: str
    reason: str
    attempt: int


BackendEvent = BackendDied | BackendRestarted | BackendRestartFailed
Report = Callable[[BackendEvent], Awaitable[None]]


async def ignore_events(_event: BackendEvent) -> None:
    """A report callback for callers that do not care (tools, tests)."""


class WireGuardBackend(Protocol):
    """What the tunnel needs from a WireGuard implementation.

    A backend lives inside the ``async with`` of the function that opens it
    (``supervisor.wireguard.selection.open_backend``): its tasks (one that reads wireguard-go's
    output and restarts it) run there; leaving it stops watching but leaves the interface as it
    is, exactly as a crash would; :meth:`close` is the explicit teardown.
    """

    kind: str
    ifname: str

    async def adopt(self) -> bool:
        """Take over an interface that already exists and is served; True when there was one.

        Nothing is changed: the peer keeps running. Raises InterfaceTaken when the name is used
        by something this backend does not drive (another kind of link, another namespace).
        """
        ...

    async def ensure_interface(self) -> bool:
        """Make the interface exist (adopting one that does); True when it was created now."""
        ...

    async def configure(self, config: DeviceConfig) -> None:
        """Set key, fwmark, listen port and replace all peers by ``config.peer``, atomically."""
        ...

    async def remove_peer(self) -> None:
        """Remove every peer: the interface stays, nothing passes through it."""
        ...

    async def stats(self) -> TunnelStats:
        """The tunnel's current peer, handshake and counters, in one cheap read."""
        ...

    async def close(self, keep_interface: bool) -> None:
        """Stop driving the interface; delete it (and stop wireguard-go) unless ``keep_interface``."""
        ...
