"""The two units tunlock installs, rendered from the configuration (pure: text in, text out).

- ``tunlock-lock.service`` (``supervisor.lock.cli.BOOT_UNIT``): loads the exported nft file with
  ``nft -f`` before ``network-pre.target``, so the lock is in force before any network is up.
  No Python at boot: the file is plain nft.
- ``tunlock.service``: the daemon, ``Type=notify``: systemd waits for READY=1 (the lock in place,
  the control socket answering), shows the STATUS= line, and restarts a daemon whose event loop
  stops sending WATCHDOG=1.

The hardening is what the daemon still works under (checked in a booted Debian 12 by
tests/systemd/): root, but only CAP_NET_ADMIN (nft, netlink, wireguard-go's tun device and
fwmark) and CAP_NET_RAW (the ICMP probes); a read-only system except the paths it writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Config
from supervisor.connections import DESCRIPTORS_WANTED
from supervisor.lock.cli import BOOT_UNIT
from supervisor.net.dns import DEFAULT_STATE_DIR
from supervisor.net.netns import NETNS_ETC_DIR, NETNS_RUN_DIR

LOCK_UNIT_NAME = "tunlock-lock.service"
DAEMON_UNIT_NAME = "tunlock.service"
DEFAULT_LOCK_FILE = Path("/etc/tunlock/lock.nft")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
NFT = Path("/usr/sbin/nft")
# wireguard-go's UAPI sockets (/var/run/wireguard is a link to it on every systemd host).
WIREGUARD_RUN_DIR = Path("/run/wireguard")
WATCHDOG_S = 30

DAEMON_UNIT = """\
[Unit]
Description=tunlock: WireGuard supervisor with a kill switch that never opens
Documentation=file://{docs}
{ordering}
[Service]
Type=notify
NotifyAccess=main
{exec_start_pre}ExecStart={python} -m supervisor.cli run --config {config} --log-format json
# SIGHUP reloads; the shell's kill, as minimal hosts have no /bin/kill.
ExecReload=/bin/sh -c 'kill -HUP $MAINPID'
Restart=on-failure
RestartSec=1
WatchdogSec={watchdog}
TimeoutStartSec=60
TimeoutStopSec=30
# Only the daemon is stopped: wireguard-go, which it starts in a session of its own, keeps the
# tunnel up across a restart (a watchdog restart included) and the next daemon adopts it. A
# clean stop closes the tunnel itself.
KillMode=process
# A core dump of this process would hold the WireGuard private key.
LimitCORE=0
# What the daemon may need (its listeners are bounded); systemd's default soft limit is 1024.
LimitNOFILE={nofile}
UMask=0077

# Hardening (systemd-analyze security {daemon_unit}).
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW{sys_admin}
AmbientCapabilities=
NoNewPrivileges=yes
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
ProtectSystem=strict
RuntimeDirectory={runtime_dirs}
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
{read_write_paths}ProtectHome={protect_home}
PrivateTmp=yes
{bind_paths}ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# Not ProtectKernelTunables: the daemon sets net.ipv4.conf.all.src_valid_mark, as wg-quick does.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces={restrict_namespaces}
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class UnitFiles:
    """Everything ``tunlock systemd install`` writes: path -> text."""

    lock_file: Path
    lock_text: str
    lock_unit: Path
    lock_unit_text: str
    daemon_unit: Path
    daemon_unit_text: str
    # Namespace mode: no boot lock (it would lock the host); the daemon's unit alone.
    namespace_mode: bool = False

    def files(self) -> list[tuple[Path, str]]:
        if self.namespace_mode:
            return [(self.daemon_unit, self.daemon_unit_text)]
        return [
            (self.lock_file, self.lock_text),
            (self.lock_unit, self.lock_unit_text),
            (self.daemon_unit, self.daemon_unit_text),
        ]

    def unit_names(self) -> list[str]:
        """The units to enable."""
        return [path.name for path, _ in self.files() if path.suffix == ".service"]


# What ProtectHome= hides and what PrivateTmp= replaces with an empty directory.
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
TMP_ROOTS = (Path("/tmp"), Path("/var/tmp"))


def interpreter_paths(python: str) -> list[Path]:
    """The interpreter's environment (a venv or pipx's: ``bin/python``'s grandparent) and the
    installation it is made from (where its links lead)."""
    executable = Path(python)
    return [executable.parent.parent, Path(os.path.realpath(executable)).parent.parent]


def config_paths(config: Config) -> list[Path]:
    """What the daemon reads of the configuration: its file's directory and the server files'."""
    return [config.path.resolve().parent, *(s.path.resolve().parent for s in config.servers)]


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _outermost(paths: Iterable[Path]) -> list[Path]:
    kept = sorted(set(paths), key=lambda p: (len(p.parts), str(p)))
    return [p for i, p in enumerate(kept) if not any(p.is_relative_to(k) for k in kept[:i])]


@dataclass(frozen=True)
class Sandbox:
    """How the unit's sandbox lets the daemon reach what it needs where the sandbox hides it.

    A home directory (a venv or pipx under /root or /home) is shown read-only on an empty
    ``ProtectHome=tmpfs``, path by path: the rest of the homes stays hidden. Under /tmp and
    /var/tmp, which ``PrivateTmp=yes`` replaces, the paths are bound in the same way. What the
    daemon writes there (its control socket's directory) is bound read-write instead.
    """

    protect_home: str = "yes"
    read_only: tuple[Path, ...] = ()
    read_write: tuple[Path, ...] = ()

    @classmethod
    def for_paths(cls, reads: Iterable[Path], writes: Iterable[Path] = ()) -> Sandbox:
        hidden = (*HOME_ROOTS, *TMP_ROOTS)
        rw = _outermost(p for p in writes if _under(p, hidden))
        ro = [
            p
            for p in _outermost(p for p in reads if _under(p, hidden))
            if not any(p.is_relative_to(w) for w in rw)
        ]
        home = any(_under(p, HOME_ROOTS) for p in (*ro, *rw))
        return cls("tmpfs" if home else "yes", tuple(ro), tuple(rw))

    def lines(self) -> str:
        return _lines("BindReadOnlyPaths", self.read_only) + _lines("BindPaths", self.read_write)


WHOLE_HOST_ORDERING = """\
# The boot lock first: it holds from before network-pre.target until the daemon takes over, and
# stays when the daemon stops or fails.
Requires={lock_unit}
After={lock_unit} network-pre.target network.target
"""

# Namespace mode locks nothing of the host, so no boot lock: a namespace that does not exist yet
# lets nothing out, and one that does holds the lock the daemon left in it. The services joined
# to it (tunlock systemd join) start after this one is ready.
NAMESPACE_ORDERING = """\
After=network-pre.target network.target
"""


def namespace_start_pre(namespace: str) -> str:
    """Namespace mode: pin the namespace and make its resolv.conf before the daemon starts, with
    full privileges (``+``) and in PID 1's mount namespace (nsenter): systemd may give even a
    ``+`` command a mount namespace of the unit's, and a pin made in one is seen by nobody else.
    The daemon itself only enters what exists."""
    resolv_dir = NETNS_ETC_DIR / namespace
    return (
        "# Namespace mode: the namespace pinned, and its resolv.conf made, where all see them.\n"
        "ExecStartPre=+/usr/bin/nsenter --mount=/proc/1/ns/mnt -- /bin/sh -c "
        f"'test -e {NETNS_RUN_DIR / namespace} || ip netns add {namespace}; "
        f"mkdir -p {resolv_dir} && touch {resolv_dir / 'resolv.conf'}'\n"
    )


def writable_paths(config: Config) -> list[Path]:
    """What the daemon writes outside the runtime directories: the control socket's directory
    when it is not under /run/tunlock, and resolv.conf when the daemon rewrites the file."""
    paths: list[Path] = []
    socket_dir = config.settings.control.socket.parent
    if not socket_dir.is_relative_to(DEFAULT_STATE_DIR):
        paths.append(socket_dir)
    dns = config.settings.dns
    namespace = config.settings.tunnel.namespace
    if dns.manage and namespace is not None:
        # The namespace's resolv.conf, made by ExecStartPre: optional ("-"), since systemd sets up
        # the mount namespace of ExecStartPre itself too, before the directory exists.
        paths.append(Path("-" + str(NETNS_ETC_DIR / namespace)))
    elif dns.manage:
        # A missing path would fail the unit's start; "-" makes it optional (resolvectl or
        # resolvconf hosts do not write it).
        paths.append(Path("-" + str(dns.resolv_conf)))
    return paths


def daemon_unit(
    config: Config,
    python: str,
    *,
    watchdog_s: int = WATCHDOG_S,
    docs: str = "/usr/share/doc/tunlock",
    program: Iterable[Path] = (),
) -> str:
    """The text of ``tunlock.service`` for this configuration, run by ``python``; ``program``:
    the paths the program lives in (``program_paths``), shown to it where the sandbox hides them."""
    writes = writable_paths(config)
    sandbox = Sandbox.for_paths(
        [*program, *interpreter_paths(python), *config_paths(config)],
        [Path(str(p).lstrip("-")) for p in writes],
    )
    extra = [p for p in writes if not _under(Path(str(p).lstrip("-")), (*HOME_ROOTS, *TMP_ROOTS))]
    namespace = config.settings.tunnel.namespace
    return DAEMON_UNIT.format(
        ordering=WHOLE_HOST_ORDERING.format(lock_unit=LOCK_UNIT_NAME)
        if namespace is None
        else NAMESPACE_ORDERING,
        exec_start_pre="" if namespace is None else namespace_start_pre(namespace),
        # setns(2) into the namespace needs CAP_SYS_ADMIN; entering network namespaces only.
        sys_admin="" if namespace is None else " CAP_SYS_ADMIN",
        restrict_namespaces="yes" if namespace is None else "net",
        docs=docs,
        lock_unit=LOCK_UNIT_NAME,
        daemon_unit=DAEMON_UNIT_NAME,
        python=python,
        config=config.path.resolve(),
        watchdog=watchdog_s,
        nofile=DESCRIPTORS_WANTED,
        runtime_dirs=f"{DEFAULT_STATE_DIR.name} {WIREGUARD_RUN_DIR.name}",
        read_write_paths=_lines("ReadWritePaths", extra),
        protect_home=sandbox.protect_home,
        bind_paths=sandbox.lines(),
    )


# The [Service] settings that make the sandbox: what a trial run under `systemd-run` must carry
# to show whether the daemon can start in it (the rest says how systemd runs and restarts it).
SANDBOX_KEYS = frozenset(
    [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "BindPaths",
        "BindReadOnlyPaths",
        "ReadWritePaths",
        "CapabilityBoundingSet",
        "AmbientCapabilities",
        "NoNewPrivileges",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "ProtectProc",
        "RestrictAddressFamilies",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RemoveIPC",
        "KeyringMode",
        "SystemCallArchitectures",
        "SystemCallFilter",
        "SystemCallErrorNumber",
        "UMask",
        "LimitCORE",
    ]
)


def sandbox_properties(unit_text: str) -> list[str]:
    """The unit's sandbox as ``systemd-run -p`` arguments (``KEY=VALUE``, in the unit's order)."""
    out: list[str] = []
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key = line.partition("=")[0]
            if key in SANDBOX_KEYS:
                out.append(line)
    return out


def lock_unit(lock_file: Path) -> str:
    """The text of ``tunlock-lock.service``: ``nft -f`` on the exported file, before the network."""
    return BOOT_UNIT.format(nft=NFT, path=lock_file)


def _lines(key: str, values: Iterable[Path]) -> str:
    return "".join(f"{key}={value}\n" for value in values)


def render_all(
    config: Config,
    python: str,
    lock_text: str,
    *,
    lock_file: Path = DEFAULT_LOCK_FILE,
    unit_dir: Path = DEFAULT_UNIT_DIR,
    program: Iterable[Path] = (),
) -> UnitFiles:
    return UnitFiles(
        lock_file=lock_file,
        lock_text=lock_text,
        lock_unit=unit_dir / LOCK_UNIT_NAME,
        lock_unit_text=lock_unit(lock_file),
        daemon_unit=unit_dir / DAEMON_UNIT_NAME,
        daemon_unit_text=daemon_unit(config, python, program=program),
        namespace_mode=config.settings.tunnel.namespace is not None,
    )


# --- namespace mode: a service joined to the namespace (tunlock systemd join) ------------------

JOIN_DROPIN_NAME = "tunlock-namespace.conf"
# A unit name as systemd takes it: name, optional @instance, and a type suffix.
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(service|socket|timer|path)$")

JOIN_DROPIN = """\
# Written by `tunlock systemd join`: {unit}
# runs only inside tunlock's namespace {name}, whose only way out is the tunnel.
# It starts after tunlock.service and stops with it.
# Remove this file (and `systemctl daemon-reload`) to undo.
[Unit]
BindsTo={daemon_unit}
After={daemon_unit}

[Service]
NetworkNamespacePath={netns_path}
# The namespace's resolvers (the tunnel's), as `ip netns exec` shows them.
BindReadOnlyPaths={resolv_conf}:/etc/resolv.conf
"""


def join_unit_name(unit: str) -> str:
    """``unit`` as systemd names it (``.service`` added when there is no suffix); ValueError for
    a name systemd would not take."""
    named = unit
    if not re.search(r"\.(service|socket|timer|path)$", named):
        named = f"{unit}.service"
    if not _UNIT_NAME.match(named) or "/" in named:
        raise ValueError(f"not a unit name: {unit!r}")
    return named


def join_dropin(unit: str, namespace: str, unit_dir: Path = DEFAULT_UNIT_DIR) -> tuple[Path, str]:
    """The drop-in that puts ``unit`` in ``namespace``: its path and its text."""
    named = join_unit_name(unit)
    text = JOIN_DROPIN.format(
        unit=named,
        name=namespace,
        daemon_unit=DAEMON_UNIT_NAME,
        netns_path=NETNS_RUN_DIR / namespace,
        resolv_conf=NETNS_ETC_DIR / namespace / "resolv.conf",
    )
    return unit_dir / f"{named}.d" / JOIN_DROPIN_NAME, text
