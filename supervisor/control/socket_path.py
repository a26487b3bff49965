"""Whether the ``[control] socket`` path can hold the daemon's socket (no I/O beyond ``lstat``).

The daemon replaces a socket file that no daemon answers on (a crashed daemon's leftover) and
nothing else: a path naming a regular file, a directory, a link or a device is a mistake in the
configuration, and deleting what is there would turn the mistake into lost data (issue #11).
``tunlock check`` and ``tunlock run`` report it as a configuration error instead.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from supervisor.config import ENV_PREFIX, ConfigFile, ControlSection, key_lines
from supervisor.errors import Problem

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a socket")


def problem(path: Path) -> str | None:
    """Why ``path`` cannot be the control socket, or None: absent (its directory may be made)
    or a socket (live: another daemon, which the daemon itself refuses; stale: replaced)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        for ancestor in path.parents:
            try:
                if not stat.S_ISDIR(os.stat(ancestor).st_mode):
                    return f"{ancestor} is not a directory"
                return None
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as err:
                return f"cannot look at {ancestor}: {err.strerror or err}"
        return None
    except OSError as err:
        return f"cannot look at it: {err.strerror or err}"
    if stat.S_ISSOCK(mode):
        return None
    return (
        f"exists and is {kind_of(mode)}, not a socket; tunlock replaces only a leftover socket, "
        "never another file: name another path, or remove what is there"
    )


class _Configured(Protocol):
    """A validated configuration: a Config, or what ``tunlock check`` reads (check.Checked)."""

    @property
    def path(self) -> Path: ...

    @property
    def settings(self) -> ConfigFile: ...


def config_problem(config: _Configured, environ: dict[str, str] | None = None) -> Problem | None:
    """``problem`` for ``config``'s socket, as ``file:line: control.socket: ...``."""
    path = config.settings.control.socket
    why = problem(path)
    if why is None:
        return None
    env_name = f"{ENV_PREFIX}CONTROL_SOCKET"
    if env_name in (os.environ if environ is None else environ):
        return Problem(Path(f"env {env_name}"), 0, f"control.socket {path}: {why}")
    try:
        line = key_lines(config.path.read_text(encoding="utf-8", errors="replace")).get(
            ("control", "socket"), 0
        )
    except OSError:
        line = 0
    return Problem(config.path, line, f"control.socket {path}: {why}")


_SOCKET_LINE = re.compile(r"""^\s*socket\s*=\s*(?:"([^"\\]*)"|'([^']*)')\s*(?:#.*)?$""")


def lenient_socket(config_path: Path, environ: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """The control socket when the configuration as a whole does not validate, and where the
    answer came from: the environment, else ``[control] socket`` as far as it can be read
    (the TOML parsed, else its line found), else the default. For clients only (``status``,
    ``health``...): a broken file elsewhere must not stop them asking a daemon that runs."""
    environ = os.environ if environ is None else environ
    override = environ.get(f"{ENV_PREFIX}CONTROL_SOCKET")
    if override:
        return _relative_to(config_path, override), f"env {ENV_PREFIX}CONTROL_SOCKET"
    try:
        text = config_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    try:
        control = tomllib.loads(text).get("control")
        value = control.get("socket") if isinstance(control, dict) else None
        if isinstance(value, str) and value:
            return _relative_to(config_path, value), f"[control] socket in {config_path}"
        if value is None:
            return _default(), "the default"
    except tomllib.TOMLDecodeError:
        section = ""
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("[") and not stripped.startswith("[["):
                section = stripped.strip("[] ").split("]")[0].strip()
            elif section == "control" and (match := _SOCKET_LINE.match(line)):
                value = match.group(1) or match.group(2)
                if value:
                    return _relative_to(config_path, value), f"{config_path}:{number}"
    return _default(), "the default"


def _default() -> Path:
    return ControlSection().socket


def _relative_to(config_path: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else config_path.parent / path
