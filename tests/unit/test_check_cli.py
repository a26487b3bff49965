"""`tunlock check` as a user runs it: exit code, summary, file:line errors, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from supervisor.check import PARALLEL_FROM_FILES

from .samples import PRIVATE_KEY, VALID_SERVER

REPO = Path(__file__).resolve().parents[2]


def tunlock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_the_shipped_example_passes():
    result = tunlock("check", "--config", "configs/tunlock.toml")
    assert result.returncode == 0, result.stderr
    assert "ok: 2 servers, 2 endpoints over IPv4+IPv6" in result.stdout


def test_broken_files_give_every_problem_and_exit_1(write_config, write_server):
    path = write_config("[lock]\ninbound_tcp = [0]\n")
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}:2: lock.inbound_tcp" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_server_errors_and_warnings_are_printed_without_keys(write_config, write_server):
    path = write_config("")
    write_server(
        f"[Interface]\nPrivateKey = {PRIVATE_KEY}\nAddress = 10.0.0.2/32\nPostUp = x\n[Peer]\n", "b.conf"
    )
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert "b.conf:5: [Peer] has no PublicKey" in result.stderr
    assert PRIVATE_KEY not in result.stderr + result.stdout


def test_warnings_do_not_fail_the_check(write_config, write_server):
    path = write_config("")
    (path.parent / "servers" / "vpn1.conf").chmod(0o644)
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 0
    assert "vpn1.conf: warning: holds a private key but is readable" in result.stderr


def test_missing_config_is_an_error_not_a_traceback(tmp_path):
    result = tunlock("check", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    assert "absent.toml: no such file" in result.stderr and "Traceback" not in result.stderr


def test_a_large_directory_read_in_shares_reports_like_a_small_one(tmp_path):
    # Past PARALLEL_FROM_FILES this process reads one share and a forked worker the other: a
    # problem in either share, errors and warnings alike, must reach the report with its line.
    count = PARALLEL_FROM_FILES + 100
    servers = tmp_path / "servers"
    servers.mkdir()

    def write(i: int, text: str, mode: int = 0o600) -> str:
        path = servers / f"vpn{i:04d}.conf"
        path.write_text(text)
        path.chmod(mode)
        return path.name

    def endpoint(i: int) -> str:  # one endpoint per file, 250 hosts x ports
        return f"198.51.100.{i % 250 + 1}:{51820 + i // 250}"

    for i in range(count):
        write(i, VALID_SERVER.replace("198.51.100.11:51820", endpoint(i)))
    config = tmp_path / "tunlock.toml"
    config.write_text("")
    first = write(0, VALID_SERVER.replace("198.51.100.11:51820", "vpn.example:51820"))
    last = write(count - 1, VALID_SERVER.replace("PersistentKeepalive = 25", "PersistentKeepalive = -1"))
    loose = write(count - 2, VALID_SERVER.replace("198.51.100.11:51820", endpoint(count - 2)), 0o644)

    result = tunlock("check", "--config", str(config))
    assert result.returncode == 1
    assert f"{first}:9: endpoint host 'vpn.example' is a name" in result.stderr
    assert f"{last}:11: PersistentKeepalive must be a whole number" in result.stderr
    assert "tunlock check: 2 problems" in result.stderr

    write(0, VALID_SERVER.replace("198.51.100.11:51820", endpoint(0)))
    write(count - 1, VALID_SERVER.replace("198.51.100.11:51820", "[2001:db8::11]:51820"))
    result = tunlock("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"{loose}: warning: holds a private key but is readable" in result.stderr
    assert f"ok: {count} servers, {count} endpoints over IPv4+IPv6" in result.stdout


def test_plugins_are_checked_by_name_and_options_with_their_lines(write_config):
    path = write_config('[plugins]\nenabled = ["natpmp", "nosuch"]\n\n[plugins.natpmp]\ngateway = "nope"\n')
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}:2: plugin 'nosuch' is not installed" in result.stderr
    assert f"{path}:5: [plugins.natpmp] gateway: Input is not a valid IPv4 address" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_ports_a_grant_may_bring_and_the_api_user_are_checked_with_their_lines(write_config):
    path = write_config(
        '[plugins]\nenabled = ["natpmp", "transmission"]\n\n[plugins.natpmp]\nallowed_ports = ["22-2222"]\n\n'
        '[plugins.transmission]\napi_user = "no-such-user-here"\n'
    )
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    ports = "allowed_ports: ['22-2222']: a list of ports and ranges"
    assert f"{path}:5: [plugins.natpmp] {ports}" in result.stderr
    assert f"{path}:8: [plugins.transmission] api_user: 'no-such-user-here': no such user" in result.stderr


def test_warnings_are_printed_beside_errors(write_config, write_server):
    """Issue #21, item 9c: with an error in the files, the warnings went unsaid until it was fixed."""
    path = write_config('[metrics]\nlisten = "0.0.0.0:9586"\n')
    (path.parent / "servers" / "vpn1.conf").chmod(0o644)
    write_server(f"[Interface]\nPrivateKey = {PRIVATE_KEY}\nAddress = 10.0.0.2/32\n[Peer]\n", "b.conf")
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    assert "b.conf:4: [Peer] has no PublicKey" in result.stderr
    assert "vpn1.conf: warning: holds a private key but is readable" in result.stderr
    assert "warning: metrics.listen 0.0.0.0:9586: the lock lets only this host scrape it" in result.stderr
    assert result.stderr.rstrip().endswith("tunlock check: 3 problems"), result.stderr
    quiet = tunlock("check", "--quiet", "--config", str(path))
    assert quiet.returncode == 1 and ": warning: " not in quiet.stderr, quiet.stderr


def test_each_plugin_option_is_validated_by_its_model_and_reported_at_its_own_line(write_config):
    path = write_config(
        '[plugins]\nenabled = ["static_port", "hooks", "qbittorrent"]\n\n'
        "[plugins.static_port]\nports = [22]\nlistener = []\n\n"
        '[plugins.hooks]\non_port = "echo {port}"\ntimeout_s = "10"\n\n'
        '[plugins.qbittorrent]\nusername = "seedbox"\n'
    )
    result = tunlock("check", "--config", str(path))
    assert result.returncode == 1
    err = result.stderr
    assert f"{path}:5: [plugins.static_port] ports: Input should be greater than or equal to 1024" in err
    assert f"{path}:6: [plugins.static_port] listener: unknown key (did you mean 'listeners'?)" in err
    assert f"{path}:10: [plugins.hooks] timeout_s: Input should be a valid number" in err
    # A check of the table as a whole is reported at the table's line.
    assert f"{path}:12: [plugins.qbittorrent]: set password_file or password_env" in err
    assert "tunlock check: 4 problems" in err
