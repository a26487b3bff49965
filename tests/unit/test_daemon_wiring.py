"""What the daemon decides from its configuration, without root: the machine's settings, where
probes go, which changes a reload refuses, and the order in which a reload reaches the machine.

Configurations are real files read by the real loader (in a temp dir). For ``_reload`` the
runtime, lock and path monitor are stand-ins recording what they were asked, and the one
netlink lookup (which servers have a path right now) is replaced: unit tests run in the
machine's own namespace, where no route to a lab server exists. The daemon's reloads against
real parts are tested in tests/lab/test_daemon.py and tests/lab/test_daemon_hardening.py.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from msgspec.structs import replace
from pyroute2 import AsyncIPRoute

from supervisor import daemon
from supervisor.config import Config, load_config
from supervisor.lock.configured import policy_from_config
from supervisor.machine.settings import MachineSettings
from supervisor.runtime import Reconfiguration

TUNED = """\
[rotation]
strategy = "random"
cooldown_s = 30
backoff_initial_s = 3
backoff_max_s = 90

[health]
interval_s = 0.5
idle_interval_s = 4
probe_interval_s = 0.75
idle_probe_s = 12
doubt_probe_interval_s = 0.05
min_unanswered_probes = 9
dead_after_s = 2
probe_reply_s = 0.3
handshake_max_age_s = 150
connect_timeouts_s = [1, 2]

[lock]
mode = "session"
"""


def test_the_machine_gets_every_setting_it_acts_on_and_the_servers_in_file_order(write_config) -> None:
    config = load_config(write_config(TUNED, servers=3), {})
    assert daemon.machine_settings(config) == MachineSettings(
        servers=("vpn1", "vpn2", "vpn3"),
        strategy="random",
        cooldown_s=30,
        backoff_initial_s=3,
        backoff_max_s=90,
        interval_s=0.5,
        idle_interval_s=4,
        probe_interval_s=0.75,
        idle_probe_s=12,
        doubt_probe_interval_s=0.05,
        min_unanswered_probes=9,
        dead_after_s=2,
        probe_reply_s=0.3,
        handshake_max_age_s=150,
        connect_timeouts_s=(1, 2),
        lock_mode="session",
    )


def test_servers_with_nothing_to_probe_are_named_to_the_machine(write_config) -> None:
    """Without tunnel DNS and without health.probe_target there is no answer to ask for while
    connecting: the machine must know, or it would wait for one until the server failed."""
    config = load_config(write_config("", servers=3), {})
    first, second, third = config.servers
    no_dns = replace(config, servers=(first, replace(second, dns=()), third))
    assert daemon.machine_settings(config).unprobed == frozenset()
    assert daemon.machine_settings(no_dns).unprobed == frozenset({"vpn2"})
    fixed = load_config(write_config('[health]\nprobe_target = "10.64.0.1"\n', servers=3), {})
    fixed_no_dns = replace(fixed, servers=tuple(replace(s, dns=()) for s in fixed.servers))
    assert daemon.machine_settings(fixed_no_dns).unprobed == frozenset()


def test_probes_go_to_the_servers_dns_inside_the_tunnel_by_default(write_config, write_server) -> None:
    config = load_config(write_config("", servers=1), {})
    [server] = config.servers
    target = daemon.probe_target(config)
    assert target(server) == ip_address("10.64.1.1")  # the sample server's DNS
    assert target(replace(server, dns=())) is None  # nothing to probe


def test_a_configured_probe_target_is_used_for_every_server(write_config) -> None:
    config = load_config(write_config('[health]\nprobe_target = "fd00:99::1"\n', servers=2), {})
    target = daemon.probe_target(config)
    assert [target(s) for s in config.servers] == [ip_address("fd00:99::1")] * 2


RESTART_ONLY_EDITS = {
    "tunnel.interface": '[tunnel]\ninterface = "tl9"\n',
    "tunnel.backend": '[tunnel]\nbackend = "userspace"\n',
    "tunnel.fwmark": "[tunnel]\nfwmark = 7\n",
    "tunnel.route_table": "[tunnel]\nroute_table = 700\n",
    "tunnel.namespace": '[tunnel]\nnamespace = "seed"\n',
    "namespace.ui_tcp": "[namespace]\nui_tcp = [8080]\n",
    "namespace.ui_subnet": '[namespace]\nui_subnet = "169.254.9.0/30"\n',
    "lock.table": '[lock]\ntable = "other"\n',
    "lock.mode": '[lock]\nmode = "session"\n',
    "control.socket": '[control]\nsocket = "/run/elsewhere/control.sock"\n',
    "metrics.listen": '[metrics]\nlisten = "127.0.0.1:9586"\n',
}


def test_every_restart_only_setting_is_covered_by_an_edit_here() -> None:
    assert sorted(RESTART_ONLY_EDITS) == sorted(f"{s}.{n}" for s, n in daemon.RESTART_ONLY)


@pytest.mark.parametrize("setting", sorted(RESTART_ONLY_EDITS))
def test_a_changed_restart_only_setting_is_named(write_config, setting: str) -> None:
    before = load_config(write_config(""), {})
    after = load_config(write_config(RESTART_ONLY_EDITS[setting]), {})
    assert daemon.restart_only_changes(before, after) == [setting]


def test_settings_a_reload_can_apply_are_not_named(write_config) -> None:
    before = load_config(write_config(""), {})
    after = load_config(write_config(TUNED.replace('mode = "session"', "allow_lan = false"), servers=2), {})
    assert daemon.restart_only_changes(before, after) == []


# --- _reload, with stand-ins ---------------------------------------------------------------------


class Recorder:
    """The runtime, lock and path monitor in one: every call lands in ``calls``, in order."""

    def __init__(self, config: Config) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.servers = {s.name: s for s in config.servers}
        self.probe_target: Callable[..., Any] = daemon.probe_target(config)
        self.ifname = "tl-test"
        self.lock_refuses = False

    async def reconfigure(self, change: Reconfiguration) -> bool:
        self.calls.append(("reconfigure", change))
        if self.lock_refuses:
            return False
        self.servers = dict(change.servers)
        return True

    async def route_socket(self) -> AsyncIPRoute:
        raise AssertionError("no netlink in a unit test: _reachable_now is replaced (no_netlink)")

    def set_endpoints(self, endpoints: Any) -> None:
        self.calls.append(("set_endpoints", sorted(str(e) for e in endpoints)))


def reload(config: Config, world: Recorder) -> tuple[Config, list[MutableMapping[str, Any]]]:
    async def main() -> Config:
        return await daemon._reload(world, config, world)

    with structlog.testing.capture_logs() as logs:
        new = anyio.run(main)
    return new, logs


@pytest.fixture
def no_netlink(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Config, str]]:
    asked: list[tuple[Config, str]] = []

    async def every_server_reachable(
        config: Config, tunnel_ifname: str, watcher: object = None
    ) -> frozenset[str]:
        asked.append((config, tunnel_ifname))
        return frozenset(s.name for s in config.servers)

    monkeypatch.setattr(daemon, "_reachable_now", every_server_reachable)
    return asked


def test_a_reload_hands_the_machine_the_new_list_before_the_monitor_follows_it(
    write_config, no_netlink
) -> None:
    path = write_config("", servers=1)
    old = load_config(path, {})
    world = Recorder(old)
    write_config(TUNED.replace('mode = "session"', "allow_lan = false"), servers=2)

    new, logs = reload(old, world)

    assert [s.name for s in new.servers] == ["vpn1", "vpn2"]
    assert sorted(world.servers) == ["vpn1", "vpn2"]
    (_, change), followed = world.calls
    assert change.lock_base == policy_from_config(new, servers=())
    assert sorted(change.servers) == ["vpn1", "vpn2"]
    assert change.settings == daemon.machine_settings(new)
    assert change.reachable == frozenset({"vpn1", "vpn2"})
    assert followed == ("set_endpoints", ["198.51.100.11:51820", "198.51.100.12:51820"])
    assert no_netlink == [(new, "tl-test")]
    assert any(entry["event"] == "configuration reloaded" for entry in logs)


def test_a_reload_the_lock_refuses_keeps_the_running_configuration_and_the_monitor_as_they_are(
    write_config, no_netlink
) -> None:
    path = write_config("", servers=1)
    old = load_config(path, {})
    world = Recorder(old)
    world.lock_refuses = True
    write_config("", servers=2)

    kept, _ = reload(old, world)

    assert kept is old
    assert [call[0] for call in world.calls] == ["reconfigure"]  # the monitor keeps the old list


def test_a_reload_that_changes_a_restart_only_setting_is_refused_whole(write_config, no_netlink) -> None:
    path = write_config("", servers=1)
    old = load_config(path, {})
    world = Recorder(old)
    write_config('[lock]\ntable = "other"\n', servers=2)

    kept, logs = reload(old, world)

    assert kept is old and world.calls == [] and sorted(world.servers) == ["vpn1"]
    [refused] = [entry for entry in logs if entry["log_level"] == "error"]
    assert refused["event"] == "reload refused: these settings need a restart"
    assert refused["settings"] == ["lock.table"]


def test_a_reload_of_a_broken_file_keeps_the_running_configuration(write_config, no_netlink) -> None:
    path: Path = write_config("", servers=1)
    old = load_config(path, {})
    world = Recorder(old)
    path.write_text("[rotation]\ncooldown_s = -1\n")

    kept, logs = reload(old, world)

    assert kept is old and world.calls == []
    [refused] = [entry for entry in logs if entry["log_level"] == "error"]
    assert refused["event"] == "reload refused: the configuration has errors"
    assert any("rotation.cooldown_s" in problem for problem in refused["problems"])


# --- run_daemon's exit status ------------------------------------------------------------------


@pytest.fixture
def quiet_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_daemon tunes glibc's allocator for a long-running daemon: not for the test runner."""
    monkeypatch.setattr(daemon, "_fix_allocator_thresholds", lambda: None)


def serving(outcome: BaseException | int) -> Callable[..., Any]:
    async def serve(config: Config, placement: object = None, early: object = None) -> int:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return serve


FAILED = "tunlock failed; the lock stays as it is"


@pytest.mark.parametrize(
    ("outcome", "code", "said"),
    [
        (0, 0, None),
        (
            daemon.LockFailed("could not install the lock: nft exited 1"),
            1,
            FAILED,
        ),
        (
            BaseExceptionGroup("task group", [ExceptionGroup("inner", [daemon.TunlockError("no nft")])]),
            1,
            FAILED,
        ),
        (RuntimeError("a bug"), 1, "tunlock crashed; the lock stays as it is"),
        (BaseExceptionGroup("task group", [KeyboardInterrupt()]), 130, None),
    ],
)
def test_the_exit_status_says_how_the_daemon_ended(
    write_config,
    tmp_path,
    monkeypatch,
    quiet_process,
    outcome: BaseException | int,
    code: int,
    said: str | None,
) -> None:
    config = load_config(write_config(f'[control]\nsocket = "{tmp_path}/control.sock"\n'), {})
    monkeypatch.setattr(daemon, "serve", serving(outcome))
    with structlog.testing.capture_logs() as logs:
        assert daemon.run_daemon(config) == code
    errors = [entry["event"] for entry in logs if entry["log_level"] == "error"]
    assert errors == ([said] if said else [])


def test_a_control_socket_path_that_cannot_be_used_ends_it_as_a_configuration_error(
    write_config, tmp_path, monkeypatch, quiet_process
) -> None:
    taken = tmp_path / "control.sock"
    taken.write_text("not a socket")
    config = load_config(write_config(f'[control]\nsocket = "{taken}"\n'), {})
    monkeypatch.setattr(daemon, "serve", serving(AssertionError("must not start")))
    with structlog.testing.capture_logs() as logs:
        assert daemon.run_daemon(config) == 2
    [refused] = [entry for entry in logs if entry["log_level"] == "error"]
    assert refused["event"] == "tunlock cannot start: the configuration has errors"
    assert str(taken) in refused["problems"][0]
