"""``tunlock lab up|down|status|fault``: the lab by hand."""

from __future__ import annotations

import click


@click.group()
def lab() -> None:
    """The lab by hand: namespaces with WireGuard servers, an ISP observer and faults."""
