"""Which probes a leak test sends, for a configuration and the host as found (pure).

Every kind of packet a user's programs make, IPv4 and IPv6, once unbound (the routing table
decides, as for an ordinary program) and once bound to each interface that is not the tunnel
(``SO_BINDTODEVICE``, as a program that picks the physical link would). Each leaves with a hop
limit of ``PROBE_TTL``: the first router it meets discards it and answers "time exceeded", so a
probe that gets out reaches no further than a traceroute's first hop and needs no server's
cooperation to be seen (the technique of Mullvad's leak checker).

Targets, per family:

* ICMP echo, UDP and TCP SYN: the first configured server endpoint's address (where the
  tunnel's own packets go, so a probe adds no destination the host does not already use), else
  a documentation address (RFC 5737/3849), which no router forwards past the first hop anyway.
* UDP without the tunnel's fwmark to that endpoint's exact port and to another port: a lock that
  names the address but forgets the mark, or allows the whole address, lets these out.
* DNS over UDP and TCP to every resolver the host had before tunlock, to the default gateways
  (home routers answer DNS) and to the tunnel's resolvers bound outside the tunnel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TypeVar

from supervisor.servers import Endpoint, IPAddress

PROBE_TTL = 1
UDP_PORT = 33434  # traceroute's first port
TCP_PORT = 443
DNS_PORT = 53
# Where ICMP, UDP and TCP probes go when no server endpoint of the family is configured.
FALLBACK_TARGETS: dict[int, IPAddress] = {4: IPv4Address("198.51.100.1"), 6: IPv6Address("2001:db8::1")}
# What a probe carries: a marker that names the tool, nothing of the user's (a traceroute
# carries as much). DNS probes ask for the root's NS records instead.
PAYLOAD = b"tunlock-leaktest"


class Kind(StrEnum):
    ICMP = "icmp"
    UDP = "udp"
    TCP = "tcp"
    DNS_UDP = "dns-udp"
    DNS_TCP = "dns-tcp"
    ENDPOINT = "endpoint-no-mark"  # UDP to an endpoint's WireGuard port, without the fwmark
    ENDPOINT_OTHER_PORT = "endpoint-other-port"

    @property
    def transport(self) -> str:
        """``icmp``, ``udp`` or ``tcp``: the socket a probe of this kind needs."""
        if self is Kind.ICMP:
            return "icmp"
        return "tcp" if self in (Kind.TCP, Kind.DNS_TCP) else "udp"


@dataclass(frozen=True)
class Uplink:
    """An interface that is not the tunnel, up, not loopback and not a port of a bridge or bond
    (a port carries its master's traffic; the master is probed)."""

    name: str
    families: frozenset[int]  # the IP versions it has an address of (IPv6: global or link-local)


@dataclass(frozen=True)
class Gateway:
    address: IPAddress
    interface: str


@dataclass(frozen=True)
class Resolver:
    address: IPAddress
    origin: str  # where it was found: "resolv.conf saved by tunlock", "gateway", "tunnel resolver"...


@dataclass(frozen=True)
class HostFacts:
    """What a run found on the host and in the configuration."""

    tunnel_interface: str
    uplinks: tuple[Uplink, ...]
    gateways: tuple[Gateway, ...] = ()
    resolvers: tuple[Resolver, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class Probe:
    kind: Kind
    family: int
    interface: str | None  # None: unbound, the routing table decides
    target: IPAddress
    port: int  # 0 for ICMP
    about: str = ""  # what the target is, for the report
    ttl: int = PROBE_TTL

    @property
    def label(self) -> str:
        """``dns-udp 192.0.2.1:53`` and the like: the kind and where it went."""
        where = f"[{self.target}]" if self.family == 6 else str(self.target)
        return f"{self.kind} {where}" + (f":{self.port}" if self.port else "")

    @property
    def via(self) -> str:
        return self.interface or "unbound"


T = TypeVar("T")


def _dedupe(items: Iterable[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(items))


def resolvers_to_probe(
    before: Iterable[IPAddress],
    gateways: Iterable[Gateway],
    tunnel_resolvers: Iterable[IPAddress],
    before_origin: str = "before tunlock",
) -> tuple[Resolver, ...]:
    """The resolvers DNS probes go to, each once (the first origin named wins); loopback ones
    (a local stub such as systemd-resolved's 127.0.0.53) are left out: what they forward to is
    what leaves, and it is listed among ``before`` when it can be found."""
    out: dict[IPAddress, Resolver] = {}
    candidates = [
        *((a, before_origin) for a in before),
        *((g.address, "gateway") for g in gateways),
        *((a, "tunnel resolver") for a in tunnel_resolvers),
    ]
    for address, origin in candidates:
        if address.is_loopback or address.is_unspecified or address in out:
            continue
        out[address] = Resolver(address, origin)
    return tuple(out.values())


def _bindings(facts: HostFacts, family: int, target: IPAddress) -> list[str | None]:
    """Unbound and every uplink of the family; a link-local target only on its own link."""
    uplinks = [u.name for u in facts.uplinks if family in u.families]
    if target.is_link_local:
        scope = {g.interface for g in facts.gateways if g.address == target}
        return [u for u in uplinks if u in scope]
    return [None, *uplinks]


def plan_probes(facts: HostFacts) -> tuple[Probe, ...]:
    """Every probe to send for ``facts``: kind x target x (unbound, each uplink), v4 and v6.

    A family no uplink has an address of gets no probes: nothing of it can leave (the report
    says so). The tunnel is never bound to.
    """
    probes: list[Probe] = []
    for family in (4, 6):
        if not any(family in u.families for u in facts.uplinks):
            continue
        endpoint = next((e for e in facts.endpoints if e.family == family), None)
        target = endpoint.host if endpoint else FALLBACK_TARGETS[family]
        about = f"endpoint {endpoint}" if endpoint else "a documentation address"
        plain = [
            (Kind.ICMP, target, 0, about),
            (Kind.UDP, target, UDP_PORT, about),
            (Kind.TCP, target, TCP_PORT, about),
        ]
        if endpoint:
            other = endpoint.port + 1 if endpoint.port < 65535 else endpoint.port - 1
            plain += [
                (Kind.ENDPOINT, endpoint.host, endpoint.port, f"endpoint {endpoint}, no fwmark"),
                (Kind.ENDPOINT_OTHER_PORT, endpoint.host, other, f"endpoint {endpoint}'s address"),
            ]
        for resolver in facts.resolvers:
            if resolver.address.version == family:
                plain += [
                    (Kind.DNS_UDP, resolver.address, DNS_PORT, resolver.origin),
                    (Kind.DNS_TCP, resolver.address, DNS_PORT, resolver.origin),
                ]
        for kind, address, port, what in plain:
            for binding in _bindings(facts, family, address):
                probes.append(Probe(kind, family, binding, address, port, what))
    return _dedupe(probes)


def parse_resolv_conf(text: str) -> tuple[IPAddress, ...]:
    """The ``nameserver`` addresses of a resolv.conf text (a scope suffix dropped), in order."""
    out: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                out.append(ip_address(fields[1].split("%", 1)[0]))
            except ValueError:
                continue
    return _dedupe(out)
