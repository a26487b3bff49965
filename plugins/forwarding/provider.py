"""What a port-forwarding provider is: obtain a lease for a connection, renew it, release it.

A provider only talks to whoever hands the port out (a NAT-PMP gateway, a provider's API, the
configuration itself); everything around it (when to ask, retrying, expiry, judging the port,
the lock, the status) is the one driver's (``plugins.forwarding.driver``), so that each provider
gets the same behaviour and a new one is a small class (docs/architecture.md, "Where to add a
feature").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from supervisor.plugins import TunnelView


class ForwardingError(Exception):
    """Asking for, renewing or giving up a port failed; the driver retries (with backoff)."""


class NotForwardedHere(ForwardingError):
    """This connection cannot have a forwarded port (no gateway to ask): the driver does not
    retry until the next connection."""


@dataclass(frozen=True)
class Lease:
    """Ports forwarded to this host for one connection.

    ``lifetime_s`` is how long the provider keeps them without a renewal, or None for ports held
    as long as the connection lasts (a port the provider assigned once, for good). ``via`` names
    who granted them (a gateway's address), for the status."""

    ports: tuple[int, ...]
    lifetime_s: float | None
    via: str | None = None

    def __post_init__(self) -> None:
        if not self.ports:
            raise ValueError("a lease holds at least one port")

    @property
    def port(self) -> int:
        return self.ports[0]


class PortForwarder(Protocol):
    """One provider of forwarded ports. Each call may raise ``ForwardingError`` or ``OSError``;
    the driver bounds nothing but cancels a call whose connection went away meanwhile, so a
    call bounds its own waits."""

    name: str  # shown as the status' ``provider``

    async def obtain(self, tunnel: TunnelView, suggested_port: int | None) -> Lease:
        """Ports for the connection ``tunnel`` (``tunnel.session``); ``suggested_port`` is the
        port the driver would like back (a provider may ignore it)."""

    async def renew(self, tunnel: TunnelView, lease: Lease) -> Lease:
        """``lease`` again for a new lifetime; the ports may change (an ordinary change)."""

    async def release(self, tunnel: TunnelView, lease: Lease) -> None:
        """Give ``lease`` up (at stop, or when the driver refused its port)."""
