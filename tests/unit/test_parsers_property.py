"""Arbitrary text and mutations of valid files: only ConfigError ever escapes the parsers."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config import load_config
from supervisor.errors import ConfigError
from supervisor.wgquick import load_server

from .samples import PRESHARED_KEY, PRIVATE_KEY, VALID_SERVER

VALID_CONFIG = """[tunnel]
interface = "tl0"
servers = ["servers/*.conf"]
[rotation]
strategy = "random"
[lock]
allow_lan = true
inbound_tcp = [8080]
[control]
socket = "ctl.sock"
"""
# Tokens the line and value parsers treat specially, which random text rarely hits: separators,
# comments, brackets, and digits Python calls digits but int() refuses (superscripts), or reads
# from other scripts (Arabic-Indic).
TRICKY = ["=", ",", "#", "#! ", "[", "]", ":", "::", "/", "\u00b2", "\u0663", "\u00a0", "off", "0x1"]
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    """A valid file with lines dropped, doubled, swapped or edited, and characters changed."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "swap", "edit", "insert"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "edit":
            pos = draw(st.integers(0, len(lines[i])))
            insert = draw(st.text(max_size=6) | st.sampled_from(TRICKY))
            lines[i] = lines[i][:pos] + insert + lines[i][pos + 1 :]
        else:
            lines.insert(i, draw(st.text(max_size=30)))
    return "\n".join(lines)


def check_server_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.conf"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_server(path)
        except ConfigError as err:
            message = str(err)
            assert PRIVATE_KEY not in message and PRESHARED_KEY not in message
            assert all(p.file == path and p.line >= 0 for p in err.problems)


def check_config_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "servers").mkdir()
        (root / "servers" / "a.conf").write_text(VALID_SERVER)
        (root / "tunlock.toml").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(root / "tunlock.toml", {})
        except ConfigError as err:
            assert err.problems


@PROPERTY_SETTINGS
@given(st.text())
def test_server_parser_arbitrary_text(text):
    check_server_text(text)


@PROPERTY_SETTINGS
@given(mutated(VALID_SERVER))
def test_server_parser_mutations_of_a_valid_file(text):
    check_server_text(text)


@PROPERTY_SETTINGS
@given(st.text())
def test_config_parser_arbitrary_text(text):
    check_config_text(text)


@PROPERTY_SETTINGS
@given(mutated(VALID_CONFIG))
def test_config_parser_mutations_of_a_valid_file(text):
    check_config_text(text)
