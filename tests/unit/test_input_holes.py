"""Issue 11's input holes: key material in error messages, special files in the server glob,
non-UTF-8 and BOM-prefixed files, and LAN ranges that are not a LAN."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigError
from supervisor.redact import scrub
from supervisor.wgquick import MAX_SERVER_FILE, read_server

from .samples import PRIVATE_KEY, VALID_SERVER, make_key

KEY_ON_NEXT_LINE = VALID_SERVER.replace(f"PrivateKey = {PRIVATE_KEY}", f"PrivateKey =\n{PRIVATE_KEY}")
KEY_WITH_COLON = VALID_SERVER.replace(f"PrivateKey = {PRIVATE_KEY}", f"PrivateKey: {PRIVATE_KEY}")


def _fragments(key: str) -> list[str]:
    """The key and the parts of it an error message could have quoted (as written, without its
    '=', cut at 40 characters as the old message was, and halves)."""
    return [key, key.rstrip("="), key[:40], key[:22], key[22:].rstrip("=")]


def _every_message(path: Path) -> str:
    found: list = []
    read_server(path, found)
    return "\n".join(str(p) for p in found)


@pytest.mark.parametrize("text", [KEY_ON_NEXT_LINE, KEY_WITH_COLON], ids=["next-line", "colon"])
def test_a_misplaced_private_key_is_never_quoted(write_server, text):
    message = _every_message(write_server(text))
    assert message, "the broken file must be reported"
    for fragment in _fragments(PRIVATE_KEY):
        assert fragment not in message, message


def test_the_misplaced_key_still_gets_a_useful_message(write_server):
    next_line = _every_message(write_server(KEY_ON_NEXT_LINE))
    assert ":2: PrivateKey has no value: write it on the same line" in next_line
    colon = _every_message(write_server(KEY_WITH_COLON))
    assert "with '=', not ':'" in colon and "PrivateKey" in colon


@pytest.mark.parametrize(
    "line",
    [
        "{key}",  # a key alone on a line, '=' and all
        "{key} = 1",  # a key where a key name goes
        "[{key}]",  # as a section
        "Address = {key}",  # in a value list
        "Endpoint = {key}",
        "DNS = {key}",
        "AllowedIPs = {key}",
        "PrivateKey: {key}",
    ],
)
def test_key_material_anywhere_in_a_file_stays_out_of_every_message(write_server, line):
    # A key whose base64 has no '+' or '/' and one that has: each shape goes through the reader.
    for key in (make_key("key material in a file"), "A" * 20 + "+/" * 11 + "=", "B" * 43 + "="):
        placed = line.format(key=key)
        text = VALID_SERVER.replace("DNS = 10.64.1.1", "DNS = 10.64.1.1\n" + placed)
        if line.startswith(("Address", "Endpoint", "DNS", "AllowedIPs")):
            text = VALID_SERVER.replace(line.split(" = ")[0] + " = ", f"{line.split(' = ')[0]} = {key}, ", 1)
            if line.startswith("Endpoint"):
                text = VALID_SERVER.replace("Endpoint = 198.51.100.11:51820", f"Endpoint = {key}")
        message = _every_message(write_server(text))
        for fragment in _fragments(key):
            assert fragment not in message, (placed, message)


def test_check_and_run_print_no_key_for_either_form(tmp_path):
    (tmp_path / "servers").mkdir()
    server = tmp_path / "servers" / "s1.conf"
    config = tmp_path / "tunlock.toml"
    config.write_text("")
    for text in (KEY_ON_NEXT_LINE, KEY_WITH_COLON):
        server.write_text(text)
        server.chmod(0o600)
        for command in ("check", "run"):
            done = subprocess.run(
                [sys.executable, "-m", "supervisor.cli", command, "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "TUNLOCK_LAB_ONLY": "1"},
            )
            assert done.returncode != 0
            output = done.stdout + done.stderr
            assert "s1.conf:2" in output, output
            for fragment in _fragments(PRIVATE_KEY):
                assert fragment not in output, (command, output)


def test_scrub_catches_a_key_that_lost_its_padding():
    assert PRIVATE_KEY.rstrip("=") not in scrub(f"unknown key '{PRIVATE_KEY.rstrip('=')}'")


def _read_in_thread(path: Path) -> list[str]:
    """Read a server file in a thread; a read that never returns fails the test (no speed limit:
    a blocked reader does not come back at all)."""
    found: list = []
    reader = threading.Thread(target=read_server, args=(path, found), daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), f"reading {path} blocked"
    return [f"{p.line}: {p.message}" for p in found]


def test_a_fifo_in_the_server_glob_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    assert _read_in_thread(fifo) == ["0: is a FIFO, not a regular file: refused"]


def test_a_symlink_to_dev_zero_is_refused_not_read_forever(tmp_path):
    link = tmp_path / "zero.conf"
    link.symlink_to("/dev/zero")
    assert _read_in_thread(link) == ["0: is a character device, not a regular file: refused"]


def test_a_server_file_over_the_limit_is_refused(tmp_path):
    big = tmp_path / "big.conf"
    big.write_bytes(b"# " + b"x" * MAX_SERVER_FILE + b"\n")
    assert _read_in_thread(big) == [f"0: too large: {MAX_SERVER_FILE + 3} bytes, the limit is 1024 KiB"]


def test_the_glob_reports_a_fifo_and_goes_on(write_config, tmp_path):
    path = write_config("", servers=1)
    os.mkfifo(tmp_path / "servers" / "zz.conf")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/servers/zz.conf: is a FIFO, not a regular file: refused"
    ]


def test_a_non_utf8_byte_is_reported_at_its_line(write_server, write_config, tmp_path):
    text = VALID_SERVER.encode().replace(b"DNS = 10.64.1.1", b"DNS = 10.64.1.1 # caf\xe9")
    path = write_server("")
    path.write_bytes(text)
    found: list = []
    read_server(path, found)
    assert [(p.line, p.message) for p in found] == [(4, "not UTF-8 text (byte 0xe9)")]
    config = write_config("")
    config.write_bytes(b"[lock]\n# \xff\nallow_lan = true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, {})
    assert [(p.line, p.message) for p in caught.value.problems] == [(2, "not UTF-8 text (byte 0xff)")]


def test_a_utf8_bom_is_accepted_in_server_and_config_files(write_server, write_config):
    server = write_server("")
    server.write_bytes(b"\xef\xbb\xbf" + VALID_SERVER.encode())
    found: list = []
    assert read_server(server, found) is not None, found
    config = write_config("")
    config.write_bytes(b"\xef\xbb\xbf[lock]\nallow_lan = true\n")
    assert load_config(config, {}).settings.lock.allow_lan is True


def test_a_fifo_as_the_config_file_is_refused(tmp_path):
    fifo = tmp_path / "tunlock.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as caught:
        load_config(fifo, {})
    assert str(caught.value) == f"{fifo}: is a FIFO, not a regular file: refused"


@pytest.mark.parametrize(
    "ranges",
    ['["0.0.0.0/0"]', '["::/0"]', '["8.8.8.0/24"]', '["10.0.0.0/7"]', '["2000::/3"]', '["100.64.0.0/10"]'],
)
def test_lan_ranges_outside_the_lan_blocks_are_refused_at_their_line(write_config, ranges):
    path = write_config(f"[lock]\nallow_lan = true\nlan_ranges = {ranges}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    (problem,) = caught.value.problems
    assert problem.line == 3 and "is not a LAN range" in problem.message, problem


def test_lan_ranges_from_the_environment_are_refused_naming_the_variable(write_config):
    path = write_config("")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"TUNLOCK_LOCK_LAN_RANGES": "192.168.0.0/16,0.0.0.0/0"})
    assert str(caught.value).startswith(
        "env TUNLOCK_LOCK_LAN_RANGES: lock.lan_ranges: 0.0.0.0/0 is not a LAN"
    )


def test_named_lan_ranges_inside_the_blocks_are_accepted(write_config):
    path = write_config(
        '[lock]\nlan_ranges = ["192.168.1.0/24", "fd12:3456::/48", "192.0.2.0/24", "239.255.255.250/32"]\n'
    )
    assert len(load_config(path, {}).settings.lock.lan_ranges) == 4
