"""The host's resolvers: pointed at the tunnel's while connected, put back on exit.

Three ways a Linux host keeps its resolvers, tried in this order:

- **systemd-resolved** (``/etc/resolv.conf`` links into ``/run/systemd/resolve``):
  the tunnel's servers become the tunnel link's DNS with the ``~.`` routing
  domain, so every name goes to them (``resolvectl``); the settings belong to the
  link and vanish with it.
- **resolvconf** (Debian's or openresolv): the tunnel's servers are registered
  as the interface's record, exclusive, as wg-quick does (``resolvconf -a``),
  and deregistered on exit (``resolvconf -d``).
- **the file itself** (containers, minimal hosts): the current content is
  saved once to a backup file beside our other state, the file is rewritten in
  place (a container's ``/etc/resolv.conf`` is a bind mount, which cannot be
  replaced by a rename), and the backup is written back on exit. The backup
  survives a crash, so a restarted daemon still restores the original.

The first two run a program (the only supported interface of those tools);
the file method is plain I/O. Whatever the method, the lock is what keeps DNS
inside the tunnel; this module only makes names resolve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from supervisor.errors import TunlockError
from supervisor.log import get_logger
from supervisor.servers import IPAddress

log = get_logger(__name__)

DEFAULT_STATE_DIR = Path("/run/tunlock")
_RESOLVED_DIR = Path("/run/systemd/resolve")
_COMMAND_TIMEOUT_S = 5.0
_HEADER = "# written by tunlock: the tunnel's resolvers; the original comes back when tunlock stops\n"


class DnsError(TunlockError):
    """The host's resolvers could not be set or restored."""


class DnsManager(Protocol):
    """Points the host at the tunnel's resolvers and back."""

    method: str

    def apply(self, servers: Sequence[IPAddress]) -> None: ...

    def restore(self) -> None: ...


def written_by_tunlock(text: str) -> bool:
    """Whether a resolv.conf text is one tunlock wrote (the tunnel's resolvers, not the host's)."""
    return text.startswith(_HEADER)


def render_resolv_conf(servers: Sequence[IPAddress]) -> str:
    """A resolv.conf naming only ``servers`` (the resolver library reads at most three)."""
    return _HEADER + "".join(f"nameserver {s}\n" for s in servers)


class ResolvConfFile:
    """Rewrites a resolv.conf in place and keeps the original in a backup file until restore."""

    method = "file"

    def __init__(self, path: Path, backup: Path) -> None:
        self.path = path
        self.backup = backup

    def apply(self, servers: Sequence[IPAddress]) -> None:
        wanted = render_resolv_conf(servers)
        try:
            current = self.path.read_text() if self.path.exists() else ""
            if not self.backup.exists():
                if current.startswith(_HEADER):
                    # Ours from an earlier run whose backup is gone: nothing true to save.
                    log.warning("resolv.conf is tunlock's but no backup exists", path=str(self.path))
                else:
                    self.backup.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    _write_new(self.backup, current)
            if current != wanted:
                _write_in_place(self.path, wanted)
        except OSError as err:
            raise DnsError(f"cannot set the resolvers in {self.path}: {err.strerror or err}") from None
        log.info("resolvers set", method=self.method, servers=[str(s) for s in servers])

    def reassert(self, servers: Sequence[IPAddress]) -> bool:
        """Write the tunnel's resolvers back if someone (a DHCP client, a person) replaced them;
        what they wrote becomes the backup restored on exit. Whether the file was written."""
        wanted = render_resolv_conf(servers)
        try:
            current = self.path.read_text() if self.path.exists() else ""
            if current == wanted:
                return False
            if not current.startswith(_HEADER):
                self.backup.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                _write_new(self.backup, current)
            _write_in_place(self.path, wanted)
        except OSError as err:
            raise DnsError(f"cannot set the resolvers in {self.path}: {err.strerror or err}") from None
        log.warning(
            "resolv.conf was rewritten by someone else; the tunnel's resolvers put back", path=str(self.path)
        )
        return True

    def restore(self) -> None:
        if not self.backup.exists():
            return
        try:
            original = self.backup.read_text()
            if self.path.exists() and self.path.read_text() == original:
                pass
            elif not self.path.exists() or self.path.read_text().startswith(_HEADER):
                _write_in_place(self.path, original)
            else:
                # Someone else (DHCP, a person) wrote it since: theirs is newer than our backup.
                log.warning("resolv.conf was changed by someone else; leaving it", path=str(self.path))
            self.backup.unlink()
        except OSError as err:
            raise DnsError(f"cannot restore {self.path}: {err.strerror or err}") from None
        log.info("resolvers restored", method=self.method)


def _write_in_place(path: Path, text: str) -> None:
    # One write() of a small file: no rename, so bind mounts and symlinked files stay intact.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_new(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


Runner = Callable[[list[str], str | None], None]


def run_command(argv: list[str], stdin: str | None = None) -> None:
    """Run a DNS tool; DnsError with its own message when it fails."""
    try:
        subprocess.run(
            argv, input=stdin, text=True, capture_output=True, check=True, timeout=_COMMAND_TIMEOUT_S
        )
    except subprocess.CalledProcessError as err:
        said = (err.stderr or err.stdout or "").strip().splitlines()
        raise DnsError(f"{argv[0]} failed: {said[-1] if said else f'exit {err.returncode}'}") from None
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DnsError(f"cannot run {argv[0]}: {err}") from None


class Resolvectl:
    """systemd-resolved: per-link DNS with the catch-all routing domain."""

    method = "systemd-resolved"

    def __init__(self, ifname: str, run: Runner = run_command, binary: str = "resolvectl") -> None:
        self.ifname = ifname
        self._run = run
        self._binary = binary

    def apply(self, servers: Sequence[IPAddress]) -> None:
        self._run([self._binary, "dns", self.ifname, *(str(s) for s in servers)], None)
        self._run([self._binary, "domain", self.ifname, "~."], None)
        self._run([self._binary, "default-route", self.ifname, "true"], None)
        log.info("resolvers set", method=self.method, servers=[str(s) for s in servers])

    def restore(self) -> None:
        try:
            self._run([self._binary, "revert", self.ifname], None)
        except DnsError as err:
            log.info("nothing to revert", method=self.method, detail=str(err))  # the link is gone


class Resolvconf:
    """resolvconf (Debian's, openresolv, or systemd's compatibility program)."""

    method = "resolvconf"

    def __init__(self, ifname: str, run: Runner = run_command, binary: str = "resolvconf") -> None:
        self.record = f"tun.{ifname}"  # the prefix resolvconf's interface-order ranks first
        self._run = run
        self._binary = binary

    def apply(self, servers: Sequence[IPAddress]) -> None:
        self._run([self._binary, "-a", self.record, "-m", "0", "-x"], render_resolv_conf(servers))
        log.info("resolvers set", method=self.method, servers=[str(s) for s in servers])

    def restore(self) -> None:
        try:
            self._run([self._binary, "-d", self.record, "-f"], None)
        except DnsError as err:
            log.warning("cannot deregister the tunnel's resolvers", method=self.method, detail=str(err))


def detect_dns_manager(
    ifname: str,
    resolv_conf: Path = Path("/etc/resolv.conf"),
    state_dir: Path = DEFAULT_STATE_DIR,
    which: Callable[[str], str | None] = shutil.which,
    resolved_dir: Path = _RESOLVED_DIR,
) -> DnsManager:
    """The way this host keeps its resolvers (see the module docstring for the order)."""
    backup = state_dir / f"{ifname}.resolv.conf.orig"
    if resolv_conf != Path("/etc/resolv.conf"):
        return ResolvConfFile(resolv_conf, backup)  # a file was named explicitly: use it
    target = resolv_conf.resolve() if resolv_conf.is_symlink() else resolv_conf
    resolvectl = which("resolvectl")
    if resolvectl and target.is_relative_to(resolved_dir):
        return Resolvectl(ifname, binary=resolvectl)
    resolvconf = which("resolvconf")
    if resolvconf:
        return Resolvconf(ifname, binary=resolvconf)
    return ResolvConfFile(resolv_conf, backup)
