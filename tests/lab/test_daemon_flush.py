"""The running daemon against another program's `nft flush ruleset`: nothing leaks, ever.

The daemon holds the lock twice (the ordinary table and its owned twin, docs/lock.md). Another
program on the client flushes the whole ruleset, and at once every kind of probe runs; the ISP's
observer counts what leaves outside WireGuard. The twin belongs to the daemon's netlink socket:
nobody else can delete it, and it goes when the daemon does, SIGKILL included, while the
ordinary table stays.
"""

from __future__ import annotations

import os

import pytest

from supervisor.lab import faults
from supervisor.lab.probes import describe
from supervisor.lab.topology import LabError
from supervisor.lock.render import owned_table
from tests.lab.conftest import LabUnderTest

pytestmark = pytest.mark.lab(servers=1, per_test=True)

OWNED = owned_table("tunlock")
# Flushes per test; the VM tier (software emulation, each probe seconds) runs fewer.
FLUSHES = int(os.environ.get("TUNLOCK_TEST_FLUSHES", "5"))


def tables(lab: LabUnderTest) -> str:
    return lab.lab.run("client", "nft", "list", "tables")


def refused_dns(lab: LabUnderTest) -> int:
    listing = lab.lab.run("client", "nft", "list", "counter", "inet", "tunlock", "blocked_dns")
    return int(listing.split("packets ")[1].split()[0])


def owned_and_restored(status: dict) -> bool:
    lock = status["lock"]
    return {k: lock.get(k) for k in ("installed", "matching", "owned")} == {
        "installed": True,
        "matching": True,
        "owned": True,
    }


def test_flush_while_running_leaks_nothing_and_the_twin_is_nobody_elses(lab: LabUnderTest) -> None:
    with lab.daemon() as daemon:
        status = daemon.start()
        assert status is not None and owned_and_restored(status)
        assert any("the lock is held twice while running" in line for line in daemon.log_events())
        mark = lab.observer.mark()
        answered: list[dict[str, bool]] = []
        for _ in range(FLUSHES):
            faults.flush_client_ruleset(lab.lab)  # another tool's flush, in the client
            answered.append(lab.probes.every_kind())  # at once: before the guard can restore
            daemon.wait_for(owned_and_restored, timeout=10, what="the ordinary table restored")
        leaks = lab.observer.leaks(since=mark)
        assert not leaks, f"{len(leaks)} packets leaked after {FLUSHES} flushes:\n{describe(leaks)}"
        # Probes that should fail did fail; those through the tunnel may answer (that is no leak).
        assert not any(a["dns-udp-isp"] or a["icmp4-bound-to-wan0"] for a in answered), answered

        # The restored ordinary table still runs before the twin, so its counters see refusals.
        before = refused_dns(lab)
        assert not lab.probes.dns_udp("192.0.2.1")
        assert refused_dns(lab) > before

        with pytest.raises(LabError, match="Operation not permitted"):
            lab.lab.run("client", "nft", "delete", "table", "inet", OWNED)
        assert f"table inet {OWNED}" in tables(lab), "another program cannot delete the twin"

        assert daemon.stop() == 0
    assert f"table inet {OWNED}" not in tables(lab), "the twin goes with the daemon"
    assert "table inet tunlock\n" in tables(lab), "the ordinary table stays (permanent mode)"
    assert not lab.probes.dns_udp("192.0.2.1"), "and keeps the host locked"


def test_sigkilled_daemon_takes_the_twin_and_leaves_the_ordinary_table(lab: LabUnderTest) -> None:
    daemon = lab.daemon()
    try:
        status = daemon.start()
        assert status is not None and owned_and_restored(status)
        mark = lab.observer.mark()
        daemon.kill()
        assert f"table inet {OWNED}" not in tables(lab), "the kernel frees it with the daemon's socket"
        assert "table inet tunlock\n" in tables(lab)
        assert not lab.probes.dns_udp("192.0.2.1") and not lab.probes.ping(interface="wan0")
        leaks = lab.observer.leaks(since=mark)
        assert not leaks, describe(leaks)
    finally:
        daemon.stop()
