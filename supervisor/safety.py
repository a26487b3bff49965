"""Refusing to lock the machine we work on.

Applying the lock in the machine's own network namespace cuts it off the
network. On development and CI machines every test, the lab and the demo set
``TUNLOCK_LAB_ONLY=1``; with it set, anything that installs a lock or starts the
daemon must first prove it runs inside a namespace the lab created.
"""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.errors import SafetyError

LAB_ONLY_ENV = "TUNLOCK_LAB_ONLY"
# Every namespace a lab creates is named "<LAB_NETNS_PREFIX><instance>-<role>".
LAB_NETNS_PREFIX = "tlab"
NETNS_DIR = Path("/run/netns")


def _netns_inode(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def current_lab_namespace() -> str | None:
    """Name of the lab namespace this process is in, or None (the host, or any other)."""
    # thread-self: a thread may have entered a namespace of its own (setns is per thread).
    here = _netns_inode("/proc/thread-self/ns/net")
    try:
        if here == _netns_inode("/proc/1/ns/net"):
            return None
    except PermissionError:
        pass  # sandboxes may hide PID 1's namespace: the lab-name match below still decides
    if not NETNS_DIR.is_dir():
        return None
    for entry in NETNS_DIR.iterdir():
        if entry.name.startswith(LAB_NETNS_PREFIX):
            try:
                if _netns_inode(entry) == here:
                    return entry.name
            except OSError:
                continue
    return None


def lab_only() -> bool:
    return os.environ.get(LAB_ONLY_ENV, "") not in ("", "0")


def ensure_safe_to_lock() -> None:
    """Raise SafetyError when lab-only mode is on and this is not a lab namespace."""
    if lab_only() and current_lab_namespace() is None:
        raise SafetyError(
            f"{LAB_ONLY_ENV} is set and this process is not in a lab network namespace "
            f"({NETNS_DIR}/{LAB_NETNS_PREFIX}*): refusing to install a lock here, it could cut "
            "this machine off the network"
        )
