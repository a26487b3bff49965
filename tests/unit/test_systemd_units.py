"""The units `tunlock systemd install` writes, and its --dry-run, as a user sees them."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from msgspec.structs import replace

from supervisor.config import load_config
from supervisor.systemd import units

REPO = Path(__file__).resolve().parents[2]


def tunlock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def parse(text: str) -> configparser.RawConfigParser:
    """A unit file as key -> value (the last of repeated keys), enough to read settings back."""
    parser = configparser.RawConfigParser(strict=False, comment_prefixes=("#",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_the_daemon_unit_is_notify_with_watchdog_and_bounded_capabilities() -> None:
    config = load_config(REPO / "configs/tunlock.toml")
    unit = parse(units.daemon_unit(config, "/opt/venv/bin/python"))
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] == str(units.WATCHDOG_S)
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"] == (
        f"/opt/venv/bin/python -m supervisor.cli run --config {config.path.resolve()} --log-format json"
    )
    assert service["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert service["DeviceAllow"] == "/dev/net/tun rw"
    assert service["ProtectSystem"] == "strict"
    assert service["KillMode"] == "process"  # wireguard-go survives a restart, to be adopted
    # systemd's default soft limit (1024) let a local user's connections end the daemon (#21)
    assert int(service["LimitNOFILE"]) >= 4096
    assert unit["Unit"]["Requires"] == units.LOCK_UNIT_NAME
    assert units.LOCK_UNIT_NAME in unit["Unit"]["After"].split()


def test_a_control_socket_elsewhere_is_made_writable(write_config) -> None:
    path = write_config('[control]\nsocket = "/srv/tunlock/control.sock"\n[dns]\nmanage = false\n')
    service = parse(units.daemon_unit(load_config(path), "/usr/bin/python3"))["Service"]
    assert service["ReadWritePaths"] == "/srv/tunlock"


def test_the_lock_unit_runs_nft_before_the_network() -> None:
    unit = parse(units.lock_unit(Path("/etc/tunlock/lock.nft")))
    assert unit["Unit"]["DefaultDependencies"] == "no"
    assert unit["Unit"]["Before"] == "network-pre.target"
    assert unit["Unit"]["Wants"] == "network-pre.target"
    assert unit["Service"]["ExecStart"] == "/usr/sbin/nft -f /etc/tunlock/lock.nft"
    assert unit["Install"]["WantedBy"] == "sysinit.target"


def test_dry_run_prints_the_three_files_and_writes_nothing(tmp_path: Path) -> None:
    lock_file = tmp_path / "lock.nft"
    result = tunlock(
        "systemd", "install", "--config", "configs/tunlock.toml", "--dry-run", "--lock-file", str(lock_file)
    )
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("# /")]
    assert headers == [
        f"# {lock_file}",
        "# /etc/systemd/system/tunlock-lock.service",
        "# /etc/systemd/system/tunlock.service",
    ]
    assert "table inet tunlock {" in result.stdout
    assert f"ExecStart=/usr/sbin/nft -f {lock_file}" in result.stdout
    assert "Type=notify" in result.stdout
    assert not lock_file.exists()


def test_a_bad_config_installs_nothing(write_config) -> None:
    path = write_config("[lock]\ninbound_tcp = [0]\n")
    result = tunlock("systemd", "install", "--config", str(path), "--dry-run")
    assert result.returncode == 2
    assert f"{path}:2: lock.inbound_tcp" in result.stderr
    assert "nothing was installed" in result.stderr


def test_a_venv_under_root_and_a_config_under_tmp_are_shown_to_the_daemon_read_only(write_config) -> None:
    config = load_config(write_config(""))  # under pytest's /tmp
    text = units.daemon_unit(config, "/root/venv/bin/python", program=[Path("/root/venv/lib/site-packages")])
    lines = text.splitlines()
    assert "ProtectHome=tmpfs" in lines, "an empty /home and /root, with only what is bound in"
    assert "PrivateTmp=yes" in lines
    binds = [
        line.removeprefix("BindReadOnlyPaths=") for line in lines if line.startswith("BindReadOnlyPaths=")
    ]
    assert "/root/venv" in binds and "/root/venv/lib/site-packages" not in binds, "the outermost path only"
    assert str(config.path.resolve().parent) in binds
    assert not any(b.startswith("/home") or b == "/root" for b in binds), "the rest of the homes stays hidden"


def test_an_install_in_opt_keeps_the_homes_hidden_and_binds_nothing() -> None:
    # As installed (/etc/tunlock), wherever this checkout happens to be (CI's may be under /tmp).
    read = load_config(REPO / "configs/tunlock.toml")
    etc = Path("/etc/tunlock")
    servers = tuple(replace(s, path=etc / "servers" / s.path.name) for s in read.servers)
    config = replace(read, path=etc / "tunlock.toml", servers=servers)
    lines = units.daemon_unit(
        config, "/opt/tunlock/bin/python", program=[Path("/opt/tunlock/lib")]
    ).splitlines()
    assert "ProtectHome=yes" in lines
    assert not any(line.startswith(("BindReadOnlyPaths=", "BindPaths=")) for line in lines)


def test_a_control_socket_under_tmp_is_bound_writable(write_config) -> None:
    path = write_config('[control]\nsocket = "/tmp/tunlock-test-ctl/control.sock"\n[dns]\nmanage = false\n')
    lines = units.daemon_unit(load_config(path), "/usr/bin/python3").splitlines()
    assert "BindPaths=/tmp/tunlock-test-ctl" in lines
    assert not any(line.startswith("ReadWritePaths=/tmp") for line in lines)


def test_the_trial_run_carries_the_units_sandbox_and_nothing_of_how_it_is_run(write_config) -> None:
    text = units.daemon_unit(load_config(write_config("")), "/root/venv/bin/python")
    props = units.sandbox_properties(text)
    keys = [p.partition("=")[0] for p in props]
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "BindReadOnlyPaths", "SystemCallFilter"):
        assert key in keys, key
    for key in ("Type", "ExecStart", "WatchdogSec", "Restart", "KillMode", "RuntimeDirectory"):
        assert key not in keys, key
    assert "ProtectHome=tmpfs" in props
