"""``tunlock exec``: namespace mode's way in for a command (docs/namespace.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION, load_or_exit, namespace_or_exit
from supervisor.errors import TunlockError


@click.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@CONFIG_OPTION
@click.option("--user", "-u", default=None, help="Run as this user (name or uid) instead of root.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(config_path: Path, user: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND inside the namespace of tunnel.namespace, with its resolvers.

    The command sees only the namespace's loopback and the tunnel: nothing it sends can leave
    any other way. Its exit status is tunlock's; 2 for a configuration without a namespace, 1
    when the namespace cannot be entered.
    """
    from supervisor.net.enter import exec_in_namespace

    config = load_or_exit(config_path)
    name = namespace_or_exit(config, "exec runs commands")
    try:
        exec_in_namespace(name, command, user)
    except TunlockError as err:
        click.echo(f"tunlock: {err}", err=True)
        sys.exit(1)
