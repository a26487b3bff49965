"""WireGuard servers as plain data, read from wg-quick files (one server per file).

The loader (``load_servers``) lives beside the data types so that the
normalisation of wgconfig's quirks (a value or a list, strings for ints) sits in
one place; everything downstream sees only these frozen, validated values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path

from supervisor.redact import Secret

IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, order=True)
class Endpoint:
    """A server's UDP endpoint: always a literal IP (a hostname would need DNS outside the tunnel)."""

    host: IPAddress
    port: int

    @property
    def family(self) -> int:
        return self.host.version

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.host.version == 6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Peer:
    public_key: str
    endpoint: Endpoint
    allowed_ips: tuple[IPNetwork, ...]
    preshared_key: Secret | None = None
    persistent_keepalive: int | None = None


@dataclass(frozen=True)
class Server:
    """One VPN server: our interface settings for it and its single peer."""

    name: str
    path: Path
    private_key: Secret
    addresses: tuple[IPInterface, ...]
    peer: Peer
    dns: tuple[IPAddress, ...] = ()
    mtu: int | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    source_lines: dict[str, int] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def endpoint(self) -> Endpoint:
        return self.peer.endpoint

    @property
    def families(self) -> frozenset[int]:
        """IP versions this server carries inside the tunnel."""
        return frozenset(a.version for a in self.addresses)
