"""``tunlock check``: validate the config and every server file, report file:line problems."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import sys
import typing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION
from supervisor.config import ConfigFile, load_settings
from supervisor.control import socket_path
from supervisor.errors import ConfigError, Problem
from supervisor.net.bypass import BypassWorkload, read_link_facts
from supervisor.wgquick import ServerDigest, matching_files, named_once, read_digests


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


def digest_servers(
    patterns: list[str], base: Path, problems: list[Problem], origin: tuple[Path, int]
) -> tuple[ServerDigest, ...]:
    """``wgquick.load_servers`` for ``tunlock check``: the same files, the same problems in the
    same order, a ServerDigest for each valid server; large directories are read in parallel."""
    paths = matching_files(patterns, base, problems, origin)
    return named_once(paths, _read_in_shares(paths), problems)


# (speed) Reading is CPU-bound, so a directory this large is spread over the cores: this process
# reads one share, forked workers the others, and send back digests (Servers pickle slowly).
PARALLEL_FROM_FILES = 1500


def _read_in_shares(paths: list[str]) -> list[tuple[ServerDigest | None, list[Problem]]]:
    shares = min(len(os.sched_getaffinity(0)), 8)
    parallel = len(paths) >= PARALLEL_FROM_FILES and shares > 1
    if not parallel or "fork" not in mp.get_all_start_methods():
        return _read_share(paths)
    size = -(-len(paths) // shares)
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(max_workers=len(chunks) - 1, mp_context=mp.get_context("fork")) as pool:
        others = [pool.submit(_read_share, chunk) for chunk in chunks[1:]]
        out = _read_share(chunks[0])
        for future in others:
            out.extend(future.result())
    return out


def _read_share(paths: list[str]) -> list[tuple[ServerDigest | None, list[Problem]]]:
    # (speed) Reading makes many small objects and no cycles: the collector rests until the end.
    pause_gc = gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        return read_digests(paths)
    finally:
        if pause_gc:
            gc.enable()


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
        for warning in (*config.warnings, *bypass_warnings(config)):
            click.echo(str(warning), err=True)
        click.echo(summary(config))
    _exit_soon()


def bypass_warnings(
    config: Checked, workloads: typing.Sequence[BypassWorkload] | None = None
) -> list[Problem]:
    """A warning for each workload on this host whose frames skip its netfilter (a macvlan child
    of the uplink, a bridge with the uplink in it): the lock holds them only with its egress
    chain (Linux >= 5.16)."""
    if workloads is None:
        facts = read_link_facts(
            exclude=(config.settings.tunnel.interface,), uplinks=config.settings.lock.uplinks
        )
        workloads = facts.bypass
    return [
        Problem(
            config.path,
            0,
            f"bypass: {w.kind} {w.interface}: {w.detail}; the lock holds it only with its egress "
            "chain on the uplink (Linux >= 5.16: see docs/lock.md)",
            warning=True,
        )
        for w in workloads
    ]


def _check_plugins(config: Checked) -> None:
    """The enabled plugins are installed and take their options (ConfigError otherwise)."""
    section = config.settings.plugins
    if not section.enabled:
        return
    from supervisor import plugins
    from supervisor.config import key_lines

    lines = key_lines(config.path.read_text(encoding="utf-8"))
    plugins.load(section.enabled, section.options, config.path, lines)


def _fail(problems: list[Problem], warnings: list[Problem]) -> typing.NoReturn:
    """The errors, then the warnings (they are worth fixing in the same edit), then the count."""
    _exit_soon()
    for problem in [*problems, *warnings]:
        click.echo(str(problem), err=True)
    errors = sum(1 for p in problems if not p.warning)
    click.echo(f"tunlock check: {errors} problem{'s' if errors != 1 else ''}", err=True)
    sys.exit(1)


def _exit_soon() -> None:
    """The process ends next: spare it the collector's passes at exit over everything the
    imports and the check left (speed: bench/bench_check.py); the OS frees it all."""
    gc.freeze()
