"""The ``tunlock`` command line (click).

The subcommands and their options are a public contract (DESIGN.md, "CLI").
Each lives in the module of its concept and is only registered here. Every
command turns a TunlockError into ``tunlock: <message>`` and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from supervisor import __version__
from supervisor.check import check
from supervisor.cli_common import CONFIG_OPTION, load_or_exit
from supervisor.control.cli import health, reconnect, rotate, status
from supervisor.lab.cli import lab
from supervisor.lock.cli import lock


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunlock")
def main() -> None:
    """WireGuard supervisor with a kill switch that never opens."""


@main.command()
@CONFIG_OPTION
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="TUNLOCK_LOG_LEVEL",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="auto: JSON unless stderr is a terminal.",
)
def run(config_path: Path, log_level: str, log_format: str) -> None:
    """Run the daemon in the foreground: keep the lock, then connect.

    SIGTERM/SIGINT stop it (the tunnel goes down, the lock stays in permanent mode); SIGHUP
    reloads the configuration. Exit 2 on a bad configuration, 1 on any other error.
    """
    from supervisor.daemon import run_daemon
    from supervisor.log import configure

    configure(log_level, json=None if log_format == "auto" else log_format == "json")
    config = load_or_exit(config_path)
    sys.exit(run_daemon(config))


@main.command()
def demo() -> None:
    """Build the lab, run the lock in it, inject faults, count leaks, tear down.

    Exit 0 when nothing leaked with the lock in place.
    """
    from supervisor.lab.demo import run_demo

    sys.exit(1 if run_demo(click.echo) else 0)


for command in (check, status, rotate, reconnect, health, lock, lab):
    main.add_command(command)
if __name__ == "__main__":
    main()
