"""`tunlock leaktest` against the ISP's observer (issue 24): with the lock it reports nothing and
nothing arrives; with a hole made by another tool it names what got out, and the observer saw
exactly that: every probe reported leaked arrived, and none reported blocked did."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable

import pytest

from supervisor.lab.probes import describe
from supervisor.lab.topology import sh
from tests.lab.conftest import LabUnderTest, tunlock_in_client

pytestmark = pytest.mark.lab(servers=1)

ECHO_REQUEST = {4: 8, 6: 128}


def leaktest(lab: LabUnderTest) -> tuple[int, dict, list[dict], str]:
    """One `tunlock leaktest --json` in the client: exit code, report, what the observer saw."""
    mark = lab.observer.mark()
    result = tunlock_in_client(lab, "leaktest", "--json", "--config", str(lab.lab.config_path))
    seen = lab.observer.leaks(since=mark)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout), seen, result.stderr


def _flow(probe: dict) -> tuple[str, int, str, int]:
    """What the observer can tell of a probe: transport, family, target, port (a probe bound to
    wan0 and its unbound twin look the same on the wire)."""
    kind = probe["kind"]
    transport = "icmp" if kind == "icmp" else "tcp" if kind in ("tcp", "dns-tcp") else "udp"
    return transport, probe["family"], probe["target"], probe["port"]


def _observed(seen: Iterable[dict]) -> set[tuple[str, int, str, int]]:
    out = set()
    for packet in seen:
        if packet["proto"] in (1, 58):
            if packet.get("icmp_type") == ECHO_REQUEST[packet["family"]]:
                out.add(("icmp", packet["family"], packet["dst"], 0))
        elif packet["proto"] in (6, 17):
            out.add(
                ("tcp" if packet["proto"] == 6 else "udp", packet["family"], packet["dst"], packet["dport"])
            )
    return out


def assert_agrees_with_observer(report: dict, seen: list[dict]) -> None:
    """No false alarm, no miss: the flows reported leaked are the flows the observer saw."""
    leaked = {_flow(p) for p in report["probes"] if p["leaked"]}
    blocked = {_flow(p) for p in report["probes"] if not p["leaked"]} - leaked
    observed = _observed(seen)
    assert leaked <= observed, f"reported leaked but not seen: {leaked - observed}\n{describe(seen)}"
    assert not (blocked & observed), f"reported blocked but seen: {blocked & observed}\n{describe(seen)}"


def test_with_the_lock_alone_nothing_gets_out(locked):
    code, report, seen, _ = leaktest(locked)
    assert seen == [], f"the leak test's own probes leaked:\n{describe(seen)}"
    assert code == 0, report["summary"]
    assert report["leaks"] == 0 and len(report["probes"]) >= 20
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["lock"] == "ok" and checks["ipv6"] == "ok"
    # With the lock the kernel refuses at send time: most lines say so, not merely "no answer".
    refused = [p for p in report["probes"] if p["how"].startswith("refused by the kernel")]
    assert len(refused) > len(report["probes"]) // 2


def test_while_connected_nothing_gets_out_and_the_tunnel_works(lab, daemon):
    daemon.start()
    code, report, seen, _ = leaktest(lab)
    assert seen == [], f"the leak test's own probes leaked:\n{describe(seen)}"
    assert code == 0, report["summary"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["tunnel"]["status"] == "ok", checks["tunnel"]
    assert checks["lock-owned"]["status"] == "ok" and checks["dns"]["status"] == "ok"
    assert any(p["outcome"] == "tunnel" for p in report["probes"])  # unbound probes went through it
    daemon.stop()
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))


HOLES = {
    # Another tool writes into both tables of the lock, the inet one's output chain and the
    # netdev one's egress chain (an accept in a table of its own would not override their drops),
    # or deletes them while no daemon holds the owned twin.
    "dns": (
        [
            "insert rule inet tunlock output udp dport 53 accept",
            "insert rule netdev tunlock egress udp dport 53 accept",
        ],
        {"dns-udp"},
    ),
    "ipv6": (
        [
            "insert rule inet tunlock output meta nfproto ipv6 accept",
            "insert rule netdev tunlock egress meta protocol ip6 accept",
        ],
        {"icmp", "udp", "tcp", "dns-udp"},
    ),
    "tables deleted": (
        ["delete table inet tunlock", "delete table netdev tunlock"],
        {"icmp", "udp", "tcp", "dns-udp", "dns-tcp", "endpoint-no-mark"},
    ),
}


def make_hole(lab: LabUnderTest, rules: list[str]) -> None:
    sh("ip", "netns", "exec", lab.lab.ns("client"), "nft", "-f", "-", input="\n".join(rules) + "\n")


@pytest.mark.parametrize("hole", list(HOLES))
def test_a_hole_made_by_another_tool_is_named_and_the_observer_agrees(locked, hole):
    rules, kinds = HOLES[hole]
    make_hole(locked, rules)
    code, report, seen, _ = leaktest(locked)
    assert code == 1, report["summary"]
    named = {p["kind"] for p in report["probes"] if p["leaked"]}
    assert kinds <= named, f"{hole}: named {named}"
    if hole == "ipv6":
        assert {p["family"] for p in report["probes"] if p["leaked"]} == {6}
        assert {c["name"]: c["status"] for c in report["checks"]}["ipv6"] == "FAIL"
    if hole == "dns":
        assert named == {"dns-udp"}
    if hole == "tables deleted":
        assert {c["name"]: c["status"] for c in report["checks"]}["lock"] == "FAIL"
    assert_agrees_with_observer(report, seen)


def test_the_inet_table_deleted_is_named_while_the_egress_chain_still_holds(locked):
    """Half a hole: the host's own packets pass output, and the egress chain on the uplink drops
    them (ENOBUFS at send time). Nothing gets out, and the lock check says what is missing."""
    make_hole(locked, ["delete table inet tunlock"])
    code, report, seen, _ = leaktest(locked)
    assert seen == [], describe(seen)
    assert report["leaks"] == 0 and code == 1
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["lock"] == "FAIL" and checks["lock-egress"] == "ok"
    assert any("ENOBUFS" in p["how"] for p in report["probes"])


def test_config_errors_exit_2_with_file_and_line(lab, tmp_path):
    bad = tmp_path / "tunlock.toml"
    bad.write_text('[tunnel]\ninterface = "has a space"\n')
    result = tunlock_in_client(lab, "leaktest", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2:" in result.stderr


def test_without_cap_net_raw_a_blocked_line_is_still_true_and_nothing_that_left_is_called_blocked(locked):
    """As in a podman container without NET_RAW: no capture, no raw sockets. What the kernel
    refused is reported blocked and was not seen; what it let go is LEAK? (exit 1), never blocked."""
    make_hole(locked, HOLES["dns"][0])
    mark = locked.observer.mark()
    enter = ["ip", "netns", "exec", locked.lab.ns("client"), "env", "TUNLOCK_LAB_ONLY=1"]
    without_net_raw = ["setpriv", "--bounding-set", "-net_raw", "--"]
    command = [
        sys.executable,
        "-m",
        "supervisor.cli",
        "leaktest",
        "--json",
        "--config",
        str(locked.lab.config_path),
    ]
    result = subprocess.run(
        [*enter, *without_net_raw, *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    seen = locked.observer.leaks(since=mark)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["captured"] is False, report["summary"]
    blocked = {_flow(p) for p in report["probes"] if p["outcome"] == "blocked"}
    suspect = {_flow(p) for p in report["probes"] if p["outcome"] in ("LEAK", "LEAK?")}
    observed = _observed(seen)
    assert not (blocked & observed), f"reported blocked but seen: {blocked & observed}\n{describe(seen)}"
    assert observed <= suspect, f"seen but not reported: {observed - suspect}\n{describe(seen)}"
    assert ("udp", 4, "192.0.2.1", 53) in observed & suspect


def test_a_macvlan_child_of_the_uplink_is_named_and_failed_without_the_egress_chain(locked):
    """A container's macvlan on the uplink skips the host's inet hooks: only the egress chain
    holds it. The probes cannot see that; the bypass check names it."""
    client = locked.lab.ns("client")
    sh("ip", "-n", client, "link", "add", "ltmv0", "link", "wan0", "type", "macvlan", "mode", "bridge")
    try:
        _, report, _, _ = leaktest(locked)
        bypass = {c["name"]: c for c in report["checks"]}["bypass"]
        assert bypass["status"] == "note" and "ltmv0" in bypass["how"], bypass
        make_hole(locked, ["delete table netdev tunlock"])
        code, report, _, _ = leaktest(locked)
        bypass = {c["name"]: c for c in report["checks"]}["bypass"]
        assert code == 1 and bypass["status"] == "FAIL" and "ltmv0" in bypass["how"], bypass
    finally:
        sh("ip", "-n", client, "link", "del", "ltmv0", check=False)
