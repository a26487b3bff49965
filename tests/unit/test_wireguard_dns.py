"""Pointing the host's resolvers at the tunnel and back, for each way a host keeps them."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest
import structlog

from supervisor.net.dns import (
    DnsError,
    Resolvconf,
    ResolvConfFile,
    Resolvectl,
    detect_dns_manager,
    render_resolv_conf,
    run_command,
)

ORIGINAL = "# from DHCP\nnameserver 192.0.2.1\nsearch lan\n"
TUNNEL_DNS = (ip_address("10.99.0.1"), ip_address("fd00:99::1"))


@pytest.fixture(autouse=True)
def _logs_to_the_current_stdout() -> None:
    # Another test may have configured structlog to a capture stream that is closed by now.
    structlog.reset_defaults()


@pytest.fixture
def resolv(tmp_path: Path) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text(ORIGINAL)
    return path


def test_file_apply_writes_only_the_tunnel_resolvers_and_restore_puts_the_original_back(
    resolv: Path, tmp_path: Path
) -> None:
    dns = ResolvConfFile(resolv, tmp_path / "state" / "tl0.resolv.conf.orig")
    dns.apply(TUNNEL_DNS)
    lines = [ln for ln in resolv.read_text().splitlines() if not ln.startswith("#")]
    assert lines == ["nameserver 10.99.0.1", "nameserver fd00:99::1"]
    dns.apply(TUNNEL_DNS[:1])  # a swap to a server with other resolvers keeps the first backup
    dns.restore()
    assert resolv.read_text() == ORIGINAL
    assert not dns.backup.exists()


def test_file_is_rewritten_in_place_so_bind_mounts_survive(resolv: Path, tmp_path: Path) -> None:
    inode = resolv.stat().st_ino
    dns = ResolvConfFile(resolv, tmp_path / "tl0.orig")
    dns.apply(TUNNEL_DNS)
    dns.restore()
    assert resolv.stat().st_ino == inode


def test_a_restarted_daemon_restores_the_original_from_the_backup(resolv: Path, tmp_path: Path) -> None:
    backup = tmp_path / "tl0.orig"
    ResolvConfFile(resolv, backup).apply(TUNNEL_DNS)
    # The daemon crashed; a new one adopts the tunnel and applies again: the backup is kept.
    again = ResolvConfFile(resolv, backup)
    again.apply(TUNNEL_DNS)
    again.restore()
    assert resolv.read_text() == ORIGINAL


def test_a_file_changed_by_someone_else_is_left_alone(resolv: Path, tmp_path: Path) -> None:
    dns = ResolvConfFile(resolv, tmp_path / "tl0.orig")
    dns.apply(TUNNEL_DNS)
    resolv.write_text("nameserver 192.0.2.53\n")  # DHCP renewed the lease meanwhile
    dns.restore()
    assert resolv.read_text() == "nameserver 192.0.2.53\n"


def test_an_unwritable_file_is_a_clear_error(tmp_path: Path) -> None:
    dns = ResolvConfFile(tmp_path / "missing-dir" / "resolv.conf", tmp_path / "tl0.orig")
    with pytest.raises(DnsError, match="cannot set the resolvers in"):
        dns.apply(TUNNEL_DNS)


def test_render_names_every_server() -> None:
    assert render_resolv_conf(TUNNEL_DNS).endswith("nameserver 10.99.0.1\nnameserver fd00:99::1\n")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: list[str], stdin: str | None) -> None:
        self.calls.append((argv, stdin))


def test_resolvectl_sets_the_links_dns_and_catch_all_domain() -> None:
    run = Recorder()
    dns = Resolvectl("tl0", run=run)
    dns.apply(TUNNEL_DNS)
    dns.restore()
    assert [argv for argv, _ in run.calls] == [
        ["resolvectl", "dns", "tl0", "10.99.0.1", "fd00:99::1"],
        ["resolvectl", "domain", "tl0", "~."],
        ["resolvectl", "default-route", "tl0", "true"],
        ["resolvectl", "revert", "tl0"],
    ]


def test_resolvconf_registers_an_exclusive_record_like_wg_quick() -> None:
    run = Recorder()
    dns = Resolvconf("tl0", run=run)
    dns.apply(TUNNEL_DNS)
    dns.restore()
    (add, stdin), (delete, _) = run.calls
    assert add == ["resolvconf", "-a", "tun.tl0", "-m", "0", "-x"]
    assert stdin is not None and "nameserver 10.99.0.1" in stdin
    assert delete == ["resolvconf", "-d", "tun.tl0", "-f"]


def test_a_failing_tool_says_what_it_said() -> None:
    with pytest.raises(DnsError, match="false failed: exit 1"):
        run_command(["false"])


def test_detection(tmp_path: Path) -> None:
    resolved = tmp_path / "run-systemd-resolve"
    resolved.mkdir()
    (resolved / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
    etc = Path("/etc/resolv.conf")

    def which(tools: set[str]):
        return lambda name: f"/usr/bin/{name}" if name in tools else None

    state = tmp_path / "state"
    explicit = detect_dns_manager("tl0", tmp_path / "resolv.conf", state, which({"resolvconf"}))
    assert isinstance(explicit, ResolvConfFile) and explicit.backup == state / "tl0.resolv.conf.orig"
    assert isinstance(detect_dns_manager("tl0", etc, state, which({"resolvconf"}), resolved), Resolvconf)
    assert isinstance(detect_dns_manager("tl0", etc, state, which(set()), resolved), ResolvConfFile)


def test_a_file_rewritten_while_connected_is_put_back_and_the_rewrite_becomes_the_backup(
    resolv: Path, tmp_path: Path
) -> None:
    dns = ResolvConfFile(resolv, tmp_path / "tl0.orig")
    dns.apply(TUNNEL_DNS)
    assert dns.reassert(TUNNEL_DNS) is False  # ours, untouched: nothing written
    resolv.write_text("nameserver 192.0.2.53\n")  # a DHCP client renewed its lease
    assert dns.reassert(TUNNEL_DNS) is True
    assert resolv.read_text() == render_resolv_conf(TUNNEL_DNS)
    dns.restore()
    assert resolv.read_text() == "nameserver 192.0.2.53\n"  # the newest of the host's own
