"""``tunlock systemd install|uninstall|join``: the boot lock and the daemon as systemd units, and
namespace mode's drop-in for a service that must run inside the namespace."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

import supervisor
from supervisor.cli_common import CONFIG_OPTION, load_or_exit, namespace_or_exit
from supervisor.lock.cli import export_text
from supervisor.lock.configured import policy_from_config
from supervisor.lock.lockout import FORCE_HELP, refuse_a_lockout
from supervisor.systemd import units

SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(3)'s test


def _systemctl(*args: str) -> None:
    """systemctl, or exit 1 with its own words."""
    binary = shutil.which("systemctl")
    if binary is None:
        click.echo("tunlock: systemctl not found: is this a systemd host?", err=True)
        sys.exit(1)
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        click.echo(f"tunlock: systemctl {' '.join(args)} failed: {done.stderr.strip()}", err=True)
        sys.exit(1)


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
    return True


def _prove_the_sandbox(unit_text: str, python: str, config: Path) -> None:
    """Run `tunlock check` under the unit's own sandbox (a transient service with the same
    settings); exit 1 with what it said when it fails: the unit would not start either."""
    binary = shutil.which("systemd-run")
    if binary is None:
        click.echo("systemd-run not found: the unit's sandbox was not tried", err=True)
        return
    properties = [arg for prop in units.sandbox_properties(unit_text) for arg in ("-p", prop)]
    argv = [binary, "--wait", "--pipe", "--quiet", "--collect", "--service-type=exec", *properties]
    argv += ["--", python, "-m", "supervisor.cli", "check", "--config", str(config)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        click.echo("tunlock: the trial of the unit's sandbox did not end within 120 s", err=True)
        sys.exit(1)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-5:]
        click.echo(
            f"tunlock: {units.DAEMON_UNIT_NAME} would not start: `tunlock check` under its sandbox "
            f"(systemd-run with the unit's settings) exited {done.returncode}: "
            + " / ".join(said)
            + ". Nothing was installed. The interpreter "
            f"({python}), the package and the configuration ({config}) must be readable in it: "
            "install tunlock as docs/operations.md recommends (a venv in /opt/tunlock).",
            err=True,
        )
        sys.exit(1)
    click.echo(f"checked: `tunlock check` runs under the sandbox of {units.DAEMON_UNIT_NAME}")


@click.group()
def systemd() -> None:
    """The boot lock and the daemon as systemd units."""


@systemd.command()
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Print the files instead of writing and enabling them.")
@click.option(
    "--lock-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=units.DEFAULT_LOCK_FILE,
    show_default=True,
    help="Where the boot lock's nft file goes.",
)
@click.option("--force", is_flag=True, help=FORCE_HELP)
def install(config_path: Path, dry_run: bool, lock_file: Path, force: bool) -> None:
    """Write the boot lock (nft file and tunlock-lock.service) and tunlock.service, and enable both.

    Idempotent: run it again after changing the servers, so that the boot lock lets through the
    new endpoints. Nothing is started: `systemctl start tunlock` does that (the boot lock first).
    """
    config = load_or_exit(config_path, note="nothing was installed")
    if not dry_run and config.settings.tunnel.namespace is None:
        # The units lock the host at the next boot (and at `systemctl start`): refused from an
        # SSH session that lock would cut (lock.admin_tcp).
        refuse_a_lockout(policy_from_config(config), force, "systemd install")
    python = sys.executable
    program = [Path(supervisor.__file__).resolve().parent.parent]
    files = units.render_all(
        config, python, export_text(config), lock_file=lock_file.absolute(), program=program
    )
    if dry_run:
        for path, text in files.files():
            click.echo(f"# {path}\n{text}")
        return
    if SYSTEMD_RUNNING.is_dir():
        _prove_the_sandbox(files.daemon_unit_text, python, config.path.resolve())
    else:
        click.echo("systemd is not running here: the unit's sandbox was not tried", err=True)
    for path, text in files.files():
        click.echo(f"{'wrote' if _write_if_changed(path, text) else 'unchanged'} {path}")
    if files.namespace_mode and files.lock_unit.exists():
        # Left as it is (it fails closed): the administrator decides to unlock the host.
        click.echo(
            f"tunlock: {files.lock_unit} from a whole-host install is still there and locks this "
            "host at boot; namespace mode does not need it: `tunlock systemd uninstall` before "
            "`install` removes it",
            err=True,
        )
    if SYSTEMD_RUNNING.is_dir():
        _systemctl("daemon-reload")
    _systemctl("enable", *files.unit_names())
    click.echo(
        f"enabled {' and '.join(files.unit_names())}; "
        f"start them now with: systemctl start {units.DAEMON_UNIT_NAME}"
    )


@systemd.command()
@click.option(
    "--lock-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=units.DEFAULT_LOCK_FILE,
    show_default=True,
)
def uninstall(lock_file: Path) -> None:
    """Stop and disable both units and remove what install wrote.

    The lock table itself stays until `tunlock lock remove --yes` (or a reboot without the
    boot lock): uninstalling never opens it.
    """
    unit_dir = units.DEFAULT_UNIT_DIR
    names = (units.DAEMON_UNIT_NAME, units.LOCK_UNIT_NAME)
    present = [name for name in names if (unit_dir / name).exists()]
    if present:
        now = ["--now"] if SYSTEMD_RUNNING.is_dir() else []
        _systemctl("disable", *now, *present)
    for path in (*(unit_dir / name for name in names), lock_file):
        if path.exists():
            path.unlink()
            click.echo(f"removed {path}")
    if SYSTEMD_RUNNING.is_dir():
        _systemctl("daemon-reload")
    click.echo("the lock stays in force until `tunlock lock remove --yes` (or a reboot)")


@systemd.command()
@click.argument("unit")
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Print the drop-in instead of writing it.")
def join(unit: str, config_path: Path, dry_run: bool) -> None:
    """Put UNIT inside the namespace of tunnel.namespace, bound to tunlock.service.

    Writes /etc/systemd/system/UNIT.d/tunlock-namespace.conf: UNIT starts only after
    tunlock.service, stops with it, and sees nothing but the namespace (its loopback and the
    tunnel) and the tunnel's resolvers. Restart UNIT for it to take effect.
    """
    config = load_or_exit(config_path, note="nothing was written")
    name = namespace_or_exit(config, "join puts a service")
    try:
        path, text = units.join_dropin(unit, name)
    except ValueError as err:
        click.echo(f"tunlock: {err}", err=True)
        sys.exit(2)
    if dry_run:
        click.echo(f"# {path}\n{text}", nl=False)
        return
    click.echo(f"{'wrote' if _write_if_changed(path, text) else 'unchanged'} {path}")
    if SYSTEMD_RUNNING.is_dir():
        _systemctl("daemon-reload")
    unit_name = path.parent.name.removesuffix(".d")
    click.echo(f"restart it to move it in: systemctl restart {unit_name}")
