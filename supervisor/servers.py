"""WireGuard servers as plain data, read from wg-quick files (one server per file).

The loader (``load_servers``) lives beside the data types so that the
normalisation of wgconfig's quirks (a value or a list, strings for ints) sits in
one place; everything downstream sees only these frozen, validated values.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import glob
import multiprocessing as mp
import os
import re
import socket
import stat
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_network,
)
from pathlib import Path
from typing import NamedTuple

from wgconfig import WGConfig

from supervisor.errors import ConfigError, Problem
from supervisor.redact import Secret

IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True)
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


# --- reading wg-quick files -------------------------------------------------------------------

# wg-quick reads keys case-insensitively; these are the ones a server file may hold.
_INTERFACE_KEYS = {k.lower(): k for k in ("PrivateKey", "Address", "DNS", "MTU", "ListenPort")}
_PEER_KEYS = {
    k.lower(): k for k in ("PublicKey", "PresharedKey", "Endpoint", "AllowedIPs", "PersistentKeepalive")
}
# Provider files often carry these; tunlock never executes or applies them (hooks would run
# arbitrary commands as root; tunlock does its own routing and fwmark), it says so and goes on.
_IGNORED_KEYS = {
    k.lower(): k for k in ("PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig", "Table", "FwMark")
}
# wg-quick lets these be split over several lines; any other key twice is a mistake.
_REPEATABLE_KEYS = frozenset({"address", "dns", "allowedips"} | set(_IGNORED_KEYS))
_HOSTNAME = re.compile(r"^[A-Za-z0-9.-]+$")


# Parsing addresses is most of what checking a server file costs (ipaddress parses strings
# slowly); inet_pton does it in C, and a provider's files share most values (client address,
# DNS, AllowedIPs), so a cache spares the rest. Each raises ValueError like ipaddress does.
@functools.lru_cache(maxsize=16384)
def parse_address(text: str) -> IPAddress:
    """An IPv4 or IPv6 address, strictly (no zone, no leading zeros)."""
    try:
        if ":" in text:
            return IPv6Address(socket.inet_pton(socket.AF_INET6, text))
        return IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        raise ValueError(f"{text!r} is not an IP address") from None


@functools.lru_cache(maxsize=16384)
def parse_interface(text: str) -> IPInterface:
    """``address/prefix`` as an interface address (the host bits may be set)."""
    address, slash, prefix = text.partition("/")
    host = parse_address(address)
    if not slash:
        prefix = str(host.max_prefixlen)
    if not prefix.isdigit() or int(prefix) > host.max_prefixlen:
        raise ValueError(f"{text!r} has a bad prefix length")
    # The family's own class: ipaddress.ip_interface tries IPv4 first and formats an error
    # message for every IPv6 address, which costs more than the parse.
    kind = IPv6Interface if host.version == 6 else IPv4Interface
    return kind((int(host), int(prefix)))  # an int: from an object it would reparse its str()


@functools.lru_cache(maxsize=4096)
def parse_network(text: str) -> IPNetwork:
    """A network such as ``0.0.0.0/0``; host bits are cleared as wg does."""
    return ip_network(text, strict=False)


def _key_problem(value: str) -> str | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "is not base64"
    if len(raw) != 32 or len(value) != 44:
        return f"is {len(raw)} bytes, a WireGuard key is 32 bytes (44 base64 characters)"
    if base64.b64encode(raw).decode() != value:
        # Non-canonical trailing bits: what a typo in the last characters looks like.
        return "is not a canonical base64 WireGuard key (a typo near its end?)"
    return None


def _as_list(value: object) -> list[str]:
    """wgconfig gives a value, a list of values, or an int: always hand back a list of strings."""
    items = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def parse_endpoint(text: str) -> Endpoint:
    """``IP:port`` or ``[IPv6]:port``; raise ValueError with a reason a person can act on."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"endpoint {text!r} must be [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"endpoint {text!r} has no port: use IP:port or [IPv6]:port")
        if ":" in host:
            raise ValueError(f"endpoint {text!r}: put an IPv6 address in brackets, [IPv6]:port")
    try:
        address = parse_address(host)
    except ValueError:
        if _HOSTNAME.match(host):
            raise ValueError(
                f"endpoint host {host!r} is a name, not an IP address: resolving it would need DNS "
                "outside the tunnel, which the lock forbids; write the server's IP address instead"
            ) from None
        raise ValueError(f"endpoint host {host!r} is not an IP address") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"endpoint port {port!r} must be a number from 1 to 65535")
    return Endpoint(address, int(port))


class _ServerReader:
    """Turns one wg-quick file into a Server, collecting every problem with its line."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        self.errors = 0
        self.lines: dict[tuple[int, str], int] = {}
        self.headers: list[tuple[str, int]] = []

    def error(self, line: int, message: str) -> None:
        self.errors += 1
        self.problems.append(Problem(self.path, line, message))

    def warn(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message, warning=True))

    def read(self, text: str) -> Server | None:
        # wg-quick treats every '#' line as a comment; wgconfig revives '#! ' lines as "disabled"
        # entries, so comments are blanked first (keeping the line numbers).
        lines = ["" if ln.lstrip().startswith("#") else ln.rstrip() for ln in text.splitlines()]
        sections = self._index(lines)
        if sections is None:
            return None
        # wgconfig files peers under their PublicKey value, which breaks on a malformed key (a
        # comma makes it a list); peers are counted from the headers above, so key them by nothing.
        wg = WGConfig(keyattr="_unused")
        wg.lines = lines
        try:
            wg.parse_lines()
        except ValueError as err:
            self.error(0, str(err))
            return None
        interface = {k: v for k, v in wg.interface.items() if not k.startswith("_")}
        peers = [{k: v for k, v in p.items() if not k.startswith("_")} for p in wg.peers.values()]
        peer_headers = [line for name, line in self.headers if name == "peer"]
        if len(peer_headers) != 1:
            where = peer_headers[1] if len(peer_headers) > 1 else 0
            self.error(where, f"a server file holds exactly one [Peer], found {len(peer_headers)}")
        if "interface" not in sections:
            self.error(1, "no [Interface] section")
            return None
        iface = self._section(sections.index("interface"), interface, _INTERFACE_KEYS)
        if len(peer_headers) != 1:
            self._interface_fields(iface)  # still report what is wrong in [Interface]
            return None
        peer = self._section(sections.index("peer"), peers[0] if peers else {}, _PEER_KEYS)
        return self._build(iface, peer, sections)

    def _index(self, lines: list[str]) -> list[str] | None:
        """Record the line of every key per section ordinal; refuse what is no key = value."""
        sections: list[str] = []
        for number, line in enumerate(lines, start=1):
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith("["):
                name = stripped[1:].partition("]")[0].strip().lower()
                if name not in ("interface", "peer") or not stripped.endswith("]"):
                    self.error(number, f"unknown section {stripped!r}: only [Interface] and [Peer]")
                    return None
                if name == "interface" and "interface" in sections:
                    self.error(number, "a second [Interface] section")
                    return None
                sections.append(name)
                self.headers.append((name, number))
                continue
            key, eq, _value = stripped.partition("=")
            if not eq or not key.strip():
                self.error(number, f"expected 'Key = value', found {stripped[:40]!r}")
                return None
            if not sections:
                self.error(number, "a key before any [Interface] or [Peer] section")
                return None
            if sections[-1] == "peer" and sections.count("peer") > 1:
                continue
            slot = (len(sections) - 1, key.strip().lower())
            if slot in self.lines and slot[1] not in _REPEATABLE_KEYS:
                self.error(number, f"{key.strip()} is given twice (first at line {self.lines[slot]})")
                return None
            self.lines.setdefault(slot, number)
        if not sections:
            self.error(0, "empty: no [Interface] and [Peer] sections")
            return None
        return sections

    def _header_line(self, where: str) -> int:
        name = where.strip("[]").lower()
        return next((line for n, line in self.headers if n == name), 0)

    def _section(self, ordinal: int, data: dict, known: dict[str, str]) -> dict[str, tuple[object, int]]:
        """Keys lower-cased with their line; unknown keys refused, ignored ones warned about."""
        found: dict[str, tuple[object, int]] = {}
        for key, value in data.items():
            lower = key.lower()
            line = self.lines.get((ordinal, lower), 0)
            if lower in known:
                if lower in found:  # wgconfig keeps 'Address' and 'address' apart; wg-quick doesn't
                    earlier, first_line = found[lower]
                    value = _as_list(earlier) + _as_list(value)
                    line = min(line, first_line)
                found[lower] = (value, line)
            elif lower in _IGNORED_KEYS:
                self.warn(
                    line,
                    f"{_IGNORED_KEYS[lower]} is ignored: tunlock never runs hooks "
                    "and does its own routing and firewall marking",
                )
            else:
                hint = difflib.get_close_matches(lower, list(known), n=1)
                more = f" (did you mean {known[hint[0]]}?)" if hint else ""
                self.error(line, f"unknown key {key!r}{more}")
        return found

    def _required(
        self, section: dict[str, tuple[object, int]], key: str, where: str
    ) -> tuple[str, int] | None:
        if key.lower() not in section:
            self.error(self._header_line(where), f"{where} has no {key}")
            return None
        value, line = section[key.lower()]
        items = _as_list(value)
        if len(items) != 1:
            self.error(line, f"{key} takes exactly one value")
            return None
        return items[0], line

    def _int(self, section: dict[str, tuple[object, int]], key: str, low: int, high: int) -> int | None:
        if key.lower() not in section:
            return None
        value, line = section[key.lower()]
        items = _as_list(value)
        if key == "PersistentKeepalive" and items == ["off"]:
            return 0
        if len(items) != 1 or not items[0].isdigit() or not low <= int(items[0]) <= high:
            self.error(line, f"{key} must be a whole number from {low} to {high}")
            return None
        return int(items[0])

    def _interface_fields(self, iface: dict) -> tuple:
        return (
            self._key(iface, "PrivateKey", "[Interface]"),
            self._networks(iface, "Address", interface=True, required=True),
            self._dns(iface),
            self._int(iface, "MTU", 1280, 9000),
            self._int(iface, "ListenPort", 1, 65535),
        )

    def _build(self, iface: dict, peer: dict, sections: list[str]) -> Server | None:
        private_key, addresses, dns, mtu, listen_port = self._interface_fields(iface)
        public_key = self._key(peer, "PublicKey", "[Peer]")
        preshared: Secret | None = None
        if "presharedkey" in peer:
            psk = self._key(peer, "PresharedKey", "[Peer]")
            preshared = Secret(psk) if psk else None
        allowed = self._networks(peer, "AllowedIPs", interface=False, required=True)
        keepalive = self._int(peer, "PersistentKeepalive", 0, 65535)
        endpoint = None
        found = self._required(peer, "Endpoint", "[Peer]")
        if found:
            try:
                endpoint = parse_endpoint(found[0])
            except ValueError as err:
                self.error(found[1], str(err))
        if self.errors or private_key is None or public_key is None or endpoint is None:
            return None
        if allowed and not any(n.prefixlen == 0 for n in allowed):
            self.warn(
                self.lines.get((sections.index("peer"), "allowedips"), 0),
                "AllowedIPs has no 0.0.0.0/0 or ::/0: traffic outside it is blocked by the lock, "
                "not routed around the tunnel",
            )
        return Server(
            name=self.path.stem,
            path=self.path,
            private_key=Secret(private_key),
            addresses=tuple(addresses),  # type: ignore[arg-type]
            peer=Peer(
                public_key=public_key,
                endpoint=endpoint,
                allowed_ips=tuple(allowed),  # type: ignore[arg-type]
                preshared_key=preshared,
                persistent_keepalive=keepalive or None,
            ),
            dns=tuple(dns),
            mtu=mtu,
            listen_port=listen_port,
        )

    def _key(self, section: dict, key: str, where: str) -> str | None:
        found = self._required(section, key, where)
        if not found:
            return None
        value, line = found
        problem = _key_problem(value)
        if problem:
            # Never echo the value: it may be a private key with a typo.
            self.error(line, f"{key} {problem}")
            return None
        return value

    def _networks(self, section: dict, key: str, *, interface: bool, required: bool) -> list:
        if key.lower() not in section:
            if required:
                where = "[Interface]" if interface else "[Peer]"
                self.error(self._header_line(where), f"{where} has no {key}")
            return []
        value, line = section[key.lower()]
        out = []
        for item in _as_list(value):
            try:
                out.append(parse_interface(item) if interface else parse_network(item))
            except ValueError:
                self.error(
                    line, f"{key} entry {item!r} is not an IP address with a prefix (e.g. 10.0.0.2/32)"
                )
        if required and not out and not self.errors:
            self.error(line, f"{key} is empty")
        return out

    def _dns(self, iface: dict) -> list:
        if "dns" not in iface:
            self.warn(
                self._header_line("[Interface]"),
                "no DNS: the lock lets DNS reach only the tunnel's resolvers, so with none "
                "no name will resolve",
            )
            return []
        value, line = iface["dns"]
        out = []
        for item in _as_list(value):
            try:
                out.append(parse_address(item))
            except ValueError:
                self.warn(line, f"DNS entry {item!r} is not an IP address (a search domain?); ignored")
        return out


def read_server(path: Path, problems: list[Problem]) -> Server | None:
    """Read one server file, appending every problem (errors and warnings) to ``problems``."""
    reader = _ServerReader(path, problems)
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            text = handle.read().decode("utf-8")
    except UnicodeDecodeError:
        reader.error(0, "not UTF-8 text")
        return None
    except OSError as err:
        reader.error(0, f"cannot read: {err.strerror or err}")
        return None
    server = reader.read(text)
    if server is not None and st.st_mode & 0o077:
        reader.warn(
            0,
            f"holds a private key but is readable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it",
        )
    return server


def load_server(path: Path) -> Server:
    """Read one server file; raise ConfigError with every problem found."""
    problems: list[Problem] = []
    server = read_server(path, problems)
    if server is None:
        raise ConfigError(problems)
    return server


def load_servers(
    patterns: list[str],
    base: Path,
    problems: list[Problem],
    origin: tuple[Path, int],
    *,
    digest_only: bool = False,
) -> tuple[Server, ...] | tuple[ServerDigest, ...]:
    """Every server file the glob ``patterns`` name (relative to ``base``), sorted by name.

    Problems are appended; ``origin`` (the config file and line of the ``servers`` key) is where
    a pattern that matches nothing is reported. With ``digest_only`` (``tunlock check``), only a
    digest of each server comes back, which lets thousands of files be read in parallel.
    """
    paths: list[Path] = []
    for pattern in patterns:
        # Sorted as strings (Path comparison is slow at 10,000 files); a directory that matches
        # is reported by read_server as unreadable.
        matched = [Path(p) for p in sorted(glob.glob(str(base / pattern)))]
        if not matched:
            problems.append(Problem(origin[0], origin[1], f"servers pattern {pattern!r} matches no file"))
        paths.extend(matched)
    servers: list = []
    seen: dict[str, Path] = {}
    unique = list(dict.fromkeys(paths))
    for path, (server, found) in zip(unique, _read_many(unique, digest_only), strict=True):
        problems.extend(found)
        if server is None:
            continue
        if server.name in seen:
            problems.append(Problem(path, 0, f"server name {server.name!r} is taken by {seen[server.name]}"))
            continue
        seen[server.name] = path
        servers.append(server)
    return tuple(servers)


# Reading is CPU-bound (about 0.1-0.2 ms a file), so `tunlock check` reads a provider directory
# of thousands of files with one forked worker per core. Full Server objects are not sent back:
# unpickling ipaddress values re-parses them, which costs more than the pool saves.
PARALLEL_FROM_FILES = 1500


class ServerDigest(NamedTuple):
    """What ``tunlock check`` reports of a server: cheap to send between processes."""

    name: str
    endpoint: Endpoint
    families: frozenset[int]


def _read_chunk(paths: list[Path], digest_only: bool) -> list[tuple[object, list[Problem]]]:
    out: list[tuple[object, list[Problem]]] = []
    for path in paths:
        found: list[Problem] = []
        server = read_server(path, found)
        if digest_only and server is not None:
            out.append((ServerDigest(server.name, server.endpoint, server.families), found))
        else:
            out.append((server, found))
    return out


def _read_many(paths: list[Path], digest_only: bool) -> list[tuple[object, list[Problem]]]:
    workers = min(os.cpu_count() or 1, 8)
    parallel = digest_only and len(paths) >= PARALLEL_FROM_FILES and workers > 1
    if not parallel or "fork" not in mp.get_all_start_methods():
        return _read_chunk(paths, digest_only)
    size = -(-len(paths) // workers)
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(max_workers=len(chunks), mp_context=mp.get_context("fork")) as pool:
        results = pool.map(_read_chunk, chunks, [digest_only] * len(chunks))
        return [item for chunk in results for item in chunk]
