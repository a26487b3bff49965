"""Errors a user can act on.

Every problem with user input is reported as ``file:line: what is wrong`` and
never as a traceback, so one exception type carries all of them at once: a
user fixing a broken server directory wants every problem in one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from supervisor.redact import scrub


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with one input file; ``line`` is 1-based, 0 when unknown."""

    file: Path
    line: int
    message: str
    warning: bool = False

    def __post_init__(self) -> None:
        # Messages may quote a malformed line, and a malformed line may hold a private key.
        object.__setattr__(self, "message", scrub(self.message))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        kind = "warning: " if self.warning else ""
        return f"{where}: {kind}{self.message}"


class TunlockError(Exception):
    """Base of every error tunlock raises on purpose (never a bug)."""


class ConfigError(TunlockError):
    """The configuration or a server file is not usable; holds every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(p for p in problems if not p.warning) or list(problems)
        # Kept beside the errors: `tunlock check` shows them too (a loose file mode is worth
        # knowing while fixing a typo, not only once the typo is gone).
        self.warnings = [p for p in problems if p.warning] if any(not p.warning for p in problems) else []
        super().__init__("\n".join(str(p) for p in self.problems))


class SafetyError(TunlockError):
    """An operation was refused because it could cut this machine off the network."""
