"""``tunlock lab up|down|status|fault``: the lab by hand."""

from __future__ import annotations

import sys

import click

from supervisor.lab.faults import FAULTS, inject
from supervisor.lab.topology import Lab, LabError, LabState, labs


def _find(lab_id: str | None) -> Lab:
    found = labs()
    if lab_id:
        found = [s for s in found if s.id == lab_id]
    if len(found) != 1:
        ids = ", ".join(s.id for s in labs()) or "none"
        click.echo(f"tunlock lab: name one lab with --id (labs: {ids})", err=True)
        sys.exit(2)
    return Lab(found[0])


def _describe(state: LabState) -> str:
    lab = Lab(state)
    lines = [
        f"lab {lab.id}: {len(lab.servers)} servers, state in {lab.dir}",
        f"  client    {lab.ns('client')}  wan0 192.0.2.2/24 2001:db8:c::2/64, resolver 192.0.2.1",
        f"  isp       {lab.ns('isp')}  router, ISP resolver 192.0.2.1, LAN host 192.0.2.3, observer on cl0",
        f"  internet  {lab.ns('inet')}  203.0.113.10 2001:db8:203::10 (ICMP, TCP 80, UDP 7, DNS)",
    ]
    lines += [f"  {s.name:<9} {s.ns}  endpoint {s.endpoint} [{s.endpoint_v6}]:51820" for s in lab.servers]
    lines += [
        f"  config    {lab.config_path}",
        f"  enter     ip netns exec {lab.ns('client')} bash",
        f"  run       ip netns exec {lab.ns('client')} env TUNLOCK_LAB_ONLY=1 "
        f"tunlock run --config {lab.config_path}",
    ]
    return "\n".join(lines)


@click.group()
def lab() -> None:
    """The lab by hand: namespaces with WireGuard servers, an ISP observer and faults."""


@lab.command()
@click.option("--servers", default=3, show_default=True, type=click.IntRange(1, 20))
def up(servers: int) -> None:
    """Build a lab that stays until `tunlock lab down`."""
    try:
        built = Lab.up(servers=servers, keep=True)
    except LabError as err:
        click.echo(f"tunlock lab: {err}", err=True)
        sys.exit(1)
    click.echo(_describe(built.state))


@lab.command()
@click.option("--id", "lab_id", help="The lab to remove (default: the only one).")
@click.option("--all", "everything", is_flag=True, help="Remove every lab.")
def down(lab_id: str | None, everything: bool) -> None:
    """Remove a lab: processes, namespaces, files."""
    targets = [Lab(s) for s in labs()] if everything else [_find(lab_id)]
    for target in targets:
        target.down()
        click.echo(f"lab {target.id} removed")


@lab.command()
def status() -> None:
    """List the labs on this machine."""
    found = labs()
    if not found:
        click.echo("no lab")
    for state in found:
        click.echo(_describe(state))


@lab.command(context_settings={"ignore_unknown_options": True})
@click.argument("name", type=click.Choice(sorted(FAULTS)))
@click.argument("args", nargs=-1)
@click.option("--id", "lab_id", help="The lab (default: the only one).")
def fault(name: str, args: tuple[str, ...], lab_id: str | None) -> None:
    """Inject a fault (servers are numbered from 1), e.g. `blackhole-server 1`, `loss 20`."""
    try:
        click.echo(inject(_find(lab_id), name, *args))
    except (LabError, IndexError, ValueError, OSError) as err:
        click.echo(f"tunlock lab: {err}", err=True)
        sys.exit(1)


@lab.command()
@click.option("--minutes", default=3.0, show_default=True, type=click.FloatRange(0.1, 24 * 60))
@click.option("--seed", type=int, help="Replay a soak (the seed it printed).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report here.")
def soak(minutes: float, seed: int | None, json_path: str | None) -> None:
    """The daemon in a lab of its own under a random fault every few seconds; exit 1 on any problem."""
    from pathlib import Path

    from supervisor.lab.soak import run_soak

    report = run_soak(minutes, seed, say=click.echo)
    click.echo(report.table())
    if json_path:
        report.save(Path(json_path))
    problems = report.problems()
    for problem in problems:
        click.echo(f"tunlock lab soak: {problem}", err=True)
    sys.exit(1 if problems else 0)
