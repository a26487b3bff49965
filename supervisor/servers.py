"""WireGuard servers as plain, frozen, validated data: what the lock, net and wireguard see.

Reading them from wg-quick files is supervisor.wgquick's work; this module imports nothing of it.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

from msgspec import Struct

from supervisor.redact import Secret

IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network


def network_within(inner: IPNetwork, outer: IPNetwork) -> bool:
    """Whether ``inner`` lies inside ``outer``; never across IP versions (where ipaddress raises)."""
    if isinstance(inner, IPv4Network) and isinstance(outer, IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, IPv6Network) and isinstance(outer, IPv6Network):
        return inner.subnet_of(outer)
    return False


class Endpoint(Struct, frozen=True):
    """A server's UDP endpoint: always a literal IP (a hostname would need DNS outside the tunnel)."""

    host: IPAddress
    port: int

    @property
    def family(self) -> int:
        return self.host.version

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.host.version == 6 else f"{self.host}:{self.port}"


class Peer(Struct, frozen=True):
    public_key: str
    endpoint: Endpoint
    allowed_ips: tuple[IPNetwork, ...]
    preshared_key: Secret | None = None
    persistent_keepalive: int | None = None


class Server(Struct, frozen=True):
    """One VPN server: our interface settings for it and its single peer."""

    name: str
    path: Path
    private_key: Secret
    addresses: tuple[IPInterface, ...]
    peer: Peer
    dns: tuple[IPAddress, ...] = ()
    mtu: int | None = None
    listen_port: int | None = None

    @property
    def endpoint(self) -> Endpoint:
        return self.peer.endpoint

    @property
    def families(self) -> frozenset[int]:
        """IP versions this server carries inside the tunnel."""
        return frozenset(a.version for a in self.addresses)
