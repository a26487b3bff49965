"""Errors a user can act on.

Every problem with user input is reported as ``file:line: what is wrong`` and
never as a traceback, so one exception type carries all of them at once: a
user fixing a broken server directory wants every problem in one run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType

from msgspec import Struct
from msgspec.structs import force_setattr

from supervisor.redact import scrub

# What ``str()`` of an exception raised without a message can be: nothing, or (a KeyError) quotes.
_NO_MESSAGE = ("", "''", '""')


def describe(error: BaseException) -> str:
    """What went wrong, in words for a log line or a status: the error's message, or, for an
    error raised without one (a timeout, ``KeyError('')``), its type and the line it came
    through, which a log reader can act on where an empty ``''`` says nothing. The first error
    inside (nested) exception groups stands for the group."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    message = str(error).strip()
    if message not in _NO_MESSAGE:
        return message
    said = f"{type(error).__name__} with no message"
    if error.__cause__ is not None and error.__cause__ is not error:
        said += f" (from {type(error.__cause__).__name__}: {describe(error.__cause__)})"
    where = _origin(error.__traceback__)
    if where is not None:
        said += f", at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}"
    return said


# Where waiting and talking happen, not where a caller's intent is: a timeout is raised inside
# anyio, but the line worth naming is the caller's `with fail_after(...)`.
_PLUMBING = frozenset({"anyio", "sniffio", "httpx", "httpcore", "h11", "pyroute2", "exceptiongroup"})


def _origin(frames: TracebackType | None) -> TracebackType | None:
    """The deepest frame of ``frames`` outside the standard library and the I/O libraries (else
    the outermost): the line of tunlock's, or of a plugin's, that the error came through."""
    chosen = frames
    while frames is not None:
        module = str(frames.tb_frame.f_globals.get("__name__", "")).split(".", 1)[0]
        if module not in sys.stdlib_module_names and module not in _PLUMBING:
            chosen = frames
        frames = frames.tb_next
    return chosen


class Problem(Struct, frozen=True, order=True):
    """One thing wrong with one input file; ``line`` is 1-based, 0 when unknown."""

    file: Path
    line: int
    message: str
    warning: bool = False

    def __post_init__(self) -> None:
        # Messages may quote a malformed line, and a malformed line may hold a private key.
        force_setattr(self, "message", scrub(self.message))

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
