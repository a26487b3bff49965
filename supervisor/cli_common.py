"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from supervisor.config import Config, load_config
from supervisor.errors import ConfigError

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="TUNLOCK_CONFIG",
    default="/etc/tunlock/tunlock.toml",
    show_default=True,
    help="Path of tunlock.toml (env TUNLOCK_CONFIG).",
)


def load_or_exit(config_path: Path, *, exit_code: int = 2, note: str | None = None) -> Config:
    """The configuration, or every problem as ``file:line: reason`` on stderr (then ``note``)
    and exit ``exit_code``."""
    try:
        return load_config(config_path)
    except ConfigError as err:
        for problem in err.problems:
            click.echo(str(problem), err=True)
        if note:
            click.echo(f"tunlock: {note}", err=True)
        sys.exit(exit_code)


def namespace_or_exit(config: Config, does: str) -> str:
    """``tunnel.namespace``; without one, exit 2 saying that the command ``does`` something in
    namespace mode's namespace, which this configuration does not have."""
    name = config.settings.tunnel.namespace
    if name is None:
        click.echo(
            f"tunlock: {config.path}: tunnel.namespace is not set: {does} in namespace mode's "
            "namespace, and this configuration locks the whole host",
            err=True,
        )
        sys.exit(2)
    return name
