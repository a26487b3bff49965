"""A running daemon fed bad server files by SIGHUP (issue 11): no key in its log, no hang.

The daemon reads the configuration again on SIGHUP, off its event loop; a refused reload keeps
the old configuration and the connection.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from supervisor.lab.daemon import LabDaemon
from tests.unit.samples import VALID_SERVER, make_key

pytestmark = pytest.mark.lab


def _wait_for_log(daemon: LabDaemon, text: str, after: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = daemon.log_events()[after:]
        if any(text in line for line in events):
            return "\n".join(events)
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the daemon's log:\n{daemon.log_tail()}")


def test_a_reload_with_a_misplaced_private_key_logs_no_key_and_keeps_running(lab):
    servers = lab.lab.dir / "servers"
    key = make_key("a misplaced private key")
    private_line = next(line for line in VALID_SERVER.splitlines() if line.startswith("PrivateKey = "))
    texts = {
        "next-line.conf": VALID_SERVER.replace(private_line, f"PrivateKey =\n{key}"),
        "colon.conf": VALID_SERVER.replace(private_line, f"PrivateKey: {key}"),
    }
    with lab.daemon() as daemon:
        daemon.start()
        try:
            for name, text in texts.items():
                path = servers / name
                path.write_text(text)
                path.chmod(0o600)
            seen = len(daemon.log_events())
            os.kill(daemon.pid, signal.SIGHUP)
            log = _wait_for_log(daemon, "reload refused", seen)
            status = daemon.status()
        finally:
            for name in texts:
                (servers / name).unlink(missing_ok=True)
    assert "next-line.conf:2" in log and "colon.conf:2" in log, log
    for fragment in (key, key.rstrip("="), key[:40], key[:22]):
        assert fragment not in log, log
    assert status is not None and status["state"] == "connected"


def test_a_fifo_in_the_server_glob_does_not_hang_a_reload(lab):
    fifo = lab.lab.dir / "servers" / "zz-fifo.conf"
    with lab.daemon() as daemon:
        daemon.start()
        os.mkfifo(fifo)
        try:
            seen = len(daemon.log_events())
            os.kill(daemon.pid, signal.SIGHUP)
            log = _wait_for_log(daemon, "reload refused", seen)
            status = daemon.status()
            code = daemon.stop()
        finally:
            fifo.unlink()
    assert "zz-fifo.conf: is a FIFO, not a regular file" in log, log
    assert status is not None and status["state"] == "connected"
    assert code == 0
