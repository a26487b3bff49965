"""The ``tunlock`` command line (click).

The subcommands and their options are a public contract (DESIGN.md, "CLI").
Each lives in the module of its concept and is only registered here. Every
command turns a TunlockError into ``tunlock: <message>`` and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from supervisor import __version__
from supervisor.cli_common import CONFIG_OPTION, load_or_exit

# Subcommands that live in their concept's module, imported only when named: `tunlock check`
# then loads neither the lab nor the lock nor the control client (click's lazy-group pattern).
LAZY_COMMANDS = {
    "check": "supervisor.check:check",
    "status": "supervisor.control.cli:status",
    "rotate": "supervisor.control.cli:rotate",
    "reconnect": "supervisor.control.cli:reconnect",
    "health": "supervisor.control.cli:health",
    "lock": "supervisor.lock.cli:lock",
    "lab": "supervisor.lab.cli:lab",
    "leaktest": "supervisor.leaktest.cli:leaktest",
    "systemd": "supervisor.systemd.cli:systemd",
    "exec": "supervisor.namespace_cli:exec_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module, _, name = LAZY_COMMANDS[cmd_name].partition(":")
            return getattr(importlib.import_module(module), name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--force", is_flag=True, help="Go on even if the lock would cut the SSH session this runs in.")
def run(config_path: Path, log_level: str, log_format: str, force: bool) -> None:
    """Run the daemon in the foreground: keep the lock, then connect.

    SIGTERM/SIGINT stop it (the tunnel goes down, the lock stays in permanent mode); SIGHUP
    reloads the configuration. Exit 2 on a bad configuration, 5 when started from an SSH session
    the lock would cut (lock.admin_tcp; --force overrides), 1 on any other error.
    """
    from supervisor import lean_packages

    # The daemon's resident size is what the light pyroute2 and prometheus_client packages save:
    # they must be in place before anything imports those libraries, which supervisor.daemon does.
    lean_packages.install_all()
    config = load_or_exit(config_path)
    # Namespace mode locks nothing of the host: no SSH session to cut.
    if os.environ.get("SSH_CONNECTION") and config.settings.tunnel.namespace is None:
        from supervisor.lock.configured import policy_from_config
        from supervisor.lock.lockout import refuse_a_lockout

        refuse_a_lockout(policy_from_config(config), force, "run")
    # With the lock already in the kernel (at boot), the tunnel comes up with the standard library
    # before the daemon's code loads; the daemon then adopts it. (Loading that code in a thread
    # meanwhile made both later on two cores: 121 against 89 ms to the tunnel, 228 against 211 ms
    # to the daemon's lock; bench/bench_start.py.)
    from supervisor import early_tunnel

    early = early_tunnel.bring_up(config)
    from supervisor.daemon import run_daemon
    from supervisor.log import configure

    configure(log_level, json=None if log_format == "auto" else log_format == "json")
    early.log()
    sys.exit(run_daemon(config, early.tunnel.wireguard_go if early.tunnel is not None else None))


@main.command()
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    default="tunlock-demo-timeline.png",
    show_default=True,
    help="Where to draw the timeline (states, answered pings, faults); '' for none.",
)
def demo(png: Path) -> None:
    """Build the lab, run the lock in it, inject faults, count leaks, tear down.

    Exit 0 when nothing leaked with the lock in place.
    """
    from supervisor.lab.demo import run_demo

    sys.exit(1 if run_demo(click.echo, png=png if str(png) else None) else 0)


if __name__ == "__main__":
    main()
