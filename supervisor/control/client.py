"""Asking the daemon over its control socket (blocking: the CLI has nothing else to do)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from supervisor.errors import TunlockError

TIMEOUT_S = 5.0


class NotRunning(TunlockError):
    """No daemon answers on the control socket."""


def request(path: Path, command: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Send ``{"command": command}`` and return the daemon's answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"tunlock is not running: no daemon answers on {path}") from None
        except PermissionError:
            raise TunlockError(f"{path}: permission denied (the control socket is root's)") from None
        except (OSError, ValueError) as err:  # not a socket, a name too long, a NUL in it...
            raise TunlockError(
                f"cannot reach the daemon on {path}: {getattr(err, 'strerror', None) or err}"
            ) from None
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise TunlockError(f"the daemon did not answer within {timeout:g} s") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise TunlockError(f"the daemon answered something that is not JSON: {data[:80]!r}") from None
    if not isinstance(answer, dict):
        raise TunlockError("the daemon's answer is not a JSON object")
    return answer
