"""``tunlock leaktest``: probe every way out of this host and say what got out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from supervisor.cli_common import CONFIG_OPTION, load_or_exit
from supervisor.errors import TunlockError


@click.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def leaktest(config_path: Path, as_json: bool) -> None:
    """Probe every way out of this host (hop limit 1) and check the lock.

    One line per probe kind and interface: blocked, or LEAK and how it was seen. Exit 0 when
    nothing got out and every check holds, 1 when something did (named), 2 on a usage or
    configuration error.
    """
    import anyio

    from supervisor.leaktest.report import render_json, render_text
    from supervisor.leaktest.run import ensure_may_probe, run_leaktest

    config = load_or_exit(config_path)
    try:
        ensure_may_probe()
        report = anyio.run(run_leaktest, config, backend="asyncio")
    except TunlockError as err:
        click.echo(f"tunlock: {err}", err=True)
        sys.exit(2)
    except TimeoutError:
        click.echo("tunlock: the leak test did not finish in time; nothing was judged", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(render_json(report), indent=1))
    else:
        click.echo(render_text(report), nl=False)
    sys.exit(report.exit_code)
