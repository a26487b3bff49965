"""wg-quick server files read into Servers (``tunlock run``) or ServerDigests (``tunlock check``).

One server per file; every file:line problem is found here. supervisor.servers holds the plain
data the rest of tunlock sees, supervisor.files reads the file, supervisor.addresses parses
endpoints and addresses, supervisor.check spreads ``tunlock check``'s reading over the cores.
Speed choices are marked "(speed)": their measured figures are in bench/bench_check.py, which
measures `tunlock check` over 10,000 files.

The lines are tokenised here, not with wgconfig. Its whole-file parser keeps no line numbers
(a problem must say file:line, and a second pass to find the line was a third of what checking
a file cost) and revives ``#!`` lines that wg-quick treats as comments; its line parser turns a
lone number into an int and keeps empty items of a comma list, both of which tunlock had to undo
(and it raised ValueError on digits int() refuses, such as superscripts). What remains of a
value's syntax is one rule, written in ``_values``: a ``#`` starts a comment, commas separate
items.
"""

from __future__ import annotations

import abc
import base64
import binascii
import difflib
import functools
import glob
import os
import re
import stat
from ipaddress import IPv4Interface, IPv6Interface, ip_network
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from supervisor.addresses import is_number, parse_address, parse_endpoint
from supervisor.errors import ConfigError, Problem
from supervisor.files import FileProblem, read_text
from supervisor.redact import SAFE_NAME, VALUE_NOT_SHOWN, Secret, shown_name, shown_value
from supervisor.servers import Endpoint, IPAddress, IPInterface, IPNetwork, Peer, Server

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
_ALL_KEYS = {**_INTERFACE_KEYS, **_PEER_KEYS, **_IGNORED_KEYS}
# An empty value of one of these is an error at its own line: the value, a key perhaps, may be on
# the next line, which must then not be mistaken for a key name.
_SINGLE_VALUE_KEYS = frozenset({"privatekey", "publickey", "presharedkey", "endpoint"})
_REPEATABLE_KEYS = frozenset({"address", "dns", "allowedips"} | set(_IGNORED_KEYS))
# The largest server file read: provider files are a few hundred bytes.
MAX_SERVER_FILE = 1024 * 1024


def _interface_parts(text: str) -> tuple[IPAddress, int]:
    address, slash, prefix = text.partition("/")
    host = parse_address(address)
    if not slash:
        return host, host.max_prefixlen
    if not is_number(prefix) or int(prefix) > host.max_prefixlen:
        raise ValueError(f"{text!r} has a bad prefix length")
    return host, int(prefix)


def interface_host(text: str) -> IPAddress:
    """Validate ``address/prefix`` (the host bits may be set) and give back its address."""
    return _interface_parts(text)[0]


@functools.lru_cache(maxsize=16384)
def parse_interface(text: str) -> IPInterface:
    """``address/prefix`` as an interface address (the host bits may be set)."""
    host, prefix = _interface_parts(text)
    # (speed) The family's own class, from an int: ip_interface would format an error message
    # for every IPv6 address, and an address object would be reparsed from its str().
    kind = IPv6Interface if host.version == 6 else IPv4Interface
    return kind((int(host), prefix))


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


def _colon_hint(text: str) -> str:
    """A hint for ``Key: value`` (YAML's habit), naming the key only when it is one we know."""
    name = text.partition(":")[0].strip().lower()
    if ":" in text and name in _ALL_KEYS:
        return f" (write {_ALL_KEYS[name]} = value, with '=', not ':')"
    return ""


# One key line of a section: the key as written, its values, the line it stands on.
_Entry = tuple[str, list[str], int]


class _Section(NamedTuple):
    name: str  # "interface" or "peer"
    line: int  # of its [header]
    entries: dict[str, _Entry]  # by lower-cased key: wg-quick reads keys case-insensitively


def _values(value: str) -> list[str]:
    """The items of what follows ``Key =``: up to a ``#`` comment, split at commas, empty ones
    dropped (``DNS = 10.0.0.1,`` is one server)."""
    items = value.partition("#")[0].split(",")
    if len(items) == 1:  # (speed) most keys hold one value
        item = items[0].strip()
        return [item] if item else []
    return [item for part in items if (item := part.strip())]


Item = TypeVar("Item")


class _Checked(NamedTuple):
    """A server file's values once every check passed: what each reader makes its item of."""

    private_key: str
    addresses: list[Any]  # interfaces (run) or bare hosts (check): see _interface_address
    dns: list[IPAddress]
    mtu: int | None
    listen_port: int | None
    public_key: str
    endpoint: Endpoint
    allowed: list[IPNetwork]
    preshared: Secret | None
    keepalive: int | None


class _Reader(abc.ABC, Generic[Item]):
    """Turns one wg-quick file into an Item, collecting every problem with its line.

    Both subclasses check a file alike and report the same problems; they differ only in what a
    valid file becomes: a Server for the daemon, a ServerDigest for ``tunlock check``.
    """

    # (speed) The path stays a str: a Path per file costs at 10,000 files.
    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        self.errors = 0
        self.sections: list[_Section] = []

    def error(self, line: int, message: str) -> None:
        self.errors += 1
        self.problems.append(Problem(Path(self.path), line, message))

    def warn(self, line: int, message: str) -> None:
        self.problems.append(Problem(Path(self.path), line, message, warning=True))

    def read(self, text: str) -> Item | None:
        if not self._scan(text):
            return None
        names = [s.name for s in self.sections]
        peers = [s for s in self.sections if s.name == "peer"]
        if len(peers) != 1:
            where = peers[1].line if len(peers) > 1 else 0
            self.error(where, f"a server file holds exactly one [Peer], found {len(peers)}")
        if "interface" not in names:
            self.error(1, "no [Interface] section")
            return None
        iface = self._known(self.sections[names.index("interface")], _INTERFACE_KEYS)
        if len(peers) != 1:
            self._interface_fields(iface)  # still report what is wrong in [Interface]
            return None
        return self._build(iface, self._known(peers[0], _PEER_KEYS))

    def _scan(self, text: str) -> bool:
        """Split the text into sections of keyed entries; refuse what is no ``key = value``."""
        sections = self.sections
        current: dict[str, _Entry] = {}
        in_extra_peer = False  # a second peer is refused as a whole; its keys are not looked at
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            # wg-quick treats every '#' line as a comment, '#! ' (a tool's disabled line) too.
            if not stripped or stripped[0] == "#":
                continue
            if stripped[0] == "[":
                written = stripped[1:].partition("]")[0].strip()
                name = written.lower()
                if name not in ("interface", "peer") or not stripped.endswith("]"):
                    shown = repr(f"[{written}]") if SAFE_NAME.fullmatch(written) else "(not shown)"
                    self.error(number, f"unknown section {shown}: only [Interface] and [Peer]")
                    return False
                if name == "interface" and any(s.name == "interface" for s in sections):
                    self.error(number, "a second [Interface] section")
                    return False
                in_extra_peer = name == "peer" and any(s.name == "peer" for s in sections)
                current = {}
                sections.append(_Section(name, number, current))
                continue
            key, eq, value = stripped.partition("=")
            key = key.strip()
            if not eq or not key:
                # Never the line itself: it may be a key that belongs on the line above.
                self.error(number, f"expected 'Key = value'{_colon_hint(stripped)}")
                return False
            if not sections:
                self.error(number, "a key before any [Interface] or [Peer] section")
                return False
            if in_extra_peer:
                continue
            lower = key.lower()
            entry = current.get(lower)
            if not value.partition("#")[0].strip() and lower in _SINGLE_VALUE_KEYS:
                self.error(number, f"{_ALL_KEYS[lower]} has no value: write it on the same line")
                return False
            if entry is None:
                current[lower] = (key, _values(value), number)
            elif lower in _REPEATABLE_KEYS:
                entry[1].extend(_values(value))
            else:
                self.error(
                    number,
                    f"{_ALL_KEYS.get(lower, shown_name(key))} is given twice (first at line {entry[2]})",
                )
                return False
        if not sections:
            self.error(0, "empty: no [Interface] and [Peer] sections")
            return False
        return True

    def _header_line(self, where: str) -> int:
        name = where.strip("[]").lower()
        return next((s.line for s in self.sections if s.name == name), 0)

    def _known(self, section: _Section, known: dict[str, str]) -> dict[str, tuple[list[str], int]]:
        """The section's known keys with their values and line; unknown keys refused, ignored
        ones warned about."""
        found: dict[str, tuple[list[str], int]] = {}
        for lower, (key, values, line) in section.entries.items():
            if lower in known:
                found[lower] = (values, line)
            elif lower in _IGNORED_KEYS:
                self.warn(
                    line,
                    f"{_IGNORED_KEYS[lower]} is ignored: tunlock never runs hooks "
                    "and does its own routing and firewall marking",
                )
            else:
                hint = difflib.get_close_matches(lower, list(known), n=1)
                more = f" (did you mean {known[hint[0]]}?)" if hint else ""
                self.error(line, f"unknown key {shown_name(key)}{more}{_colon_hint(key)}")
        return found

    def _required(
        self, section: dict[str, tuple[list[str], int]], key: str, where: str
    ) -> tuple[str, int] | None:
        if key.lower() not in section:
            self.error(self._header_line(where), f"{where} has no {key}")
            return None
        items, line = section[key.lower()]
        if len(items) != 1:
            self.error(line, f"{key} takes exactly one value")
            return None
        return items[0], line

    def _int(self, section: dict[str, tuple[list[str], int]], key: str, low: int, high: int) -> int | None:
        if key.lower() not in section:
            return None
        items, line = section[key.lower()]
        if key == "PersistentKeepalive" and items == ["off"]:
            return 0
        if len(items) != 1 or not is_number(items[0]) or not low <= int(items[0]) <= high:
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

    def _build(self, iface: dict, peer: dict) -> Item | None:
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
                # parse_endpoint quotes the value: fine for an address, not for a stray key.
                shown = shown_value(found[0].strip()) != VALUE_NOT_SHOWN
                self.error(
                    found[1],
                    str(err) if shown else "Endpoint must be IP:port or [IPv6]:port (value not shown)",
                )
        if self.errors or private_key is None or public_key is None or endpoint is None:
            return None
        if allowed and not any(n.prefixlen == 0 for n in allowed):
            self.warn(
                peer["allowedips"][1],
                "AllowedIPs has no 0.0.0.0/0 or ::/0: traffic outside it is blocked by the lock, "
                "not routed around the tunnel",
            )
        return self._make(
            _Checked(
                private_key,
                addresses,
                dns,
                mtu,
                listen_port,
                public_key,
                endpoint,
                allowed,
                preshared,
                keepalive,
            )
        )

    @abc.abstractmethod
    def _interface_address(self, text: str) -> object:
        """An Address entry, validated alike by both readers (ValueError)."""

    @abc.abstractmethod
    def _make(self, fields: _Checked) -> Item:
        """What a file that passed every check becomes."""

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
        items, line = section[key.lower()]
        parse = self._interface_address if interface else parse_network
        out = []
        for item in items:
            try:
                out.append(parse(item))
            except ValueError:
                self.error(
                    line,
                    f"{key} entry {shown_value(item)} is not an IP address with a prefix (e.g. 10.0.0.2/32)",
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
        items, line = iface["dns"]
        out = []
        for item in items:
            try:
                out.append(parse_address(item))
            except ValueError:
                self.warn(
                    line, f"DNS entry {shown_value(item)} is not an IP address (a search domain?); ignored"
                )
        return out


class _ServerReader(_Reader[Server]):
    def _interface_address(self, text: str) -> IPInterface:
        return parse_interface(text)

    def _make(self, fields: _Checked) -> Server:
        return Server(
            name=_stem(self.path),
            path=Path(self.path),
            private_key=Secret(fields.private_key),
            addresses=tuple(fields.addresses),
            peer=Peer(
                public_key=fields.public_key,
                endpoint=fields.endpoint,
                allowed_ips=tuple(fields.allowed),
                preshared_key=fields.preshared,
                persistent_keepalive=fields.keepalive or None,
            ),
            dns=tuple(fields.dns),
            mtu=fields.mtu,
            listen_port=fields.listen_port,
        )


class ServerDigest(NamedTuple):
    """What ``tunlock check`` reports of a server: plain values, cheap to send between processes."""

    name: str
    # (IP version, address as an int, port): tells endpoints apart without formatting them (speed).
    endpoint_key: tuple[int, int, int]
    families: tuple[int, ...]


class _DigestReader(_Reader[ServerDigest]):
    # (speed) check needs only the families: no interface objects to build and throw away.
    def _interface_address(self, text: str) -> IPAddress:
        return interface_host(text)

    def _make(self, fields: _Checked) -> ServerDigest:
        endpoint = fields.endpoint
        families = tuple(sorted({a.version for a in fields.addresses}))
        return ServerDigest(_stem(self.path), (endpoint.family, int(endpoint.host), endpoint.port), families)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# A server's name (its file's stem) ends up in logs, the status, metrics labels and the hooks'
# arguments, where a hook may paste it into a shell script: only characters no shell, log
# parser or label treats specially, not starting like an option or a hidden file.
SERVER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def server_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a server's name, or None when it can."""
    if SERVER_NAME.fullmatch(name):
        return None
    return (
        f"server name {name!a} is refused: a server's name (the file's name without its "
        "extension) may hold only letters, digits, '.', '_' and '-', start with a letter, digit "
        "or '_', and be at most 64 characters; rename the file"
    )


def read_server(path: Path, problems: list[Problem]) -> Server | None:
    """Read one server file, appending every problem (errors and warnings) to ``problems``."""
    return _read_file(_ServerReader(os.fspath(path), problems))


def _read_file(reader: _Reader[Item]) -> Item | None:
    try:
        text, mode = read_text(reader.path, MAX_SERVER_FILE)
    except FileProblem as err:
        reader.error(err.line, err.message)
        return None
    item = reader.read(text)
    if item is not None and mode & 0o077:
        reader.warn(
            0,
            f"holds a private key but is readable by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); chmod 600 it",
        )
    return item


def load_server(path: Path) -> Server:
    """Read one server file; raise ConfigError with every problem found."""
    problems: list[Problem] = []
    server = read_server(path, problems)
    if server is None:
        raise ConfigError(problems)
    return server


def load_servers(
    patterns: list[str], base: Path, problems: list[Problem], origin: tuple[Path, int]
) -> tuple[Server, ...]:
    """Every server file the glob ``patterns`` name (relative to ``base``), sorted by name.

    Problems are appended; ``origin`` (the config file and line of the ``servers`` key) is where
    a pattern that matches nothing is reported.
    """
    paths = matching_files(patterns, base, problems, origin)
    return named_once(paths, _read_chunk(_ServerReader, paths), problems)


def matching_files(
    patterns: list[str], base: Path, problems: list[Problem], origin: tuple[Path, int]
) -> list[str]:
    """The files the glob ``patterns`` name (relative to ``base``), each once; a pattern that
    matches nothing is a problem at ``origin`` (the config file and line of the ``servers`` key)."""
    paths: list[str] = []
    for pattern in patterns:
        # Strings, not Paths (speed), normalised so that two patterns naming one file are read
        # once; a directory that matches is reported as unreadable.
        matched = sorted(os.path.normpath(p) for p in glob.glob(str(base / pattern)))
        if not matched:
            problems.append(Problem(origin[0], origin[1], f"servers pattern {pattern!r} matches no file"))
        paths.extend(matched)
    return list(dict.fromkeys(paths))


class _Named(Protocol):
    @property
    def name(self) -> str: ...


Named = TypeVar("Named", bound=_Named)


def named_once(
    paths: list[str], read: list[tuple[Named | None, list[Problem]]], problems: list[Problem]
) -> tuple[Named, ...]:
    """The valid servers in ``paths``' order, each name once; every file's problems appended."""
    servers: list[Named] = []
    seen: dict[str, str] = {}
    for path, (server, found) in zip(paths, read, strict=True):
        problems.extend(found)
        if server is None:
            continue
        unsafe = server_name_problem(server.name)
        if unsafe is not None:
            problems.append(Problem(Path(path), 0, unsafe))
            continue
        if server.name in seen:
            taken = f"server name {server.name!r} is taken by {seen[server.name]}"
            problems.append(Problem(Path(path), 0, taken))
            continue
        seen[server.name] = path
        servers.append(server)
    return tuple(servers)


def _read_chunk(reader: type[_Reader[Item]], paths: list[str]) -> list[tuple[Item | None, list[Problem]]]:
    out: list[tuple[Item | None, list[Problem]]] = []
    for path in paths:
        found: list[Problem] = []
        out.append((_read_file(reader(path, found)), found))
    return out


def read_digests(paths: list[str]) -> list[tuple[ServerDigest | None, list[Problem]]]:
    """Each file of ``paths`` read as ``tunlock check`` reads it: its digest (None when it is
    not a valid server) and its problems, in ``paths``' order, for ``named_once``."""
    return _read_chunk(_DigestReader, paths)
