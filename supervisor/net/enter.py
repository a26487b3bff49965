"""``tunlock exec``: a command run inside namespace mode's namespace, as ``ip netns exec`` would.

The process enters a mount namespace of its own (a slave of the host's, so nothing it mounts
goes back) in which the namespace's ``resolv.conf`` is bound over ``/etc/resolv.conf`` and
``/sys`` shows the namespace's interfaces; then the network namespace; then it drops root to
``--user`` (supplementary groups, group, user, in that order, so none of root's stays) and
replaces itself with the command. The command's exit status is tunlock's.

Python 3.11 has no ``os.unshare`` (3.12 has), and pyroute2 enters network namespaces but not
mount namespaces, so ``unshare`` and ``mount`` are called through libc here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

from supervisor.errors import TunlockError
from supervisor.net.netns import namespace_path, netns_id, resolv_conf_path

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 0x1
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 0x2


class ExecError(TunlockError):
    """The command cannot be started inside the namespace; the message says why."""


@dataclass(frozen=True)
class Identity:
    """Who the command runs as after root is dropped."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @classmethod
    def of(cls, user: str) -> Identity:
        """``user`` by name or number, from the password database (ExecError if unknown)."""
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, ValueError):
            raise ExecError(f"no such user: {user}") from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with the variables a login of this user would set."""
        return {**base, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise ExecError(f"{what}: {os.strerror(errno)}")


def _private_mounts(name: str) -> None:
    """A mount namespace of our own with the namespace's resolv.conf and sysfs, as ip netns exec."""
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "cannot make a mount namespace")
    _check(libc.mount(b"none", b"/", None, _MS_SLAVE | _MS_REC, None), "cannot make / a slave mount")
    resolv = resolv_conf_path(name)
    if resolv.is_file() and Path("/etc/resolv.conf").exists():
        source, target = str(resolv).encode(), os.path.realpath("/etc/resolv.conf").encode()
        bound = libc.mount(source, target, None, _MS_BIND, None)
        _check(bound, f"cannot bind {resolv} over /etc/resolv.conf")


def _namespace_sysfs(name: str) -> None:
    """/sys for the namespace just entered: its own interfaces under /sys/class/net. Best effort
    (a read-only or absent /sys leaves the host's, which only tools that read it would notice)."""
    libc = _libc()
    if libc.umount2(b"/sys", _MNT_DETACH) == 0:
        libc.mount(name.encode(), b"/sys", b"sysfs", _MS_RDONLY, None)


def enter_namespace(name: str) -> None:
    """Move this (single-threaded) process into namespace ``name`` with its resolv.conf."""
    path = namespace_path(name)
    try:
        pinned = netns_id(path)[0] == netns_id("/proc/self/ns/net")[0]
    except OSError:
        pinned = False
    if not pinned:
        raise ExecError(f"namespace {name} does not exist ({path}): start tunlock first")
    _private_mounts(name)
    try:
        pyroute2_netns.setns(str(path), flags=0)
    except OSError as err:
        raise ExecError(f"cannot enter namespace {name}: {err.strerror or err}") from None
    _namespace_sysfs(name)


def drop_to(identity: Identity) -> None:
    """Become ``identity`` for good: supplementary groups, then group, then user."""
    os.initgroups(identity.name, identity.gid)
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if os.getuid() != identity.uid or os.geteuid() != identity.uid:
        raise ExecError(f"could not drop root to {identity.name}")


def exec_in_namespace(name: str, command: Sequence[str], user: str | None = None) -> None:
    """Replace this process with ``command`` inside namespace ``name`` (as ``user``, if given)."""
    if not command:
        raise ExecError("no command given: tunlock exec --config PATH -- CMD [ARGS...]")
    identity = Identity.of(user) if user is not None else None
    enter_namespace(name)
    env = dict(os.environ)
    if identity is not None:
        drop_to(identity)
        env = identity.environment(env)
        os.chdir(identity.home if os.path.isdir(identity.home) else "/")
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as err:
        raise ExecError(f"cannot run {command[0]}: {err.strerror or err}") from None
