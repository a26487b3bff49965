"""``tunlock check``: validate the config and every server file, report file:line problems."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION
from supervisor.config import Config, load_config
from supervisor.errors import ConfigError


def summary(config: Config) -> str:
    """One line: how many servers, endpoints and address families the config holds."""
    endpoints = {s.endpoint for s in config.servers}
    families = sorted({f"IPv{ep.family}" for ep in endpoints})
    inner = sorted({f"IPv{v}" for s in config.servers for v in s.families})
    return (
        f"{config.path}: ok: {len(config.servers)} server{'s' if len(config.servers) != 1 else ''}, "
        f"{len(endpoints)} endpoint{'s' if len(endpoints) != 1 else ''} over {'+'.join(families)}, "
        f"tunnel carries {'+'.join(inner)}"
    )


@click.command()
@CONFIG_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No warnings, no summary: only errors.")
def check(config_path: Path, quiet: bool) -> None:
    """Validate the config and server files.

    Exit 0 with a one-line summary, or 1 with every problem as file:line: reason.
    """
    try:
        config = load_config(config_path, digest_only=True)
    except ConfigError as err:
        for problem in err.problems:
            click.echo(str(problem), err=True)
        errors = sum(1 for p in err.problems if not p.warning)
        click.echo(f"tunlock check: {errors} problem{'s' if errors != 1 else ''}", err=True)
        sys.exit(1)
    if not quiet:
        for warning in config.warnings:
            click.echo(str(warning), err=True)
        click.echo(summary(config))
