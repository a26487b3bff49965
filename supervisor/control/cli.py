"""``tunlock status|rotate|reconnect|health``: clients of the daemon's control socket."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from supervisor.cli_common import CONFIG_OPTION
from supervisor.config import load_config
from supervisor.control.client import NotRunning, request
from supervisor.control.socket_path import lenient_socket
from supervisor.errors import ConfigError, TunlockError

# Exit statuses a script can tell apart: 3 is the LSB "not running" for status queries.
EXIT_NOT_RUNNING = 3


def socket_of(config_path: Path) -> Path:
    """The daemon's control socket as the configuration names it. A configuration with errors
    does not stop a client (the daemon may run on the version before them): its socket is read
    leniently, and the user told so."""
    try:
        return load_config(config_path).settings.control.socket
    except ConfigError as err:
        path, source = lenient_socket(config_path)
        first = err.problems[0] if err.problems else config_path
        click.echo(
            f"tunlock: note: the configuration has errors ({first}; `tunlock check` lists them); "
            f"asking the daemon on {path} ({source})",
            err=True,
        )
        return path


def _ask(config_path: Path, command: str) -> dict[str, Any]:
    try:
        return request(socket_of(config_path), command)
    except NotRunning as err:
        click.echo(f"tunlock: {err}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except TunlockError as err:
        click.echo(f"tunlock: {err}", err=True)
        sys.exit(1)


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def describe(answer: dict[str, Any], now: float | None = None) -> str:
    """The status answer as a person reads it."""
    now = time.time() if now is None else now
    since = answer.get("since")
    ago = f", for {now - since:.0f} s" if isinstance(since, (int, float)) else ""
    lines = [f"state:     {answer.get('state')}{ago}"]
    if answer.get("reason"):
        lines.append(f"why:       {answer['reason']}")
    if answer.get("server"):
        endpoint = f" ({answer['endpoint']})" if answer.get("endpoint") else ""
        lines.append(f"server:    {answer['server']}{endpoint}")
        age = answer.get("handshake_age_s")
        lines.append(f"handshake: {'none yet' if age is None else f'{age:.0f} s ago'}")
        lines.append(f"traffic:   rx {_size(answer.get('rx_bytes'))}, tx {_size(answer.get('tx_bytes'))}")
    lock = answer.get("lock") or {}
    if lock.get("installed"):
        lock_text = "installed" + ("" if lock.get("matching") else ", but NOT as the daemon set it")
        if lock.get("owned"):
            lock_text += " (and owned: flush-proof while running)"
    else:
        lock_text = "NOT INSTALLED"
    lines.append(f"lock:      {lock_text}")
    if answer.get("namespace"):
        # Namespace mode: the lock and the tunnel are the namespace's; the host is not locked.
        lines.append(f"namespace: {answer['namespace']} (only it goes through the tunnel)")
    for workload in lock.get("bypass") or []:
        covered = (
            f"held by the egress chain on {', '.join(lock['egress'])}"
            if lock.get("egress")
            else "NOT held by the lock (no egress chain here)"
        )
        lines.append(f"bypass:    {workload.get('kind')} {workload.get('interface')}: {covered}")
    failure = answer.get("last_failure")
    if failure:
        who = f"{failure['server']}: " if failure.get("server") else ""
        when = f" ({now - failure['at']:.0f} s ago)" if isinstance(failure.get("at"), (int, float)) else ""
        lines.append(f"last failure: {who}{failure['reason']}{when}")
    return "\n".join(lines)


@click.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for programs.")
def status(config_path: Path, as_json: bool) -> None:
    """Ask the running daemon how it is (exit 3 when it is not running)."""
    answer = _ask(config_path, "status")
    click.echo(json.dumps(answer, sort_keys=True) if as_json else describe(answer))


def _command(config_path: Path, command: str, done: str) -> None:
    answer = _ask(config_path, command)
    if not answer.get("ok"):
        click.echo(f"tunlock: {answer.get('error', 'the daemon refused')}", err=True)
        sys.exit(1)
    click.echo(done)


@click.command()
@CONFIG_OPTION
def rotate(config_path: Path) -> None:
    """Ask the daemon to switch to another server."""
    _command(config_path, "rotate", "rotating: `tunlock status` shows the new server")


@click.command()
@CONFIG_OPTION
def reconnect(config_path: Path) -> None:
    """Ask the daemon to set its current server up afresh."""
    _command(config_path, "reconnect", "reconnecting: `tunlock status` shows the result")


@click.command()
@CONFIG_OPTION
def health(config_path: Path) -> None:
    """Exit 0 when connected, 1 otherwise (a container healthcheck)."""
    try:
        answer = request(socket_of(config_path), "status")
    except TunlockError as err:
        click.echo(f"unhealthy: {err}", err=True)
        sys.exit(1)
    if answer.get("state") != "connected":
        click.echo(f"unhealthy: {answer.get('state')}: {answer.get('reason') or 'not connected'}", err=True)
        sys.exit(1)
    click.echo(f"healthy: connected to {answer.get('server')}")
