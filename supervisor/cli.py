"""The ``tunlock`` command line (click).

The subcommands and their options are a public contract (DESIGN.md, "CLI").
Each command turns a TunlockError into ``tunlock: <message>`` and exit 1, never
a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from supervisor import __version__

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="TUNLOCK_CONFIG",
    default="/etc/tunlock/tunlock.toml",
    show_default=True,
    help="Path of tunlock.toml.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunlock")
def main() -> None:
    """WireGuard supervisor with a kill switch that never opens."""


def _not_yet(name: str) -> None:
    click.echo(f"tunlock: '{name}' is not implemented yet", err=True)
    sys.exit(2)


@main.command()
@CONFIG_OPTION
def run(config_path: Path) -> None:
    """Run the daemon in the foreground: keep the lock, then connect."""
    _not_yet("run")


@main.command()
@CONFIG_OPTION
def check(config_path: Path) -> None:
    """Validate the config and server files."""
    _not_yet("check")


@main.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for programs.")
def status(config_path: Path, as_json: bool) -> None:
    """Ask the running daemon how it is."""
    _not_yet("status")


@main.command()
@CONFIG_OPTION
def rotate(config_path: Path) -> None:
    """Ask the daemon to switch to the next server."""
    _not_yet("rotate")


@main.command()
@CONFIG_OPTION
def reconnect(config_path: Path) -> None:
    """Ask the daemon to reconnect to its current server."""
    _not_yet("reconnect")


@main.command()
@CONFIG_OPTION
def health(config_path: Path) -> None:
    """Exit 0 when connected (a container healthcheck)."""
    _not_yet("health")


@main.group()
def lock() -> None:
    """The lock alone, without the daemon."""


@main.command()
def demo() -> None:
    """Build the lab, run the supervisor in it, inject faults, count leaks, tear down."""
    _not_yet("demo")


@main.group()
def lab() -> None:
    """The lab by hand: namespaces with WireGuard servers, an ISP observer and faults."""
