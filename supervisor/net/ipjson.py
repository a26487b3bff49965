"""This namespace's links, addresses and routes as ``ip -j`` prints them.

The lock reads them when it is applied (on-link subnets, uplinks, bypassing workloads), from a
worker thread. ``ip -j`` rather than a netlink dump of our own: the lock's readers want the
records exactly as an administrator sees them with ``ip -j``, and each read is a few short child
processes at apply time, not on any hot path. Anything unreadable reads as nothing, which keeps
the lock at its narrowest (the LAN closed, link-local aside).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from msgspec import Struct

_TIMEOUT_S = 5.0


class IpState(Struct, frozen=True):
    """What the lock's readers need of this namespace, read at one moment (``ip -j`` records)."""

    addresses: list[dict[str, Any]]
    links: list[dict[str, Any]]  # with details (-d): link kinds, bridge ports
    routes: list[dict[str, Any]]  # the main table's IPv4 and IPv6 routes


def read_ip_state() -> IpState:
    """:class:`IpState` now. The four ``ip`` runs go side by side: run one after the other they
    took ~10 ms, most of the daemon's lock apply at start (~2.5 ms so, issue #27)."""
    addresses, links, routes4, routes6 = ip_json_side_by_side(
        ("addr", "show"),
        ("-d", "link", "show"),
        ("-4", "route", "show", "table", "main"),
        ("-6", "route", "show", "table", "main"),
    )
    return IpState(addresses=addresses, links=links, routes=routes4 + routes6)


def ip_json(*args: str) -> list[dict[str, Any]]:
    """``ip -j ARGS`` parsed; [] when ``ip`` is missing, fails, hangs or prints no list."""
    return ip_json_side_by_side(args)[0]


def ip_json_side_by_side(*commands: Sequence[str]) -> list[list[dict[str, Any]]]:
    """``ip -j`` of each command, all started before any is waited for; each parsed as
    :func:`ip_json` does, all within one timeout."""
    deadline = time.monotonic() + _TIMEOUT_S
    children: list[subprocess.Popen[str] | None] = []
    for args in commands:
        try:
            children.append(
                subprocess.Popen(
                    ["ip", "-j", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
            )
        except OSError:
            children.append(None)
    # Read in turn: a child whose output fills its pipe waits until its turn, never forever.
    return [_parsed(child, deadline) for child in children]


def _parsed(child: subprocess.Popen[str] | None, deadline: float) -> list[dict[str, Any]]:
    if child is None:
        return []
    try:
        out, _ = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return []
    if child.returncode != 0 or not out.strip():
        return []
    try:
        parsed = json.loads(out)
    except json.JSONDecodeError:
        return []
    return parsed if isinstance(parsed, list) else []
