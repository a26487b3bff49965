"""Keeping key material out of every log line, exception and status reply.

A private or preshared key that reaches a log is a compromised tunnel, so keys
travel inside :class:`Secret`, whose ``str``/``repr`` never show the value, and
the structlog processor below scrubs anything that still looks like a key.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

REDACTED = "<redacted>"

# A WireGuard key: 32 bytes as base64 (44 chars ending in '=') or hex (64 chars).
# The '=' may have been split off (a key mistaken for "Key = value" loses it).
_KEY_PATTERN = re.compile(
    r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048](?:=|(?![A-Za-z0-9+/=]))|\b[0-9a-f]{64}\b"
)
_SECRET_FIELDS = ("private_key", "preshared_key", "privatekey", "presharedkey")
# Public keys name a peer in logs; they are the only key-shaped values let through.
_PUBLIC_FIELDS = ("public_key", "publickey", "peer")


class Secret:
    """A string that refuses to be printed; call :meth:`reveal` where the value is needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    def __str__(self) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    # Pickling is allowed: it only carries a Secret between our own processes (the parallel
    # server-file reader); printing, formatting and logging stay impossible.


def scrub(text: str, keep: frozenset[str] = frozenset()) -> str:
    """Replace every key-shaped token in ``text`` except public keys listed in ``keep``."""

    def repl(match: re.Match[str]) -> str:
        return match.group(0) if match.group(0) in keep else REDACTED

    return _KEY_PATTERN.sub(repl, text)


def redact_event(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop secret fields and scrub key-shaped values."""
    for field in list(event):
        value = event[field]
        if field.lower().replace("-", "_") in _SECRET_FIELDS or isinstance(value, Secret):
            event[field] = REDACTED
        elif isinstance(value, str) and field.lower() not in _PUBLIC_FIELDS:
            event[field] = scrub(value)
    return event


# A file that holds a private key may have the key where a name or a value was expected (on the
# line after `PrivateKey =`, or as `PrivateKey: KEY`). Problems quote only what cannot be key
# material: a name of letters short enough not to be a key's worth, or a value with no run of a
# dozen base64 characters (an address, a port, a name with dots). Anything else is described,
# not shown.
SAFE_NAME = re.compile(r"[A-Za-z][A-Za-z_-]{0,23}")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{12,}")
VALUE_NOT_SHOWN = "(value not shown)"


def shown_name(name: str) -> str:
    """``'Name'`` when it is safe to print, else a description that gives nothing away."""
    return repr(name) if SAFE_NAME.fullmatch(name) else "(not shown: it does not look like a key name)"


def shown_value(value: str) -> str:
    """``'value'`` when it cannot be key material (an address, a name with dots), else not shown."""
    if len(value) <= 64 and not _BASE64_RUN.search(value):
        return repr(value)
    return VALUE_NOT_SHOWN
