"""tunlock.toml: the configuration contract, validated as msgspec Structs (supervisor.tables).

The section and key names are a public contract (DESIGN.md and
docs/configuration.md): extend them, never rename them. ``load_config`` reads
the file, applies ``TUNLOCK_<SECTION>_<KEY>`` environment overrides (for
containers), validates every key and loads the server files, reporting every
problem as ``file:line: what is wrong``. It is two halves, ``load_settings`` and
``ConfigDraft.settle``, around the server reading, so that ``tunlock check`` can read
the servers its own way (supervisor.check) and report exactly what ``run`` would.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, field

from supervisor.addresses import parse_endpoint
from supervisor.errors import ConfigError, Problem
from supervisor.files import FileProblem, read_text
from supervisor.net.routing_plan import ADMIN_MARK
from supervisor.redact import shown_name
from supervisor.servers import Endpoint, Server, network_within
from supervisor.tables import FieldProblem, IPNetwork, Wrong, convert_table
from supervisor.wgquick import load_servers

ENV_PREFIX = "TUNLOCK_"
MAX_CONFIG_FILE = 1024 * 1024
# What allow_lan opens: RFC 1918, link-local, ULA and their multicast (DESIGN.md, [lock]).
DEFAULT_LAN_RANGES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "224.0.0.0/24",
    "239.255.255.250/32",
    "fc00::/7",
    "fe80::/10",
    "ff02::/16",
)
# What a LAN range may be (docs/configuration.md, "What LAN means"): inside one of these blocks,
# none of which is routed on the internet. The lock narrows them further, to what is on-link
# when it is applied (supervisor.lock.onlink.onlink_lan). A public range, let alone 0.0.0.0/0,
# would let traffic leave outside the tunnel; CGNAT's 100.64.0.0/10 is the ISP's, not a LAN.
LAN_BLOCKS = tuple(
    ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "224.0.0.0/24",  # link-local multicast
        "239.0.0.0/8",  # organisation-scoped multicast
        "192.0.2.0/24",  # documentation ranges: labs and examples, when named explicitly
        "198.51.100.0/24",
        "203.0.113.0/24",
        "fc00::/7",
        "fe80::/10",
        "ff02::/16",  # link-scope multicast
        "2001:db8::/32",
    )
)
_IFNAME = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")
# A file name under /run/netns (and a directory under /etc/netns) that every tool takes as it is:
# no path separator, no leading dot or dash, no shell or unit-file metacharacters.
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
Port = Annotated[int, Meta(ge=1, le=65535)]
Seconds = Annotated[float, Meta(gt=0, le=86400)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A section: unknown keys are errors; its own checks raise FieldProblem naming the key."""


class TunnelSection(_Section, frozen=True):
    interface: str = "tunlock0"
    backend: Literal["auto", "kernel", "userspace"] = "auto"
    servers: Annotated[list[str], Meta(min_length=1)] = field(default_factory=lambda: ["servers/*.conf"])
    # Marks the tunnel's own encrypted UDP so the lock and the routing rule can tell it from
    # everything else; 0xca6c is wg-quick's choice too.
    fwmark: Annotated[int, Meta(ge=1, le=0xFFFFFFFF)] = 0xCA6C
    route_table: Annotated[int, Meta(ge=1, le=0xFFFFFFFF)] = 51820
    # Namespace mode (docs/namespace.md): the tunnel, its lock, routes and DNS live in the network
    # namespace /run/netns/<namespace>; the host's own networking is left alone.
    namespace: str | None = None

    def __post_init__(self) -> None:
        if not _IFNAME.match(self.interface):
            raise FieldProblem("interface", "an interface name is 1 to 15 letters, digits or _=+.-")
        if self.route_table in (253, 254, 255):
            raise FieldProblem(
                "route_table", "tables 253-255 are the kernel's default, main and local tables"
            )
        if self.namespace is not None and not _NETNS_NAME.match(self.namespace):
            raise FieldProblem(
                "namespace",
                "a namespace name is 1 to 64 letters, digits or _.- and starts with a letter, "
                "digit or _ (it names /run/netns/NAME)",
            )


class RotationSection(_Section, frozen=True):
    strategy: Literal["sequential", "random"] = "sequential"
    cooldown_s: Seconds = 60.0
    backoff_initial_s: Seconds = 2.0
    backoff_max_s: Seconds = 60.0


class HealthSection(_Section, frozen=True):
    interval_s: Seconds = 0.25
    idle_interval_s: Seconds = 2.0
    probe_interval_s: Seconds = 0.25
    idle_probe_s: Seconds = 10.0
    # In doubt (tx grew, rx did not): a probe this often; dead after a count AND a window of
    # unanswered probes (defaults derived in docs/configuration.md and supervisor/machine/liveness.py).
    doubt_probe_interval_s: Seconds = 0.03
    min_unanswered_probes: Annotated[int, Meta(ge=1, le=10000)] = 31
    dead_after_s: Seconds = 1.0
    probe_reply_s: Seconds = 0.25
    probe_target: str | None = None
    handshake_max_age_s: Seconds = 180.0
    connect_timeouts_s: Annotated[list[Seconds], Meta(min_length=1)] = field(
        default_factory=lambda: [4.0, 8.0, 15.0]
    )

    def __post_init__(self) -> None:
        # Checked here, not where probes start: a bad one once passed `check` and then killed
        # `run` with a traceback, and a running daemon on SIGHUP (issue #11).
        value = self.probe_target
        if value is not None:
            if "%" in value:
                raise FieldProblem(
                    "probe_target",
                    f"{value!r}: a probe goes through the tunnel; give an address without a scope",
                )
            try:
                ip_address(value)
            except ValueError:
                raise FieldProblem(
                    "probe_target",
                    f"{value!r} is not an IP address; give an address inside the tunnel that answers "
                    "ping, such as 10.64.0.1, or leave it out to probe the server's DNS address",
                ) from None


class LockSection(_Section, frozen=True):
    mode: Literal["permanent", "session"] = "permanent"
    table: Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")] = "tunlock"
    allow_lan: bool = False
    lan_ranges: list[IPNetwork] = field(default_factory=lambda: [_network(n) for n in DEFAULT_LAN_RANGES])
    inbound_tcp: list[Port] = field(default_factory=list)
    # The administrator's way in from anywhere on the physical side (SSH on a server): TCP ports
    # that connections from outside may reach, from admin_sources (empty: any); only their
    # replies leave outside the tunnel (supervisor/lock/admin.py, docs/lock.md).
    admin_tcp: list[Port] = field(default_factory=list)
    admin_sources: list[IPNetwork] = field(default_factory=list)
    # Ports reachable from the internet through the tunnel (beyond replies and a forwarded port).
    tunnel_inbound_tcp: list[Port] = field(default_factory=list)
    tunnel_inbound_udp: list[Port] = field(default_factory=list)
    # The physical interfaces whose egress the lock holds (every frame leaving them, a macvlan
    # child's or a bridged VM's included); empty: the devices under the gateway routes.
    uplinks: list[Annotated[str, Meta(pattern=r"^[^\s/\"]{1,15}$")]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for net in self.lan_ranges:
            if not any(network_within(net, block) for block in LAN_BLOCKS):
                raise FieldProblem(
                    "lan_ranges",
                    f"{net} is not a LAN range: a LAN range lies inside a private, link-local, "
                    "unique-local, scoped multicast or documentation block "
                    f"({', '.join(str(b) for b in LAN_BLOCKS)}); anything else is the internet, "
                    "and letting it through would bypass the tunnel",
                )
        for key in ("inbound_tcp", "admin_tcp", "tunnel_inbound_tcp", "tunnel_inbound_udp"):
            ports: list[int] = getattr(self, key)
            if len(set(ports)) != len(ports):
                raise FieldProblem(key, "a port is listed twice")
            msgspec.structs.force_setattr(self, key, sorted(ports))
        if len(set(self.admin_sources)) != len(self.admin_sources):
            raise FieldProblem("admin_sources", "a network is listed twice")


class ControlSection(_Section, frozen=True):
    socket: Path = Path("/run/tunlock/control.sock")


class MetricsSection(_Section, frozen=True):
    # IP:port or [IPv6]:port for Prometheus exposition; off unless set.
    listen: str | None = None

    def __post_init__(self) -> None:
        if self.listen is not None:
            try:
                parse_endpoint(self.listen)
            except ValueError:
                raise FieldProblem("listen", "use IP:port or [IPv6]:port, such as 127.0.0.1:9586") from None

    @property
    def address(self) -> Endpoint | None:
        return parse_endpoint(self.listen) if self.listen else None


class DnsSection(_Section, frozen=True):
    manage: bool = True
    resolv_conf: Path = Path("/etc/resolv.conf")


class PluginsSection(_Section, frozen=True):
    """``enabled`` plugins by entry-point name; each one's options in ``[plugins.<name>]``."""

    enabled: list[str] = field(default_factory=list)
    # A plugin away from ctx.next() this long is hung: cancelled and restarted.
    stall_timeout_s: Seconds = 60.0
    backoff_initial_s: Seconds = 1.0
    backoff_max_s: Seconds = 60.0
    # How long plugins get at stop (give a mapping up, clear a port file) before the tunnel goes.
    stop_timeout_s: Seconds = 5.0
    # Every other key of [plugins], as the file has it: the [plugins.<name>] tables (anything
    # else is reported as an unknown key). Not a key of the file: load_settings fills it.
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.enabled)) != len(self.enabled):
            raise FieldProblem("enabled", "a plugin is enabled twice")

    @property
    def options(self) -> dict[str, dict[str, object]]:
        """The ``[plugins.<name>]`` tables."""
        return {k: v for k, v in self.extra.items() if isinstance(v, dict)}


class NamespaceSection(_Section, frozen=True):
    """Namespace mode's way in for web UIs (docs/namespace.md): a veth pair from the host into
    the namespace, whose inside end accepts only connections to these ports, and their replies."""

    ui_tcp: list[Port] = field(default_factory=list)
    # The pair's addresses: the host's end takes the first, the namespace's end the second.
    ui_subnet: IPv4Network = IPv4Network("169.254.251.0/30")

    @property
    def ui_ends(self) -> tuple[IPv4Address, IPv4Address]:
        """The host's end and the namespace's end of the pair."""
        first, second = list(self.ui_subnet.hosts())
        return first, second

    def __post_init__(self) -> None:
        if self.ui_subnet.prefixlen != 30:
            raise FieldProblem("ui_subnet", "a /30: one address for the host's end, one for the namespace's")


class ConfigFile(_Section, frozen=True):
    tunnel: TunnelSection = field(default_factory=TunnelSection)
    namespace: NamespaceSection = field(default_factory=NamespaceSection)
    rotation: RotationSection = field(default_factory=RotationSection)
    health: HealthSection = field(default_factory=HealthSection)
    lock: LockSection = field(default_factory=LockSection)
    control: ControlSection = field(default_factory=ControlSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    dns: DnsSection = field(default_factory=DnsSection)
    plugins: PluginsSection = field(default_factory=PluginsSection)


# The sections by name, and the keys a file may set in each (PluginsSection.extra is filled by
# the loader, not named in a file).
SECTIONS: dict[str, type[_Section]] = {
    name: typing.get_type_hints(ConfigFile)[name] for name in ConfigFile.__struct_fields__
}


def section_keys(section: type[_Section]) -> tuple[str, ...]:
    return tuple(
        name for name in section.__struct_fields__ if section is not PluginsSection or name != "extra"
    )


class Config(msgspec.Struct, frozen=True):
    """The validated configuration plus the servers its globs name."""

    path: Path
    settings: ConfigFile
    servers: tuple[Server, ...]
    warnings: tuple[Problem, ...] = ()

    # Two configurations are the same whatever they warned of: msgspec compares every field, and
    # has no per-field opt-out, so the comparison is spelled out here.
    def _compared(self) -> tuple[Path, ConfigFile, tuple[Server, ...]]:
        return self.path, self.settings, self.servers

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config) or type(other) is not type(self):
            return NotImplemented
        return self._compared() == other._compared()

    def __hash__(self) -> int:
        return hash(self._compared())


def _network(text: str) -> IPv4Network | IPv6Network:
    from ipaddress import ip_network

    return ip_network(text)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Where each ``[section]`` and ``section.key`` stands in a TOML text (1-based lines).

    Written by hand because tomllib returns values without positions and a validation error
    names a key, not a line; our config is flat (tables of scalars and lists), so headers and
    ``key =`` lines are all a reader needs to point at.
    """
    lines: dict[tuple[str, ...], int] = {}
    section: tuple[str, ...] = ()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            section = tuple(part.strip().strip('"') for part in line.strip("[] ").split("."))
            lines.setdefault(section, number)
        elif "=" in line and not line.startswith("#"):
            key = line.partition("=")[0].strip().strip('"')
            lines.setdefault((*section, key), number)
    return lines


def _env_overrides(
    environ: typing.Mapping[str, str], problems: list[Problem]
) -> dict[str, dict[str, object]]:
    """``TUNLOCK_<SECTION>_<KEY>=value`` for every key; lists are comma-separated."""
    out: dict[str, dict[str, object]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or not key:
            continue  # TUNLOCK_CONFIG, TUNLOCK_LAB_ONLY and friends are not config keys
        model = SECTIONS[section]
        fields = section_keys(model)
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            more = f" (did you mean {ENV_PREFIX}{section.upper()}_{hint[0].upper()}?)" if hint else ""
            problems.append(Problem(Path(f"env {name}"), 0, f"[{section}] has no key {key!r}{more}"))
            continue
        is_list = typing.get_origin(typing.get_type_hints(model)[key]) is list
        parsed: object = [v.strip() for v in value.split(",") if v.strip()] if is_list else value
        out.setdefault(section, {})[key] = parsed
    return out


def _merge(data: dict[str, object], overrides: dict[str, dict[str, object]]) -> None:
    for section, keys in overrides.items():
        target = data.setdefault(section, {})
        if isinstance(target, dict):
            target.update(keys)


def _unknown_key_message(loc: tuple[str, ...]) -> str:
    """``loc``: the key's section and the key, or the key alone for one at the top level."""
    *parents, key = loc
    known = list(section_keys(SECTIONS[parents[0]]) if parents else SECTIONS)
    hint = difflib.get_close_matches(key, known, n=1)
    where = f"[{'.'.join(parents)}]" if parents else "the top level"
    more = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})"
    return f"unknown key {shown_name(key)} in {where}{more}"


# Ports from here up may be bound by any local user (net.ipv4.ip_unprivileged_port_start).
UNPRIVILEGED_PORTS = 1024


def _admin_problems(settings: ConfigFile, path: Path, lines: dict[tuple[str, ...], int]) -> list[Problem]:
    """The admin path's settings against the rest: a mark taken twice (an error), and what they
    allow that their writer may not have meant (warnings)."""
    lock = settings.lock
    out: list[Problem] = []
    if settings.tunnel.fwmark == ADMIN_MARK:
        # The administrator's replies are routed by their packet mark (supervisor/lock/admin.py),
        # the tunnel's own packets by theirs: one value for both would send every WireGuard
        # packet by the administrator's rule and blur what the lock tells apart.
        out.append(
            Problem(
                path,
                lines.get(("tunnel", "fwmark"), 0),
                f"tunnel.fwmark {ADMIN_MARK:#x} is the mark of the administrator's connections "
                "(lock.admin_tcp); choose another, such as 0xca6c",
            )
        )
    line = lines.get(("lock", "admin_tcp"), 0)
    unprivileged = [p for p in lock.admin_tcp if p >= UNPRIVILEGED_PORTS]
    if unprivileged:
        out.append(
            Problem(
                path,
                line,
                f"lock.admin_tcp {unprivileged}: any local user may listen on a port from "
                f"{UNPRIVILEGED_PORTS} up while the SSH server does not, and talk outside the tunnel "
                "to whoever connects; an SSH port below 1024 keeps the path to root's programs",
                warning=True,
            )
        )
    if lock.admin_sources and not lock.admin_tcp:
        out.append(
            Problem(
                path,
                lines.get(("lock", "admin_sources"), 0),
                "lock.admin_sources is set but lock.admin_tcp is empty: it allows nothing",
                warning=True,
            )
        )
    return out


class ConfigDraft(msgspec.Struct, frozen=True):
    """tunlock.toml validated, its server files not read yet: the half ``run`` and ``check`` share.

    ``settle`` takes the problems of the server files (appended to ``problems``) and gives the
    verdict on the whole, so that both report the same problems in the same order.
    """

    path: Path
    settings: ConfigFile
    # The config file and line of tunnel.servers: where a pattern that matches no file is reported.
    servers_origin: tuple[Path, int]
    # What the environment overrides got wrong: reported first, before the servers' problems.
    problems: tuple[Problem, ...]
    # Judged on the settings but reported only once the servers have none: metrics and plugins.
    later_problems: tuple[Problem, ...]

    def settle(self, problems: list[Problem], servers_found: int) -> tuple[Problem, ...]:
        """The warnings, once ``problems`` (``self.problems`` and the servers') hold no error and
        some server was found; else raise ConfigError with every problem."""
        problems = list(problems)
        if not servers_found and not any(not p.warning for p in problems):
            problems.append(Problem(*self.servers_origin, "no usable server file"))
        if any(not p.warning for p in problems):
            # The later warnings too: `check` shows them beside the errors.
            raise ConfigError([*problems, *(p for p in self.later_problems if p.warning)])
        problems.extend(self.later_problems)
        if any(not p.warning for p in problems):
            raise ConfigError(problems)
        return tuple(problems)


def load_config(path: Path, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path`` and its server files; raise ConfigError with every problem."""
    settings = load_settings(path, environ)
    problems = list(settings.problems)
    servers = load_servers(
        settings.settings.tunnel.servers, settings.path.parent, problems, settings.servers_origin
    )
    warnings = settings.settle(problems, len(servers))
    return Config(path=settings.path, settings=settings.settings, servers=servers, warnings=warnings)


def load_settings(path: Path, environ: typing.Mapping[str, str] | None = None) -> ConfigDraft:
    """Read and validate ``path`` alone; raise ConfigError when it cannot be validated.

    Problems that do not stop validation come back in the ConfigDraft, for ``settle`` to report
    with the servers' problems.
    """
    environ = os.environ if environ is None else environ
    path = Path(path)
    problems: list[Problem] = []
    if path.is_dir():
        raise ConfigError([Problem(path, 0, "is a directory; give the path of tunlock.toml")])
    if not path.exists():
        raise ConfigError([Problem(path, 0, "no such file; write one (see configs/tunlock.toml)")])
    try:
        # A regular file only, of bounded size, a BOM allowed (files.read_text says why).
        text = read_text(os.fspath(path), MAX_CONFIG_FILE)[0]
    except FileProblem as err:
        raise ConfigError([Problem(path, err.line, err.message)]) from None
    try:
        data: dict[str, object] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        match = re.search(r"\(at line (\d+), column \d+\)", str(err))
        line = int(match.group(1)) if match else 0
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err)) or "invalid TOML"
        raise ConfigError([Problem(path, line, f"TOML: {message}")]) from None
    _merge(data, _env_overrides(environ, problems))
    lines = key_lines(text)
    sections: dict[str, _Section] = {}
    wrong: list[tuple[tuple[str, ...], Wrong]] = []
    # Section by section, each one's options on their own: a conversion stops at its first
    # error, and every section's problems are reported at once.
    for name, kind in SECTIONS.items():
        table = data.get(name, {})
        extra: dict[str, object] = {}
        if kind is PluginsSection and isinstance(table, dict):
            keys = section_keys(kind)
            extra = {k: v for k, v in table.items() if k not in keys}
            table = {k: v for k, v in table.items() if k in keys}
        section, found = convert_table(table, kind, strict=False)
        wrong += [((name, w.key) if w.key else (name,), w) for w in found]
        if section is not None:
            sections[name] = msgspec.structs.replace(section, extra=extra) if extra else section
    wrong += [((name,), Wrong(name, "unknown key", unknown=True)) for name in data if name not in SECTIONS]
    if wrong:
        for loc, detail in wrong:
            line = lines.get(loc) or lines.get(loc[:-1]) or lines.get(loc[:1], 0)
            env_name = f"{ENV_PREFIX}{'_'.join(loc[:2]).upper()}"
            origin = Path(f"env {env_name}") if env_name in environ and len(loc) >= 2 else path
            message = _unknown_key_message(loc) if detail.unknown else f"{'.'.join(loc)}: {detail.message}"
            problems.append(Problem(origin, line if origin == path else 0, message))
        raise ConfigError(problems) from None
    settings = msgspec.structs.replace(ConfigFile(), **sections)
    later: list[Problem] = []
    metrics = settings.metrics.address
    if metrics and not metrics.host.is_loopback and metrics.port not in settings.lock.inbound_tcp:
        later.append(
            Problem(
                path,
                lines.get(("metrics", "listen"), 0),
                f"metrics.listen {metrics}: the lock lets only this host scrape it; add "
                f"{metrics.port} to lock.inbound_tcp to let the LAN in",
                warning=True,
            )
        )
    later += _admin_problems(settings, path, lines)
    if settings.namespace.ui_tcp and settings.tunnel.namespace is None:
        later.append(
            Problem(
                path,
                lines.get(("namespace", "ui_tcp"), 0),
                "namespace.ui_tcp is set but tunnel.namespace is not: it is ignored (it opens ports "
                "of namespace mode's namespace; lock.inbound_tcp opens the whole host's)",
                warning=True,
            )
        )
    for name, value in settings.plugins.extra.items():
        if not isinstance(value, dict):
            later.append(Problem(path, lines.get(("plugins", name), 0), f"unknown key {name!r} in [plugins]"))
        elif name not in settings.plugins.enabled:
            later.append(
                Problem(
                    path,
                    lines.get(("plugins", name), 0),
                    f"[plugins.{name}] is set but {name!r} is not in plugins.enabled",
                    warning=True,
                )
            )
    control = settings.control.socket
    if not control.is_absolute():
        settings = msgspec.structs.replace(
            settings, control=msgspec.structs.replace(settings.control, socket=path.parent / control)
        )
    return ConfigDraft(
        path=path,
        settings=settings,
        servers_origin=(path, lines.get(("tunnel", "servers"), lines.get(("tunnel",), 0))),
        problems=tuple(problems),
        later_problems=tuple(later),
    )
