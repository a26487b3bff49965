"""The daemon against hostile and careless input (issue #11): it never crashes, never hangs.

Each test throws something at a running daemon in the lab, then checks what a user would: it
still answers `status`, it still fails over when its server goes silent, and a stop sent to the
whole process group (systemd's default, Ctrl-C) ends it with status 0 and the lock in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from tests.lab.conftest import LabUnderTest
from tests.lab.test_daemon import QUICK, assert_no_leaks, on, tunlock

pytestmark = pytest.mark.lab(per_test=True, daemon_env=QUICK)


def tunlock_with(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_reload_dropping_the_current_server_moves_to_one_still_configured(lab: LabUnderTest) -> None:
    """Connected to vpn2 of vpn2 and vpn3; the list becomes vpn1 alone (issue #11, item 2: the
    path report for vpn1 reached the machine first, and it went offline for good)."""
    config = lab.lab.dir / "reload.toml"
    text = lab.lab.config_path.read_text()
    config.write_text(text.replace('servers = ["servers/*.conf"]', 'servers = ["servers/vpn[23].conf"]'))
    with lab.daemon(env=QUICK, config=str(config)) as daemon:
        daemon.start()
        mark = lab.observer.mark()
        daemon.wait_for(on("vpn2"), timeout=15, what="vpn2")
        config.write_text(text.replace('servers = ["servers/*.conf"]', 'servers = ["servers/vpn1.conf"]'))
        os.kill(daemon.pid, 1)  # SIGHUP
        began = time.monotonic()
        daemon.wait_for(on("vpn1"), timeout=15, what="vpn1 after a reload that dropped vpn2")
        print(f"reload dropping vpn2 -> connected to vpn1 after {time.monotonic() - began:.2f} s")
        assert lab.probes.ping()
        assert tunlock(lab, "health").returncode == 0
        states = [json.loads(line).get("state") for line in daemon.log_events() if '"state"' in line]
        assert "offline" not in states, "the path to vpn1 was there all along"
        assert_no_leaks(lab, mark)


# --- after each attack: what a user relies on -------------------------------------------------


def still_serving(lab: LabUnderTest, daemon: LabDaemon) -> None:
    """The daemon answers, and still fails over when its server goes silent."""
    status = daemon.status()
    assert status is not None, f"the daemon does not answer\n{daemon.log_tail()}"
    status = daemon.wait_for(lambda s: s["state"] == "connected", timeout=30, what="connected")
    current = status["server"]
    index = current.removeprefix("vpn")
    faults.blackhole_server(lab.lab, index)
    try:
        daemon.wait_for(
            lambda s: s["state"] == "connected" and s["server"] != current, timeout=30, what="failover"
        )
    finally:
        faults.restore_server(lab.lab, index)
    assert lab.probes.ping()


def stop_the_group(
    lab: LabUnderTest, daemon: LabDaemon, signum: int = signal.SIGTERM, *, lock_kept: bool = True
) -> int:
    """The signal to the daemon's whole process group, as systemd's stop and Ctrl-C send it (the
    lab starts it in a session of its own: the group is the daemon and its children)."""
    assert daemon.process is not None
    os.killpg(daemon.pid, signum)
    code = daemon.process.wait(15)
    tables = lab.lab.run("client", "nft", "list", "tables")
    assert ("table inet tunlock" in tables) is lock_kept, f"lock kept: {lock_kept}, tables: {tables}"
    assert lab.lab.client_ifname not in lab.lab.run("client", "ip", "-o", "link"), "the tunnel is down"
    return code


def children(pid: int) -> dict[int, str]:
    """The process's children: pid -> command line."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            listed = (task / "children").read_text().split()
        except OSError:
            continue  # a thread that ended meanwhile
        for child in listed:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                found[int(child)] = cmdline.replace(b"\0", b" ").decode().strip()
    return found


def exchange(path: Path, data: bytes, *, close: bool = True, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the control socket (then end the sending side) and read the answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        if data:
            sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


# --- item 3: ways to crash the daemon ---------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "mode"),
    [(signal.SIGTERM, "permanent"), (signal.SIGINT, "permanent"), (signal.SIGTERM, "session")],
    ids=["SIGTERM", "SIGINT", "SIGTERM-session"],
)
def test_a_stop_sent_to_the_whole_process_group_exits_0_and_keeps_the_lock(
    lab: LabUnderTest, signum: int, mode: str
) -> None:
    """Once 3 stops in 6 exited 1, "tunlock crashed": the signal killed the lock guard's
    `nft monitor` child too, and the guard raised ProcessLookupError ending it."""
    mark = lab.observer.mark()
    for _ in range(3):
        with lab.daemon(env={**QUICK, "TUNLOCK_LOCK_MODE": mode}) as daemon:
            daemon.start()
            code = stop_the_group(lab, daemon, signum, lock_kept=mode == "permanent")
            assert code == 0, f"exit {code}\n{daemon.log_tail()}"
            assert "crashed" not in daemon.log_tail(200)
        if mode == "permanent":
            assert not lab.probes.ping(), "stopped and locked: nothing gets out"
    if mode == "permanent":  # (a session-mode stop opens the host, on purpose)
        assert_no_leaks(lab, mark)


def test_the_guard_watches_without_helper_processes_and_sees_a_flush(
    lab: LabUnderTest, daemon: LabDaemon
) -> None:
    """The guard follows the ruleset and the routes on netlink sockets of its own (issue #27,
    item 2): no `nft monitor` or `ip monitor` child that a signal, an admin or the OOM killer
    could end, and a flush is still seen and undone."""
    daemon.start()
    mark = lab.observer.mark()
    helpers = [cmd for cmd in children(daemon.pid).values() if "monitor" in cmd.split()[1:]]
    assert helpers == [], f"helper processes: {helpers}"
    faults.flush_client_ruleset(lab.lab)
    deadline = time.monotonic() + 10
    while not any("lock tampered with; restored" in line for line in daemon.log_events()):
        assert time.monotonic() < deadline, f"the guard did not see the flush\n{daemon.log_tail()}"
        time.sleep(0.05)
    assert "table inet tunlock" in lab.lab.run("client", "nft", "list", "tables")
    still_serving(lab, daemon)
    assert stop_the_group(lab, daemon) == 0
    assert_no_leaks(lab, mark)


DEEP = b"[" * 1000
MALFORMED = {
    "deep-list": DEEP + b"\n",
    "deep-list-unended": DEEP,
    "deep-object": b'{"a":' * 1000 + b"1" + b"}" * 1000,
    "deep-in-command": b'{"command": ' + DEEP + b"}\n",
    "not-utf8": b'{"command": "\xff\xfe"}\n',
    "not-json": b"status\n",
    "a-list": b"[]\n",
    "a-string": b'"status"\n',
    "no-command": b"{}\n",
    "command-not-a-string": b'{"command": ["status"]}\n',
    "command-an-object": b'{"command": {"a": 1}}\n',
    "huge-number": b'{"command": 1' + b"0" * 5000 + b"}\n",
    "nan": b'{"command": NaN}\n',
    "too-long": b'{"command": "' + b"x" * 10000 + b'"}\n',
    "nul": b"\0\0\0\n",
    "empty": b"",
}


def test_malformed_control_requests_get_a_clear_error_and_the_daemon_keeps_serving(
    lab: LabUnderTest, daemon: LabDaemon
) -> None:
    daemon.start()
    mark = lab.observer.mark()
    for name, data in MALFORMED.items():
        raw = exchange(daemon.socket, data)
        assert daemon.process is not None and daemon.process.poll() is None, f"{name}:\n{daemon.log_tail()}"
        answer = json.loads(raw)
        assert answer["ok"] is False and answer["error"].startswith("bad request: "), (name, answer)
        assert len(answer["error"]) > len("bad request: ") + 5, (name, answer)
    still_serving(lab, daemon)
    assert stop_the_group(lab, daemon) == 0
    assert_no_leaks(lab, mark)


PROBE_TARGET = '[health]\nprobe_target = "not-an-ip"\n'


def test_a_probe_target_that_is_not_an_address_is_a_file_and_line_error(lab: LabUnderTest) -> None:
    config = lab.lab.dir / "probe.toml"
    config.write_text(lab.lab.config_path.read_text() + "\n" + PROBE_TARGET)
    line = config.read_text().splitlines().index('probe_target = "not-an-ip"') + 1
    checked = tunlock_with(config, "check")
    assert checked.returncode != 0 and f"{config}:{line}: health.probe_target" in checked.stderr, checked
    ran = subprocess.run(
        ["ip", "netns", "exec", lab.lab.ns("client"), sys.executable, "-m", "supervisor.cli", "run",
         "--config", str(config)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "TUNLOCK_LAB_ONLY": "1"},
    )  # fmt: skip
    assert ran.returncode == 2, ran
    assert f"{config}:{line}: health.probe_target" in ran.stderr and "Traceback" not in ran.stderr


def test_a_reload_with_a_bad_probe_target_keeps_the_running_config(lab: LabUnderTest) -> None:
    config = lab.lab.dir / "reload.toml"
    text = lab.lab.config_path.read_text()
    config.write_text(text)
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=str(config)) as daemon:
        daemon.start()
        config.write_text(text + "\n" + PROBE_TARGET)
        os.kill(daemon.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("reload refused" in line for line in daemon.log_events()):
            assert daemon.process is not None and daemon.process.poll() is None, daemon.log_tail()
            assert time.monotonic() < deadline, daemon.log_tail()
            time.sleep(0.05)
        assert any("probe_target" in line for line in daemon.log_events() if "reload refused" in line)
        still_serving(lab, daemon)
        assert stop_the_group(lab, daemon) == 0
    assert_no_leaks(lab, mark)


def test_a_stop_during_a_reload_that_blocks_ends_the_daemon(lab: LabUnderTest) -> None:
    """A FIFO in the server glob blocked the reload's read for good, and with it every signal
    after it (issue #11, item 8 is the read itself): the daemon answers meanwhile and a stop
    ends it with 0, whatever the read does."""
    config = lab.lab.dir / "fifo.toml"
    text = lab.lab.config_path.read_text()
    config.write_text(text)
    (lab.lab.dir / "fifo").mkdir()
    os.mkfifo(lab.lab.dir / "fifo" / "pipe.conf")
    with lab.daemon(env=QUICK, config=str(config)) as daemon:
        daemon.start()
        config.write_text(text.replace('"servers/*.conf"', '"servers/*.conf", "fifo/*.conf"'))
        logged = len(daemon.log_events())
        os.kill(daemon.pid, signal.SIGHUP)
        # The reload ran and met the FIFO: refused at once, no longer a read that blocks.
        refused = daemon.wait_for_log("reload refused", after=logged)
        assert "pipe.conf" in refused and "FIFO" in refused, refused
        status = daemon.status()
        assert status is not None and status["state"] == "connected", daemon.log_tail()
        assert stop_the_group(lab, daemon) == 0, daemon.log_tail()


# --- hunting: whatever a careless admin writes, then SIGHUP -----------------------------------


def toml_value(value: object) -> str:
    """``value`` as TOML source (invalid TOML is fine too: it is one more bad file)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value).replace("inf", "inf")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


SCALARS = (
    st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.sampled_from([0, 0.05, 0.5, 2, 60, 86400, -1])
    | st.text(max_size=12)
)
VALUES = SCALARS | st.lists(SCALARS, max_size=4)
GLOBS = st.sampled_from(
    ["servers/*.conf", "servers/vpn1.conf", "servers/vpn[23].conf", "fuzz/*.conf", "missing/*.conf", "*"]
)


def key(plausible: list[object], junk: st.SearchStrategy = VALUES) -> st.SearchStrategy:
    """Mostly a value a user would write (valid or nearly), sometimes anything at all."""
    return st.one_of(st.sampled_from(plausible), st.sampled_from(plausible), junk)


KEYS = {
    "tunnel": {"servers": st.lists(GLOBS, min_size=1, max_size=3) | VALUES, "fwmark": key([51820, 0])},
    "rotation": {"strategy": key(["sequential", "random", "roundrobin"]), "cooldown_s": key([1, 60, 0]),
                 "backoff_initial_s": key([1, 0.5, -1])},
    "health": {"probe_target": key(["10.99.0.1", "fd00:99::1", "not-an-ip", "fe80::1%eth0", ""]),
               "interval_s": key([0.5, 1, -1, "x"]), "dead_after_s": key([3, 5, 0, "3"]),
               "handshake_max_age_s": key([180, 1e9])},
    "lock": {"inbound_tcp": st.lists(st.integers(-5, 70000), max_size=3) | VALUES,
             "mode": key(["permanent"])},
    "control": {"socket": VALUES},
    "metrics": {"listen": key(["127.0.0.1:9586", "nonsense", ""])},
    "nonsense": {"key": VALUES},
}  # fmt: skip
# The sections a reload can change, twice as often as those where any change is refused.
SECTIONS = ["tunnel", "rotation", "health", "lock"] * 2 + ["control", "metrics", "nonsense"]
# Lines a server file may gain: the plausible, the hostile and the broken.
SERVER_LINES = st.sampled_from(
    [
        "PostUp = touch /tmp/tunlock-fuzz-pwned",
        "Endpoint = [::1]:0",
        "Endpoint = 198.51.100.1:99999",
        "PrivateKey =",
        "AllowedIPs = 300.0.0.0/0",
        "[Peer]",
        "[Interface]",
        "MTU = 1",
        "DNS = not-an-address",
        "Table = off",
        "=",
        "[",
    ]
) | st.text(max_size=40)


@st.composite
def reload_cases(draw: st.DrawFn, base_config: str, base_server: str) -> tuple[bytes, list[bytes]]:
    """A config file and the server files under ``fuzz/``: the lab's own, changed."""
    data = tomllib.loads(base_config)
    for _ in range(draw(st.integers(0, 2))):
        section = draw(st.sampled_from(SECTIONS))
        key = draw(st.sampled_from(sorted(KEYS[section])))
        data.setdefault(section, {})[key] = draw(KEYS[section][key])
    text = "\n".join(
        f"[{section}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items())
        for section, keys in data.items()
    )
    config = text.encode("utf-8", "surrogatepass")
    match draw(st.integers(0, 19)):
        case 0:
            config = draw(st.binary(max_size=200))
        case 1:
            config = b"\xef\xbb\xbf" + config  # a BOM, as editors on Windows write
        case 2:
            config += b"\n\xff\xfe"
        case 3:
            config = b""
    servers = []
    for _ in range(draw(st.integers(0, 3))):
        server = base_server.splitlines()
        for _ in range(draw(st.integers(0, 3))):
            where = draw(st.integers(0, len(server)))
            match draw(st.sampled_from(["drop", "insert", "duplicate"])):
                case "drop" if server:
                    del server[min(where, len(server) - 1)]
                case "duplicate" if server:
                    server.insert(where, server[min(where, len(server) - 1)])
                case _:
                    server.insert(where, draw(SERVER_LINES))
        servers.append("\n".join(server).encode("utf-8", "surrogatepass"))
    return config, servers


OUTCOMES = ("configuration reloaded", "reload refused", "reload failed")


def outcomes(daemon: LabDaemon) -> list[str]:
    return [o for line in daemon.log_events() for o in OUTCOMES if f'"event": "{o}' in line]


def sighup_and_wait(daemon: LabDaemon) -> str:
    """SIGHUP, then the reload's outcome as the log says it (never a hang, never a crash)."""
    before = len(outcomes(daemon))
    os.kill(daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + 45  # past the daemon's own 30 s limit on reading the files
    while len(seen := outcomes(daemon)) == before:
        assert daemon.process is not None and daemon.process.poll() is None, f"crashed\n{daemon.log_tail()}"
        assert time.monotonic() < deadline, f"the reload hangs\n{daemon.log_tail()}"
        time.sleep(0.02)
    return seen[before]


def test_sighup_with_any_config_and_server_files_never_crashes_or_hangs(lab: LabUnderTest) -> None:
    """Hypothesis writes configs and server files (a few dozen: one daemon serves them all), the
    daemon is told to reload each: it answers throughout, keeps the running configuration on
    every error, and afterwards still fails over and stops cleanly."""
    config = lab.lab.dir / "fuzz.toml"
    base_config = lab.lab.config_path.read_text()
    base_server = (lab.lab.dir / "servers" / "vpn2.conf").read_text()
    fuzz_dir = lab.lab.dir / "fuzz"
    fuzz_dir.mkdir()
    config.write_text(base_config)
    tally: dict[str, int] = {}
    with lab.daemon(env=QUICK, config=str(config)) as daemon:
        daemon.start()

        @settings(
            max_examples=int(os.environ.get("TUNLOCK_RELOAD_FUZZ_EXAMPLES", "40")),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=reload_cases(base_config, base_server))
        # What once crashed or stranded the daemon, tried every run before the random ones.
        @example(case=((base_config + '\n[health]\nprobe_target = "not-an-ip"\n').encode(), []))
        @example(case=(base_config.replace("servers/*.conf", "servers/vpn2.conf").encode(), []))
        @example(case=(base_config.replace("servers/*.conf", "fuzz/*.conf").encode(), [b"[Peer]\n"]))
        @example(case=(b"\xef\xbb\xbf" + base_config.encode(), []))
        def reload_with(case: tuple[bytes, list[bytes]]) -> None:
            text, servers = case
            for old in fuzz_dir.iterdir():
                old.unlink()
            for number, server in enumerate(servers):
                (fuzz_dir / f"f{number}.conf").write_bytes(server)
                (fuzz_dir / f"f{number}.conf").chmod(0o600)
            config.write_bytes(text)
            outcome = sighup_and_wait(daemon)
            tally[outcome] = tally.get(outcome, 0) + 1
            assert outcome != "reload failed", f"a reload raised\n{daemon.log_tail()}"
            assert daemon.status() is not None, f"no answer after the reload\n{daemon.log_tail()}"

        reload_with()
        print(f"\nreload outcomes: {tally}")
        assert tally.get("configuration reloaded") and tally.get("reload refused"), "both kinds were tried"
        assert not Path("/tmp/tunlock-fuzz-pwned").exists(), "a PostUp command ran"

        config.write_text(base_config)
        assert sighup_and_wait(daemon) == "configuration reloaded"
        daemon.wait_for(lambda s: s["state"] == "connected", timeout=30, what="connected on the lab's config")
        mark = lab.observer.mark()
        still_serving(lab, daemon)
        assert_no_leaks(lab, mark)
        assert stop_the_group(lab, daemon) == 0
    assert "Traceback" not in "\n".join(daemon.log_events())
