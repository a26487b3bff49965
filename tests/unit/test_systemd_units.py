"""The units `tunlock systemd install` writes, and its --dry-run, as a user sees them."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

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
