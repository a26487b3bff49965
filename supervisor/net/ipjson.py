"""This namespace's links, addresses and routes as ``ip -j`` prints them.

The lock reads them when it is applied (on-link subnets, uplinks, bypassing workloads), from a
worker thread. ``ip -j`` rather than a netlink dump of our own: the lock's readers want the
records exactly as an administrator sees them with ``ip -j``, and each read is one short child
process at apply time, not on any hot path. Anything unreadable reads as nothing, which keeps the
lock at its narrowest (the LAN closed, link-local aside).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

_TIMEOUT_S = 5.0


def ip_json(*args: str) -> list[dict[str, Any]]:
    """``ip -j ARGS`` parsed; [] when ``ip`` is missing, fails, hangs or prints no list."""
    try:
        done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0 or not done.stdout.strip():
        return []
    try:
        parsed = json.loads(done.stdout)
    except json.JSONDecodeError:
        return []
    return parsed if isinstance(parsed, list) else []


def main_routes() -> list[dict[str, Any]]:
    """The main table's IPv4 and IPv6 routes."""
    return ip_json("-4", "route", "show", "table", "main") + ip_json("-6", "route", "show", "table", "main")
