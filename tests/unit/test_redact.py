"""No key material reaches a log line, an exception text or a status reply."""

import base64
import io
import json
import os

import structlog

from supervisor.log import configure
from supervisor.redact import REDACTED, Secret, scrub

PRIVATE = base64.b64encode(os.urandom(32)).decode()
PUBLIC = base64.b64encode(bytes(range(32))).decode()


def test_secret_never_prints_its_value():
    secret = Secret(PRIVATE)
    assert PRIVATE not in str(secret)
    assert PRIVATE not in repr(secret)
    assert PRIVATE not in f"{secret} {secret!r} {[secret]}"
    assert secret.reveal() == PRIVATE


def test_scrub_replaces_base64_and_hex_keys():
    hex_key = base64.b64decode(PRIVATE).hex()
    text = f"set private_key={hex_key} and PrivateKey = {PRIVATE}"
    out = scrub(text)
    assert PRIVATE not in out and hex_key not in out
    assert out.count(REDACTED) == 2


def test_scrub_keeps_ordinary_text():
    text = "endpoint 198.51.100.1:51820 handshake 3 s ago, rx 1234 tx 5678"
    assert scrub(text) == text


def test_log_lines_carry_no_key(capsys):
    configure(level="debug", json=True)
    try:
        log_two_lines()
    finally:
        # The logger wrote to the stream pytest captures now; later tests must not inherit it.
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert PRIVATE not in err
    lines = [json.loads(line) for line in io.StringIO(err) if line.strip()]
    assert lines[0]["private_key"] == REDACTED
    assert lines[0]["preshared_key"] == REDACTED
    assert lines[1]["public_key"] == PUBLIC, "public keys name peers in logs and are kept"


def log_two_lines() -> None:
    log = structlog.get_logger("test")
    log.info("configuring", private_key=PRIVATE, preshared_key=Secret(PRIVATE), detail=f"key {PRIVATE}")
    log.info("peer", public_key=PUBLIC)
