"""Checking a plugin's options table: each helper raises PluginOptionError naming the key."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from supervisor.plugins import PluginOptionError


def only(options: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = set(options) - set(known)
    if unknown:
        raise PluginOptionError(f"unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")


def number(options: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise PluginOptionError(f"{key} = {value!r}: a number from {low:g} to {high:g}")
    return float(value)


def text(options: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = options.get(key, default)
    if value is not None and not isinstance(value, str):
        raise PluginOptionError(f"{key} = {value!r}: a string")
    return value


def command(options: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    """A command as a list of arguments, or a string split like a shell would (no shell runs it)."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as err:
            raise PluginOptionError(f"{key}: {err}") from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise PluginOptionError(f"{key}: a command, as a string or a list of arguments")
    return tuple(value)
