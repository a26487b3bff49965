"""Starting wireguard-go: the one way both the daemon's backend and ``tunlock run``'s early
bring-up (supervisor/early_tunnel.py) start it, with nothing but the standard library loaded
(and msgspec, which reading the configuration loaded).

Why it runs in the foreground, in a session of its own, with its output on a datagram socket
pair and a clean environment: supervisor/wireguard/userspace.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from msgspec import Struct

DEFAULT_BINARY = "wireguard-go"
# Where it serves its UAPI socket, ``<interface>.sock`` (supervisor/wireguard/uapi.py speaks it).
UAPI_DIR = Path("/var/run/wireguard")
_CHILD_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")


class StartedWireguardGo(Struct):
    """A wireguard-go we started: our child, and our end of its output."""

    popen: subprocess.Popen[bytes]
    output: socket.socket

    @property
    def pid(self) -> int:
        return self.popen.pid


def child_env(log_level: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV_KEEP}
    env.update(WG_PROCESS_FOREGROUND="1", LOG_LEVEL=log_level)
    return env


def start_wireguard_go(
    ifname: str,
    *,
    binary: str = DEFAULT_BINARY,
    log_level: str = "error",
    spawn: Callable[[Callable[[], subprocess.Popen[bytes]]], subprocess.Popen[bytes]] | None = None,
) -> StartedWireguardGo:
    """Start wireguard-go for ``ifname`` (it creates the interface); OSError when it cannot be
    run. ``spawn`` runs the fork elsewhere (namespace mode forks from a thread in the host's
    namespace, so that its UDP socket is there); by default here."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)

    def start() -> subprocess.Popen[bytes]:
        # Popen, not an async process API: the child must outlive us in its own session and is
        # followed through a pidfd; the fork and exec of one small binary take microseconds.
        return subprocess.Popen(
            [binary, "-f", ifname],
            stdin=subprocess.DEVNULL,
            stdout=theirs.fileno(),
            stderr=theirs.fileno(),
            env=child_env(log_level),
            start_new_session=True,
            close_fds=True,
        )

    try:
        popen = spawn(start) if spawn is not None else start()
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return StartedWireguardGo(popen, ours)
