"""The daemon against hostile and careless input (issue #11): it never crashes, never hangs.

Each test throws something at a running daemon in the lab, then checks what a user would: it
still answers `status`, it still fails over when its server goes silent, and a stop sent to the
whole process group (systemd's default, Ctrl-C) ends it with status 0 and the lock in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from supervisor.lab.daemon import LabDaemon
from tests.lab.conftest import LabUnderTest, lab_under_test
from tests.lab.test_daemon import QUICK, assert_no_leaks, on, tunlock

pytestmark = pytest.mark.lab


@pytest.fixture
def lab() -> Iterator[LabUnderTest]:
    yield from lab_under_test()


def test_reload_dropping_the_current_server_moves_to_one_still_configured(lab: LabUnderTest) -> None:
    """Connected to vpn2 of vpn2 and vpn3; the list becomes vpn1 alone (issue #11, item 2: the
    path report for vpn1 reached the machine first, and it went offline for good)."""
    config = lab.lab.dir / "reload.toml"
    text = lab.lab.config_path.read_text()
    config.write_text(text.replace('servers = ["servers/*.conf"]', 'servers = ["servers/vpn[23].conf"]'))
    with LabDaemon(lab.lab, env=QUICK, config=str(config)) as daemon:
        daemon.start()
        mark = lab.observer.mark()
        daemon.wait_for(on("vpn2"), timeout=15, what="vpn2")
        config.write_text(text.replace('servers = ["servers/*.conf"]', 'servers = ["servers/vpn1.conf"]'))
        os.kill(daemon.pid, 1)  # SIGHUP
        daemon.wait_for(on("vpn1"), timeout=15, what="vpn1 after a reload that dropped vpn2")
        assert lab.probes.ping()
        assert tunlock(lab, "health").returncode == 0
        states = [json.loads(line).get("state") for line in daemon.log_events() if '"state"' in line]
        assert "offline" not in states, "the path to vpn1 was there all along"
        assert_no_leaks(lab, mark)
