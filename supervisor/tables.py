"""TOML tables into typed, frozen msgspec Structs, with every wrong key and what is wrong with it.

tunlock.toml's sections and each plugin's ``[plugins.<name>]`` table are declared as
``msgspec.Struct`` classes (bounds and patterns as ``msgspec.Meta``, their own checks in
``__post_init__``). ``convert_table`` turns one table into one of them. Written here, around
msgspec, for what it leaves to its caller:

- msgspec stops at the first error of a conversion, while a user fixing a file wants every
  wrong key at once: the table is converted again without each key found wrong, until it
  converts or nothing more can be learned.
- msgspec words its errors for JSON documents (``Expected `int` >= 1 - at `$.fwmark```); a
  user reads them beside the TOML file, in the words tunlock's messages have always used
  ("Input should be greater than or equal to 1"), at the key's line (the caller's part).
- A struct's own check names its key by raising ``FieldProblem``: msgspec reports any error of
  ``__post_init__`` at the struct, not at the field.
- TOML has no address, network or path type: ``decode`` makes them from their text, and a
  plugin's own types from whatever their ``parse_toml`` class method takes.
"""

from __future__ import annotations

import ast
import functools
import re
import typing
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Network, _BaseNetwork, ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias, TypeVar

import msgspec

if TYPE_CHECKING:
    IPNetwork: TypeAlias = IPv4Network | IPv6Network
else:
    # msgspec takes no union of two custom types: it is given their common base class, which
    # ``decode`` makes into one of the two, what the annotation above says.
    IPNetwork = _BaseNetwork

StructT = TypeVar("StructT", bound=msgspec.Struct)


class FieldProblem(ValueError):
    """Raised by a struct's ``__post_init__``: ``key``'s value is wrong, for ``message``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class Wrong(msgspec.Struct, frozen=True):
    """One wrong key of a table (``""``: the table as a whole); ``unknown``: the key is not one
    the struct has (the caller words that, with a hint at the key meant)."""

    key: str
    message: str
    unknown: bool = False


def decode(kind: type, value: object) -> object:
    """msgspec's hook for the types that TOML writes as text (addresses, networks, paths) and for
    a type of a plugin's own, that says how it is read with a ``parse_toml`` class method."""
    parse = getattr(kind, "parse_toml", None)
    if parse is not None:
        return parse(value)
    if kind is Path:
        if isinstance(value, str):
            return Path(value)
        raise ValueError("Input is not a valid path")
    readers: dict[type, tuple[typing.Callable[[str], object], str]] = {
        IPv4Address: (IPv4Address, "Input is not a valid IPv4 address"),
        IPv4Network: (IPv4Network, "Input is not a valid IPv4 network"),
        IPv6Network: (IPv6Network, "Input is not a valid IPv6 network"),
        _BaseNetwork: (ip_network, "Input is not a valid IPv4 or IPv6 network"),
    }
    if kind not in readers:
        raise NotImplementedError(f"no way to read a {kind.__name__} from TOML")
    read, wrong = readers[kind]
    if not isinstance(value, str):
        raise ValueError(wrong)
    try:
        return read(value)
    except ValueError as err:
        # ipaddress's own words add nothing ("... does not appear to be an IPv4 network") but
        # for a network written with its host bits set, which is worth saying.
        raise ValueError(f"{wrong} ({err})" if "host bits set" in str(err) else wrong) from None


# What pydantic's lax mode took for a boolean, and tunlock's files and environments may say:
# msgspec's own lax mode takes only true/false/1/0.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_BOOLEANS = _TRUE | _FALSE


def convert_table(table: object, kind: type[StructT], *, strict: bool) -> tuple[StructT | None, list[Wrong]]:
    """``table`` as a ``kind``, or None and what is wrong with it: each wrong key (in the table's
    order, a missing one first) or the table as a whole.

    ``strict``: a value must be of the type declared (``"60"`` is not a number); else text is
    read as the type declared (an environment variable's value), as are the TOML booleans'
    usual spellings.
    """
    if not isinstance(table, Mapping):
        return None, [Wrong("", "Input should be a table")]
    remaining = dict(table)
    if not strict:
        for key, hint in _hints(kind).items():
            value = remaining.get(key)
            if hint is bool and isinstance(value, str) and value.strip().lower() in _BOOLEANS:
                remaining[key] = value.strip().lower() in _TRUE
    found: dict[str, Wrong] = {}
    while True:
        try:
            converted = msgspec.convert(remaining, kind, strict=strict, dec_hook=decode)
        except msgspec.ValidationError as err:
            wrong = _explain(err, kind, remaining, strict)
            # A key said already, or a check of the whole made on what is left of it: no more
            # to learn (a struct's whole-table checks run only once every key is right).
            if wrong.key in found or (not wrong.key and found):
                break
            found[wrong.key] = wrong
            if wrong.key not in remaining:
                break  # the table as a whole, or a key it lacks
            del remaining[wrong.key]
            continue
        if not found:
            return converted, []
        break
    order = {key: n for n, key in enumerate(table)}
    return None, sorted(found.values(), key=lambda w: order.get(w.key, -1))


@functools.cache
def _hints(kind: type) -> dict[str, object]:
    return typing.get_type_hints(kind)


_AT = re.compile(r" - at `\$(.*)`$")
_BOUND = re.compile(r"^Expected `(int|float)` (>=|>|<=|<) (\S+)$")
_LENGTH = re.compile(r"^Expected `(array|str)` of length (>=|<=) (\d+)$")
_PATTERN = re.compile(r"^Expected `str` matching regex (.*)$")
_TYPE = re.compile(r"^Expected `([^`]+)`, got `(\w+)`$")
_BOUNDS = {
    ">=": "greater than or equal to",
    ">": "greater than",
    "<=": "less than or equal to",
    "<": "less than",
}
_TYPES = {
    "int": "a valid integer",
    "float": "a valid number",
    "bool": "a valid boolean",
    "str": "a valid string",
    "array": "a valid list",
    "object": "a table",
}


def _explain(err: msgspec.ValidationError, kind: type, table: dict[str, object], strict: bool) -> Wrong:
    cause = err.__cause__
    if isinstance(cause, FieldProblem):
        return Wrong(cause.key, str(cause))
    text = str(err)
    at = _AT.search(text)
    message = text[: at.start()] if at else text
    path = at.group(1) if at else ""
    for key in table:
        if message == f"Object contains unknown field `{key}`":
            return Wrong(key, "unknown key", unknown=True)
    if missing := re.fullmatch(r"Object missing required field `(.*)`", message):
        return Wrong(missing.group(1), "Field required")
    key = next((k for k in table if re.match(rf"\.{re.escape(k)}(\.|\[|$)", path)), "")
    return Wrong(key, _worded(message, kind, key, table.get(key), strict))


def _worded(message: str, kind: type, key: str, value: object, strict: bool) -> str:
    """msgspec's ``message`` in the words of tunlock's messages."""
    if match := _BOUND.match(message):
        number = float(match.group(3))
        shown = int(number) if number.is_integer() else number
        return f"Input should be {_BOUNDS[match.group(2)]} {shown}"
    if match := _LENGTH.match(message):
        what, bound, count = match.groups()
        if what == "str":
            unit = "character" if count == "1" else "characters"
            return f"String should have {'at least' if bound == '>=' else 'at most'} {count} {unit}"
        unit = "item" if count == "1" else "items"
        actual = f", not {len(value)}" if isinstance(value, list) else ""
        most = "at least" if bound == ">=" else "at most"
        return f"List should have {most} {count} {unit} after validation{actual}"
    if match := _PATTERN.match(message):
        # msgspec shows the pattern as a Python literal (its backslashes doubled); a reader
        # wants it as written.
        return f"String should match pattern '{ast.literal_eval(match.group(1))}'"
    if message.startswith("Invalid enum value") and (choices := _literal_choices(kind, key)):
        listed = [repr(c) for c in choices]
        return f"Input should be {' or '.join(filter(None, (', '.join(listed[:-1]), listed[-1])))}"
    if match := _TYPE.match(message):
        expected, got = match.groups()
        kinds = [_TYPES.get(k, k) for k in expected.split(" | ") if k != "null"]
        said = f"Input should be {' or '.join(kinds)}"
        if strict or len(kinds) > 1:
            return said
        if expected.startswith("int") and got == "str":
            return f"{said}, unable to parse string as an integer"
        if expected.startswith("int") and got == "float":
            return f"{said}, got a number with a fractional part"
        if expected.startswith("float") and got == "str":
            return f"{said}, unable to parse string as a number"
        if expected.startswith("bool"):
            return f"{said}, unable to interpret input"
        return said
    return message


def _literal_choices(kind: type, key: str) -> tuple[object, ...]:
    """The values a ``Literal`` field ``key`` of ``kind`` allows (also inside ``| None``)."""
    hint = _hints(kind).get(key)
    for part in (hint, *typing.get_args(hint)):
        if typing.get_origin(part) is Literal:
            return typing.get_args(part)
    return ()
