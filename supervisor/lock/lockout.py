"""The lockout guard's I/O: the SSH session this command runs in, this namespace's addresses, and
the refusal. The decision is ``supervisor.lock.admin.lockout`` (pure, unit-tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
from msgspec.structs import replace

from supervisor.lock.admin import SshSession, addresses_from_ip_json, lockout
from supervisor.lock.onlink import read_onlink
from supervisor.lock.policy import LockPolicy
from supervisor.servers import IPAddress

# The exit status of a command the guard refused (documented in docs/operations.md).
LOCKOUT_EXIT = 5
FORCE_HELP = "Go on even if the lock would cut the SSH session this command runs in."


def read_addresses() -> dict[IPAddress, str]:
    """This network namespace's addresses and their interfaces (empty if ``ip`` cannot tell)."""
    try:
        done = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5)
        return addresses_from_ip_json(json.loads(done.stdout or "[]"))
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return {}


def refuse_a_lockout(policy: LockPolicy, force: bool, what: str) -> None:
    """Exit with LOCKOUT_EXIT when ``what`` would install ``policy`` and cut this SSH session,
    unless ``force`` (then say so and go on)."""
    connection = os.environ.get("SSH_CONNECTION")
    if not connection:
        return
    # Addresses that cannot be read: judged as if the session came in here (the safe side).
    addresses = read_addresses() or _as_if_local(connection)
    judged = replace(policy, onlink=read_onlink(exclude=(policy.tunnel_interface,)))
    reason = lockout(judged, connection, addresses)
    if reason is None:
        return
    if force:
        click.echo(f"tunlock: warning: {reason}; going on (--force)", err=True)
        return
    click.echo(f"tunlock: {what} refused: {reason}", err=True)
    sys.exit(LOCKOUT_EXIT)


def _as_if_local(connection: str) -> dict[IPAddress, str]:
    session = SshSession.parse(connection)
    return {session.server: ""} if session is not None else {}
