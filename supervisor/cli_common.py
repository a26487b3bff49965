"""Options shared by several subcommands."""

from __future__ import annotations

from pathlib import Path

import click

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="TUNLOCK_CONFIG",
    default="/etc/tunlock/tunlock.toml",
    show_default=True,
    help="Path of tunlock.toml (env TUNLOCK_CONFIG).",
)


def not_yet(name: str) -> None:
    import sys

    click.echo(f"tunlock: '{name}' is not implemented yet", err=True)
    sys.exit(2)
