"""``python -m supervisor.machine``: print the transition table (docs/supervisor.md embeds it)."""

from supervisor.machine.core import describe

print(describe())
