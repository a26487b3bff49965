"""``tunlock lock apply|status|remove|export``: the lock alone, without the daemon."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION, load_or_exit
from supervisor.config import Config
from supervisor.errors import TunlockError
from supervisor.lock import nft
from supervisor.lock.policy import policy_from_config
from supervisor.lock.render import render

BOOT_UNIT = """\
[Unit]
Description=tunlock: block all traffic outside the WireGuard tunnel from early boot
Documentation=man:nft(8)
DefaultDependencies=no
Before=network-pre.target
Wants=network-pre.target
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={nft} -f {path}

[Install]
WantedBy=sysinit.target
"""


def export_text(config: Config) -> str:
    """The nft file that installs the lock at boot: every configured server's endpoint allowed."""
    header = f"#!/usr/sbin/nft -f\n# tunlock lock, exported from {config.path}\n"
    return header + render(policy_from_config(config))


def _load(config_path: Path) -> Config:
    return load_or_exit(config_path, exit_code=1, note="the lock was not changed")


def _fail(err: TunlockError) -> None:
    click.echo(f"tunlock: {err}", err=True)
    sys.exit(1)


@click.group()
def lock() -> None:
    """The lock alone, without the daemon."""


@lock.command()
@CONFIG_OPTION
def apply(config_path: Path) -> None:
    """Install or replace the lock (idempotent): every configured server's endpoint allowed."""
    config = _load(config_path)
    policy = policy_from_config(config)
    try:
        nft.apply(policy)
    except TunlockError as err:
        _fail(err)
    click.echo(
        f"lock installed: table inet {policy.table}, {len(policy.endpoints)} endpoints, "
        f"tunnel {policy.tunnel_interface}, allow_lan={'on' if policy.allow_lan else 'off'}"
    )


@lock.command()
@CONFIG_OPTION
def status(config_path: Path) -> None:
    """Is the lock installed, does it match the config, what has it blocked. Exit 0 if installed."""
    config = _load(config_path)
    policy = policy_from_config(config)
    try:
        state = nft.status(policy.table)
    except TunlockError as err:
        _fail(err)
    if not state.installed:
        click.echo(f"lock: NOT installed (table inet {policy.table} is absent): traffic is not blocked")
        sys.exit(3)
    matches = "matches the config" if state.matches(policy) else "differs from the config (daemon-narrowed?)"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(state.counters.items()))
    click.echo(f"lock: installed, table inet {policy.table}, {matches}; blocked packets: {counts}")


@lock.command()
@CONFIG_OPTION
@click.option("--yes", is_flag=True, help="Confirm: removing the lock lets traffic bypass the tunnel.")
def remove(config_path: Path, yes: bool) -> None:
    """Remove the lock: the only way to open it. Asks for --yes."""
    config = _load(config_path)
    table = config.settings.lock.table
    if not yes:
        click.echo(
            f"tunlock: this deletes table inet {table}; traffic may then leave outside the tunnel "
            "and reveal this host's address. Run again with --yes to do it.",
            err=True,
        )
        sys.exit(2)
    try:
        removed = nft.remove(table)
    except TunlockError as err:
        _fail(err)
    click.echo(
        f"lock removed: table inet {table} deleted"
        if removed
        else f"lock: table inet {table} was not installed"
    )


@lock.command()
@CONFIG_OPTION
@click.option(
    "--output", "-o", type=click.Path(path_type=Path), help="Write the nft file here (default: stdout)."
)
@click.option(
    "--systemd-unit",
    type=click.Path(path_type=Path),
    help="Also write a unit that loads the file before network-pre.target.",
)
def export(config_path: Path, output: Path | None, systemd_unit: Path | None) -> None:
    """Print an nft file that installs the lock at boot (nft -f FILE)."""
    config = _load(config_path)
    text = export_text(config)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        output.chmod(0o644)
    if systemd_unit is not None:
        target = output or Path("/etc/tunlock/lock.nft")
        systemd_unit.write_text(BOOT_UNIT.format(nft="/usr/sbin/nft", path=target))
        click.echo(f"wrote {systemd_unit}: enable it with systemctl enable {systemd_unit.name}", err=True)
