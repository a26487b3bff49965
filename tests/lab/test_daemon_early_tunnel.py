"""`tunlock run` with the lock already in place, as at boot: the tunnel first, then the daemon.

With the boot file loaded (``tunlock lock export``), ``tunlock run`` brings the tunnel up before
the daemon starts, and the daemon adopts it (supervisor/early_tunnel.py); without it, the normal
start (the lock first) runs unchanged. The ISP's observer must see nothing but WireGuard to an
endpoint; with the boot lock a ping runs through the whole start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import ContinuousPing
from tests.lab.conftest import LabUnderTest

pytestmark = pytest.mark.lab(servers=2, per_test=True)

EARLY = "tunnel up ahead of the daemon, which adopts it"


def records(daemon: LabDaemon) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log_events():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # wireguard-go's or Python's own lines, if any
    return out


def first(recs: list[dict[str, Any]], event: str, **fields: Any) -> int:
    """The index of the first record of ``event`` (with ``fields``); fails the test when absent."""
    for index, record in enumerate(recs):
        if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
            return index
    raise AssertionError(f"no {event!r} {fields or ''} in the daemon's log:\n" + "\n".join(map(str, recs)))


def load_boot_lock(lab: LabUnderTest, tmp_path: Path) -> None:
    """What the early-boot unit does: ``tunlock lock export``'s file, loaded with nft."""
    exported = tmp_path / "lock.nft"
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "lock", "export", "--config", str(lab.lab.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    exported.write_text(result.stdout)
    lab.lab.run("client", "nft", "-f", str(exported))
    assert "table inet tunlock" in lab.lab.run("client", "nft", "list", "tables")


def stand_in(tmp_path: Path, program: str, script: Callable[[str], str]) -> str:
    """A PATH on which ``program`` is a shell script, ``script(path of the real program)``."""
    real = shutil.which(program)
    assert real is not None
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    fake = directory / program
    fake.write_text(f"#!/bin/sh\n{script(real)}\n")
    fake.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


def test_with_the_boot_lock_the_tunnel_comes_up_first_and_the_daemon_adopts_it(
    lab: LabUnderTest, tmp_path: Path
) -> None:
    load_boot_lock(lab, tmp_path)
    mark = lab.observer.mark()
    pinger = ContinuousPing(lab.lab, interval=0.05)
    with lab.daemon() as daemon:
        status = daemon.start()
        pinger.wait_for_answers(3)
        pinger.stop()
        assert status is not None and status["server"] == "vpn1" and status["state"] == "connected"
        recs = records(daemon)
        # The tunnel was up before the daemon ran: the daemon found it running and adopted it,
        # then put its own lock in place over the boot one.
        early = first(recs, EARLY, server="vpn1")
        assert not any(r.get("event") == "tunnel connected" for r in recs), "the daemon set no peer"
        assert early < first(recs, "adopted the running tunnel", server="vpn1")
        assert early < first(recs, "tunlock running", adopted="vpn1")
        assert early < first(recs, "the lock is held twice while running")
        # The daemon's lock is in force before the taken-over tunnel's routes are checked and its
        # resolvers set: the tunnel carries traffic already, the lock should not wait for them.
        locked = first(recs, "the lock's egress chain holds every frame leaving")
        assert locked < first(recs, "adopted the running tunnel", server="vpn1")
        assert locked < first(recs, "resolvers set")
        assert first(recs, "state", state="connecting", reason="adopting the running tunnel") > early
        assert lab.probes.ping() and lab.probes.dns_udp("10.99.0.1")
        # The early bring-up leaves the interface without an IPv6 link-local address, as the
        # daemon does: no router solicitations into the tunnel.
        ifname = recs[first(recs, "adopted the running wireguard-go")]["ifname"]
        addresses = lab.lab.run("client", "ip", "-6", "addr", "show", "dev", ifname)
        assert "scope link" not in addresses and "scope global" in addresses
        # The daemon routed nothing anew: the rules the early bring-up made are the daemon's own.
        assert not any(r.get("event") == "tunnel routing in place" for r in recs)
        # wireguard-go is the daemon's child (started by the same process): its death is seen
        # with its exit status, it is reaped, and a new one takes over.
        pid = faults.client_wireguard_pid(lab.lab)
        assert pid == recs[first(recs, "adopted the running wireguard-go")]["pid"]
        faults.kill_client_wireguard_go(lab.lab)
        died = daemon.wait_for_log('"wireguard-go died"')
        assert json.loads(died)["reason"] == "killed by SIGKILL"
        daemon.wait_for(lambda s: s["last_failure"] is not None, 10, "the death noticed")
        daemon.wait_for(lambda s: s["state"] == "connected" and s["server"] == "vpn1", 20, "connected again")
        assert not Path(f"/proc/{pid}").exists(), "reaped, no zombie left"
        assert lab.probes.ping()
    lab.assert_no_leaks(mark)


def test_the_early_tunnel_has_its_handshake_done_when_the_daemon_first_looks(
    lab: LabUnderTest, tmp_path: Path
) -> None:
    # WireGuard starts its handshake only when it has a packet to send. The early bring-up sends
    # one probe, so the daemon's first reading of the adopted tunnel finds a handshake: without
    # it the daemon's own first probe started one, and `connected` came two samples later.
    load_boot_lock(lab, tmp_path)
    with lab.daemon(env={"TUNLOCK_LOG_LEVEL": "debug"}) as daemon:
        daemon.start()
        recs = records(daemon)
        assert first(recs, EARLY, server="vpn1") >= 0
        readings = [r["received"] for r in recs if str(r.get("received", "")).startswith("StatsRead(")]
        assert readings, "the daemon read the tunnel's counters"
        assert "handshake_age_s=None" not in readings[0], readings[0]


def test_without_the_lock_the_daemon_locks_first_as_before(lab: LabUnderTest) -> None:
    assert "table inet tunlock" not in lab.lab.run("client", "nft", "list", "tables")
    # No ping here: with no lock at all the host's own traffic leaves as it likes until the
    # daemon's lock is in force. What is counted is what the daemon's start sends.
    mark = lab.observer.mark()
    with lab.daemon() as daemon:
        status = daemon.start()
        assert status is not None and status["server"] == "vpn1" and status["state"] == "connected"
        recs = records(daemon)
        # Why the tunnel waited for the daemon, said once; then the normal start: the lock in
        # force before the first peer is set.
        first(recs, "the daemon starts the tunnel", reason="the lock (table inet tunlock) is not in place")
        assert not any(r.get("event") == EARLY for r in recs)
        assert first(recs, "the lock is held twice while running") < first(recs, "tunnel connected")
        assert first(recs, "tunlock running", adopted=None) >= 0
        assert lab.probes.ping()
    lab.assert_no_leaks(mark)


def test_a_failed_early_bring_up_is_undone_and_the_normal_start_follows(
    lab: LabUnderTest, tmp_path: Path
) -> None:
    load_boot_lock(lab, tmp_path)
    # The first wireguard-go started (the early bring-up's) never opens its UAPI socket; the
    # ones after it are the real program.
    started = tmp_path / "first-started"
    path = stand_in(
        tmp_path,
        "wireguard-go",
        lambda real: f'if [ ! -e {started} ]; then echo $$ > {started}; exec sleep 60; fi\nexec {real} "$@"',
    )
    mark = lab.observer.mark()
    with lab.daemon(env={"PATH": path}) as daemon:
        start_after_a_failed_bring_up(daemon, "did not open")
        # What it started is gone before the daemon's own start.
        assert not Path(f"/proc/{started.read_text().strip()}").exists()
        assert lab.probes.ping()
    lab.assert_no_leaks(mark)


def start_after_a_failed_bring_up(daemon: LabDaemon, said: str) -> tuple[list[dict[str, Any]], int]:
    """Start ``daemon`` and check that the early bring-up failed saying ``said`` and the normal
    start followed, adopting nothing; its log records and the failure's index in them."""
    status = daemon.start(timeout=30)
    assert status is not None and status["server"] == "vpn1" and status["state"] == "connected"
    recs = records(daemon)
    failed = first(recs, "could not bring the tunnel up ahead of the daemon; the daemon starts it")
    assert said in recs[failed]["error"]
    assert not any(r.get("event") == EARLY for r in recs)
    assert failed < first(recs, "tunlock running", adopted=None)
    return recs, failed


def our_rules(lab: LabUnderTest) -> list[str]:
    """The policy rules of both families, as ``ip rule`` lists them, without the kernel's own."""
    out = []
    for family in ("-4", "-6"):
        for line in lab.lab.run("client", "ip", family, "rule", "show").splitlines():
            if line.split(":")[0] not in ("0", "32766", "32767"):
                out.append(f"{family} {line.strip()}")
    return out


def test_after_a_daemon_stopped_the_next_start_brings_the_tunnel_up_first(lab: LabUnderTest) -> None:
    # A stopped daemon leaves the lock (permanent mode) and the administrator's reply rule: the
    # next start (a restart of the unit) finds the lock in place and one of its rules there.
    with lab.daemon() as daemon:
        daemon.start()
        rules = our_rules(lab)
    assert any("32750" in rule for rule in our_rules(lab)), "the administrator's rule stays"
    mark = lab.observer.mark()
    with lab.daemon() as daemon:
        status = daemon.start()
        assert status is not None and status["server"] == "vpn1" and status["state"] == "connected"
        first(records(daemon), EARLY, server="vpn1")
        assert sorted(our_rules(lab)) == sorted(rules), "the same rules, none twice"
        assert lab.probes.ping()
    lab.assert_no_leaks(mark)


def test_routing_that_fails_half_way_is_undone_and_the_normal_start_follows(
    lab: LabUnderTest, tmp_path: Path
) -> None:
    load_boot_lock(lab, tmp_path)
    # ``ip`` as the early bring-up's routing runs meet it: each does its work, then fails (as a
    # run stopped part way would); every other use of ``ip`` is the real one.
    path = stand_in(
        tmp_path,
        "ip",
        lambda real: (
            'case " $* " in *" -batch "*) case " $* " in *" -force "*) ;; *)'
            f' {real} "$@"; echo "RTNETLINK answers: Invalid argument" >&2; exit 1;; esac;; esac\n'
            f'exec {real} "$@"'
        ),
    )
    mark = lab.observer.mark()
    with lab.daemon(env={"PATH": path}) as daemon:
        recs, failed = start_after_a_failed_bring_up(daemon, "Invalid argument")
        # The early wireguard-go was stopped: the daemon started its own.
        assert first(recs, "started wireguard-go") > failed
        rules = our_rules(lab)
        assert len(rules) == len(set(rules)), f"a rule twice: {rules}"
        assert lab.probes.ping()
    lab.assert_no_leaks(mark)


def test_a_lock_that_lets_no_server_through_leaves_the_start_to_the_daemon(lab: LabUnderTest) -> None:
    # The container's first table (supervisor/container/block.nft): everything blocked until the
    # daemon's lock. A handshake it dropped would be tried again only 5 s later.
    block = Path(__file__).resolve().parents[2] / "supervisor" / "container" / "block.nft"
    lab.lab.run("client", "sh", "-c", f"sed s/@TABLE@/tunlock/g {block} | nft -f -")
    mark = lab.observer.mark()
    with lab.daemon() as daemon:
        status = daemon.start()
        assert status is not None and status["server"] == "vpn1" and status["state"] == "connected"
        recs = records(daemon)
        first(
            recs, "the daemon starts the tunnel", reason="the lock in place lets none of the servers through"
        )
        assert first(recs, "the lock is held twice while running") < first(recs, "tunnel connected")
        assert lab.probes.ping()
    lab.assert_no_leaks(mark)


def test_after_a_stop_on_another_server_the_tunnel_comes_up_to_that_one(lab: LabUnderTest) -> None:
    # A stopped daemon's lock lets through the server it was on, and no other.
    with lab.daemon() as daemon:
        daemon.start()
        daemon.ask("rotate")
        daemon.wait_for(lambda s: s["state"] == "connected" and s["server"] == "vpn2", 20, "on vpn2")
    mark = lab.observer.mark()
    with lab.daemon() as daemon:
        status = daemon.start()
        assert status is not None and status["server"] == "vpn2" and status["state"] == "connected"
        first(records(daemon), EARLY, server="vpn2")
        assert lab.probes.ping()
    lab.assert_no_leaks(mark)
