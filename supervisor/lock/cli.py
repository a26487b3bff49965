"""``tunlock lock apply|status|remove|export``: the lock alone, without the daemon."""

from __future__ import annotations

import socket
import struct
import sys
import time
from pathlib import Path
from typing import NoReturn

import click
from msgspec.structs import replace

from supervisor.cli_common import CONFIG_OPTION, load_or_exit
from supervisor.config import Config
from supervisor.errors import TunlockError
from supervisor.lock import confirm, nft
from supervisor.lock.configured import policy_from_config
from supervisor.lock.links import AppliedLinks, egress_in_force
from supervisor.lock.lockout import FORCE_HELP, refuse_a_lockout
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import EGRESS_COUNTER, render

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
    # No egress table at boot: the file knows no links (docs/lock.md, "At boot").
    return header + render(replace(policy_from_config(config), netdev=False))


def running_daemon(socket_path: Path) -> int | None:
    """The PID of a daemon listening on ``socket_path`` (0 if it cannot be told), or None.

    A connect, no request: the kernel completes a connection to a listening Unix socket
    whatever the daemon's event loop is doing, so a busy or stuck daemon is found as surely
    as an idle one, and a socket file left by a dead daemon refuses. SO_PEERCRED names the
    listener's PID. (A pid file under flock would need the daemon to hold one; the listening
    socket is already that: it lives exactly as long as the daemon's process.)
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None
        except (BlockingIOError, TimeoutError):
            return 0  # a full backlog: something is listening
        except OSError:
            return None
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return 0
        return struct.unpack("3i", creds)[0]


def _load(config_path: Path, *, inside: bool = True) -> Config:
    """The configuration; in namespace mode (``inside``) this process then works in the
    namespace: the lock is the namespace's, the host's own networking is never touched."""
    config = load_or_exit(config_path, exit_code=1, note="the lock was not changed")
    name = config.settings.tunnel.namespace
    if inside and name is not None:
        from supervisor.net import netns

        try:
            netns.enter(name)
        except TunlockError as err:
            _fail(err)
    return config


def _fail(err: TunlockError) -> NoReturn:
    click.echo(f"tunlock: {err}", err=True)
    sys.exit(1)


@click.group()
def lock() -> None:
    """The lock alone, without the daemon."""


@lock.command()
@CONFIG_OPTION
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option(
    "--confirm-within",
    type=click.FloatRange(min=1, max=86400),
    metavar="SECONDS",
    help="Put the previous lock (or none) back unless `tunlock lock confirm` runs within SECONDS.",
)
def apply(config_path: Path, force: bool, confirm_within: float | None) -> None:
    """Install or replace the lock (idempotent): every configured server's endpoint allowed.

    From an SSH session the lock would cut (lock.admin_tcp), it refuses unless --force. With
    --confirm-within, the previous state comes back by itself unless confirmed from a new
    session in time, also if this session dies.
    """
    config = _load(config_path)
    policy = policy_from_config(config)
    if config.settings.tunnel.namespace is None:  # inside the namespace, no SSH session to cut
        refuse_a_lockout(policy, force, "lock apply")
    if confirm_within is None:
        try:
            links = nft.apply(policy)
        except TunlockError as err:
            _fail(err)
        _say_applied(policy, links)
        return
    _refuse_while_the_daemon_runs(config, "the lock was not changed")
    try:
        pending = confirm.begin(policy.table, confirm_within)
    except TunlockError as err:
        _fail(err)
    try:
        links = nft.apply(policy)
    except TunlockError as err:
        confirm.cancel(confirm.state_path(policy.table))
        _fail(err)
    _say_applied(policy, links)
    previous = "the previous lock" if pending.previous is not None else "no lock"
    click.echo(
        f"{previous} comes back at "
        f"{time.strftime('%H:%M:%S', time.localtime(pending.deadline))} (in {confirm_within:g} s) unless "
        f"`tunlock lock confirm --config {config.path}` runs by then. Run it from a new SSH session: "
        "that proves the new lock lets you in."
    )


def _say_applied(policy: LockPolicy, links: AppliedLinks) -> None:
    """What was installed, where the egress chain holds, and every bypass workload."""
    if egress_in_force(links):
        egress = f"egress held on {', '.join(links.egress_devices)}"
    elif links.egress_refused:
        egress = "NO egress chain (the kernel refused it)"
    else:
        egress = "no uplink found for the egress chain"
    click.echo(
        f"lock installed: table inet {policy.table}, {len(policy.endpoints)} endpoints, "
        f"tunnel {policy.tunnel_interface}, allow_lan={'on' if policy.allow_lan else 'off'}, {egress}"
    )
    for workload in links.bypass:
        held = "held by the egress chain" if egress_in_force(links) else "NOT held by the lock"
        click.echo(
            f"warning: bypass: {workload.kind} {workload.interface}: {workload.detail}; {held}", err=True
        )


@lock.command(name="confirm")
@CONFIG_OPTION
def confirm_command(config_path: Path) -> None:
    """Keep the lock applied with --confirm-within (exit 1 when nothing waits or it is too late)."""
    config = _load(config_path)
    try:
        confirm.confirm(config.settings.lock.table)
    except TunlockError as err:
        _fail(err)
    click.echo(f"lock confirmed: table inet {config.settings.lock.table} stays as applied")


def _refuse_while_the_daemon_runs(config: Config, note: str) -> None:
    pid = running_daemon(config.settings.control.socket)
    if pid is not None:
        click.echo(
            f"tunlock: the tunlock daemon{f' (PID {pid})' if pid else ''} is running and keeps the lock: "
            f"{note}. Change the configuration and reload it (systemctl reload tunlock) instead.",
            err=True,
        )
        sys.exit(4)


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
    counters = dict(state.counters)
    try:
        egress = nft.egress_counter(policy.table)
    except TunlockError:
        egress = None
    if egress is not None:
        counters[EGRESS_COUNTER] = egress
    counts = ", ".join(f"{k} {v}" for k, v in sorted(counters.items()))
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
    pid = running_daemon(config.settings.control.socket)
    if pid is not None:
        who = f"the tunlock daemon (PID {pid})" if pid else "the tunlock daemon"
        session = config.settings.lock.mode == "session"
        click.echo(
            f"tunlock: {who} is running (it answers on {config.settings.control.socket}) and keeps "
            f"the lock: the lock was not removed. "
            + (
                'With lock.mode = "session", stopping the daemon removes the lock: '
                "systemctl stop tunlock, or kill -TERM " + (str(pid) if pid else "<its PID>") + "."
                if session
                else "Stop the daemon first (systemctl stop tunlock, or kill -TERM "
                + (str(pid) if pid else "<its PID>")
                + '), then run this again; with lock.mode = "permanent" the lock stays after it.'
            ),
            err=True,
        )
        sys.exit(4)
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
    config = _load(config_path, inside=False)
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
