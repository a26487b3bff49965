"""``tunlock check``: validate the config and every server file, report file:line problems."""

from __future__ import annotations

import gc
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION
from supervisor.config import ConfigFile, load_settings
from supervisor.control import socket_path
from supervisor.errors import ConfigError, Problem
from supervisor.wgquick import ServerDigest, digest_servers


@dataclass(frozen=True)
class Checked:
    """A configuration as ``tunlock check`` reads it: the settings ``run`` would use, and a
    digest of each server (what the summary needs, cheap enough to read 10,000 files in
    parallel) where ``run`` holds full Servers."""

    path: Path
    settings: ConfigFile
    servers: tuple[ServerDigest, ...]
    warnings: tuple[Problem, ...]


def read_checked(path: Path, environ: typing.Mapping[str, str] | None = None) -> Checked:
    """``load_config``'s verdict on ``path``: the same problems in the same order (ConfigError),
    or the same warnings, with the servers read as digests."""
    settings = load_settings(path, environ)
    problems = list(settings.problems)
    servers = digest_servers(
        settings.settings.tunnel.servers, settings.path.parent, problems, settings.servers_origin
    )
    warnings = settings.settle(problems, len(servers))
    return Checked(settings.path, settings.settings, servers, warnings)


def summary(checked: Checked) -> str:
    """One line: how many servers, endpoints and address families the config holds."""
    servers = checked.servers
    endpoints = {s.endpoint_key for s in servers}
    families = sorted({f"IPv{key[0]}" for key in endpoints})
    inner = sorted({f"IPv{v}" for s in servers for v in s.families})
    lock = checked.settings.lock
    # The one way in from outside the tunnel, said where an administrator checks before applying.
    admin = (
        f"; administrator's way in: tcp {', '.join(map(str, lock.admin_tcp))} from "
        f"{', '.join(map(str, lock.admin_sources)) or 'anywhere'}"
        if lock.admin_tcp
        else ""
    )
    namespace = checked.settings.tunnel.namespace
    # Namespace mode: said first, since it changes what is locked (the namespace, not the host).
    where = f"; namespace mode: only /run/netns/{namespace} goes through the tunnel" if namespace else ""
    return (
        f"{checked.path}: ok: {len(servers)} server{'s' if len(servers) != 1 else ''}, "
        f"{len(endpoints)} endpoint{'s' if len(endpoints) != 1 else ''} over {'+'.join(families)}, "
        f"tunnel carries {'+'.join(inner)}{where}{admin}"
    )


@click.command()
@CONFIG_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No warnings, no summary: only errors.")
def check(config_path: Path, quiet: bool) -> None:
    """Validate the config and server files.

    Exit 0 with a one-line summary, or 1 with every problem as file:line: reason.
    """
    try:
        config = read_checked(config_path)
    except ConfigError as err:
        _fail(err.problems, [] if quiet else err.warnings)
    try:
        _check_plugins(config)
    except ConfigError as err:
        _fail(err.problems, [] if quiet else [*config.warnings, *err.warnings])
    # Not a key's value but what is at the path: the daemon refuses to replace anything but a
    # leftover socket there, so `check` says so before `run` does.
    socket_problem = socket_path.config_problem(config)
    if socket_problem is not None:
        _fail([socket_problem], [] if quiet else list(config.warnings))
    if not quiet:
        for warning in config.warnings:
            click.echo(str(warning), err=True)
        click.echo(summary(config))
    _exit_soon()


def _check_plugins(config: Checked) -> None:
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


def _fail(problems: list[Problem], warnings: list[Problem]) -> typing.NoReturn:
    """The errors, then the warnings (they are worth fixing in the same edit), then the count."""
    _exit_soon()
    for problem in [*problems, *warnings]:
        click.echo(str(problem), err=True)
    errors = sum(1 for p in problems if not p.warning)
    click.echo(f"tunlock check: {errors} problem{'s' if errors != 1 else ''}", err=True)
    sys.exit(1)


def _exit_soon() -> None:
    """The process ends next: spare it the collector's passes at exit over everything pydantic
    and the check left (speed: bench/bench_check.py); the OS frees it all."""
    gc.freeze()
