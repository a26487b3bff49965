"""``tunlock status|rotate|reconnect|health``: clients of the daemon's control socket."""

from __future__ import annotations

from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION, not_yet


@click.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for programs.")
def status(config_path: Path, as_json: bool) -> None:
    """Ask the running daemon how it is."""
    not_yet("status")


@click.command()
@CONFIG_OPTION
def rotate(config_path: Path) -> None:
    """Ask the daemon to switch to the next server."""
    not_yet("rotate")


@click.command()
@CONFIG_OPTION
def reconnect(config_path: Path) -> None:
    """Ask the daemon to reconnect to its current server."""
    not_yet("reconnect")


@click.command()
@CONFIG_OPTION
def health(config_path: Path) -> None:
    """Exit 0 when connected (a container healthcheck)."""
    not_yet("health")
