"""``tunlock check``: validate the config and every server file, report file:line problems."""

from __future__ import annotations

import gc
import sys
import typing
from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION
from supervisor.config import Config, load_config
from supervisor.control import socket_path
from supervisor.errors import ConfigError, Problem
from supervisor.servers import ServerDigest


def summary(config: Config) -> str:
    """One line: how many servers, endpoints and address families the config holds.

    ``config`` is what ``load_config(..., digest_only=True)`` returns.
    """
    servers = typing.cast(tuple[ServerDigest, ...], config.servers)
    endpoints = {s.endpoint_key for s in servers}
    families = sorted({f"IPv{key[0]}" for key in endpoints})
    inner = sorted({f"IPv{v}" for s in servers for v in s.families})
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
        _fail(err.problems)
    try:
        _check_plugins(config)
    except ConfigError as err:
        _fail(err.problems)
    # Not a key's value but what is at the path: the daemon refuses to replace anything but a
    # leftover socket there, so `check` says so before `run` does.
    socket_problem = socket_path.config_problem(config)
    if socket_problem is not None:
        _fail([socket_problem])
    if not quiet:
        for warning in config.warnings:
            click.echo(str(warning), err=True)
        click.echo(summary(config))
    _exit_soon()


def _check_plugins(config: Config) -> None:
    """The enabled plugins are installed and take their options (ConfigError otherwise)."""
    section = config.settings.plugins
    if not section.enabled:
        return
    from supervisor import plugins
    from supervisor.config import key_lines
    from supervisor.errors import Problem

    lines = key_lines(config.path.read_text(encoding="utf-8"))
    plugins.load(
        section.enabled,
        section.options,
        lambda name: Problem(
            config.path, lines.get(("plugins", name)) or lines.get(("plugins", "enabled"), 0), ""
        ),
    )


def _fail(problems: list[Problem]) -> typing.NoReturn:
    _exit_soon()
    for problem in problems:
        click.echo(str(problem), err=True)
    errors = sum(1 for p in problems if not p.warning)
    click.echo(f"tunlock check: {errors} problem{'s' if errors != 1 else ''}", err=True)
    sys.exit(1)


def _exit_soon() -> None:
    """The process ends next: spare it the collector's passes at exit over everything pydantic
    and the check left (0.1 s of a 10,000-file check, a tenth of it); the OS frees it all."""
    gc.freeze()
