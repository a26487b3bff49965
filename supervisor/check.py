"""``tunlock check``: validate the config and every server file, report file:line problems."""

from __future__ import annotations

from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION, not_yet


@click.command()
@CONFIG_OPTION
def check(config_path: Path) -> None:
    """Validate the config and server files."""
    not_yet("check")
