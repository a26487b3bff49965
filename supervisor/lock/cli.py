"""``tunlock lock apply|status|remove|export``: the lock alone, without the daemon."""

from __future__ import annotations

import click


@click.group()
def lock() -> None:
    """The lock alone, without the daemon."""
