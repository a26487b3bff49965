"""``status --json`` assembled on request from its three sources: the runtime's status, the lock's
state and the plugin host's report. Each part is a stand-in value here; the daemon that builds
it for a real control socket is exercised in tests/lab/test_daemon.py."""

from __future__ import annotations

from ipaddress import ip_address

import anyio
import pytest

from supervisor.daemon import status_now
from supervisor.jsonvalue import JSON
from supervisor.lock.state import LockState
from supervisor.plugins import Forwarded, PluginHost, PluginsReport
from supervisor.runtime import FailureReport, Status
from supervisor.servers import Endpoint
from supervisor.status import StatusReport
from supervisor.wireguard.backend import TunnelStats
from tests.unit.test_plugin_host import FakeLock, FakeServer, Recorder, publish, until

NOW = 1_800_000_000.0


def test_status_json_before_anything_happened() -> None:
    status = Status()
    assert StatusReport.build(status, LockState()).as_json() == {
        "state": "blocked",
        "server": None,
        "handshake_age_s": None,
        "lock": {
            "installed": False,
            "matching": False,
            "owned": False,
            "egress": [],
            "bypass": [],
            "inbound": {},
        },
        "since": round(status.since_wall, 3),
        "reason": None,
        "endpoint": None,
        "rx_bytes": None,
        "tx_bytes": None,
        "last_failure": None,
        "backend": None,
        "forwarded_port": None,
        "forwarded_ports": [],
        "forwarded_age_s": None,
        "forwarded_inbound_packets": None,
        "plugins": {},
        "namespace": None,
    }


def connected_status() -> Status:
    status = Status(state="connected", server="vpn2", since_wall=NOW - 60, backend="userspace")
    status.stats = TunnelStats(
        "key", Endpoint(ip_address("198.51.100.12"), 51820), NOW - 5.04, 5.04, rx_bytes=148, tx_bytes=92
    )
    status.last_failure = FailureReport("vpn1", "no handshake within 15 s", NOW - 61)
    return status


def test_status_is_built_from_the_machine_the_lock_and_the_plugins_reports() -> None:
    # One reading hands the named counters and the forwarded ports' in one mapping.
    counters = {"blocked_out": 7, "inbound:40001/tcp": 4, "inbound:40001/udp": 1, "inbound:51413/tcp": 9}
    lock = LockState(installed=True, matching=True, owned=False, counters=counters)
    plugins = PluginsReport(
        Forwarded((40001, 40002), "vpn2", since=NOW - 30),
        {"natpmp": {"provider": "natpmp", "port": 40001, "refused": None}},
    )
    report = StatusReport.build(connected_status(), lock, plugins)
    assert report.lock.counters == {"blocked_out": 7}  # what the metrics count, from the same reading
    assert report.as_json(now=NOW) == {
        "state": "connected",
        "server": "vpn2",
        "handshake_age_s": 5.0,
        "lock": {
            "installed": True,
            "matching": True,
            "owned": False,
            "egress": [],
            "bypass": [],
            "inbound": {"40001/tcp": 4, "40001/udp": 1, "51413/tcp": 9},
        },
        "since": NOW - 60,
        "reason": None,
        "endpoint": "198.51.100.12:51820",
        "rx_bytes": 148,
        "tx_bytes": 92,
        "last_failure": {"server": "vpn1", "reason": "no handshake within 15 s", "at": NOW - 61},
        "backend": "userspace",
        "forwarded_port": 40001,
        "forwarded_ports": [40001, 40002],
        "forwarded_age_s": 30.0,
        "forwarded_inbound_packets": 5,  # 51413 is a port the user opened, not a forwarded one
        "plugins": {"natpmp": {"provider": "natpmp", "port": 40001, "refused": None}},
        "namespace": None,
    }


def test_a_built_status_is_a_value_that_later_changes_do_not_reach() -> None:
    machine = connected_status()
    report = StatusReport.build(machine, LockState(installed=True))
    machine.state, machine.server, machine.stats = "offline", None, None
    shown = report.as_json(now=NOW)
    assert (shown["state"], shown["server"], shown["rx_bytes"]) == ("connected", "vpn2", 148)
    # Counters of a tunnel without a server are never shown (the peer is gone).
    assert StatusReport.build(machine, LockState()).as_json(now=NOW)["rx_bytes"] is None
    with pytest.raises(TypeError):
        report.lock.counters["blocked_out"] = 1  # type: ignore[index]


def test_the_plugin_hosts_report_is_a_copy_taken_when_asked() -> None:
    async def main() -> tuple[PluginsReport, PluginsReport]:
        host_plugins = [("p0", Recorder(port=40000))]
        host = PluginHost(host_plugins, FakeLock(), interface="tl0", server_of=lambda n: FakeServer())
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            publish(host, "connected", "vpn1")
            await until(lambda: host.view.forwarded is not None)
            before = host.report()
            publish(host, "connecting", "vpn2")  # a new connection drops the port
            await until(lambda: host.view.forwarded is None)
            after = host.report()
            tg.cancel_scope.cancel()
        return before, after

    before, after = anyio.run(main)
    assert before.forwarded is not None and before.forwarded.ports == (40000,)
    assert after.forwarded is None
    assert StatusReport.build(Status(), LockState(), before).as_json()["forwarded_port"] == 40000


class RotatingWhileTheLockIsRead:
    """The runtime as ``status_now`` sees it, with the plugin host subscribed to its publishes
    as in the daemon. Reading the lock takes long enough for the machine to publish in between:
    as when the lock's thread is busy with a rotation's endpoint swap (a stand-in, since the
    moment cannot be chosen with a real lock; tests/lab/test_port_forwarding.py has the lab)."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.status = Status()

    def publish(self, state: str, server: str) -> None:
        self.status.state, self.status.server = state, server  # as Runtime._publish, then its subscribers
        self.host.publish(self.status)

    async def lock_state(self) -> LockState:
        self.publish("connecting", "vpn2")  # the rotation goes on meanwhile
        await anyio.lowlevel.checkpoint()
        return LockState(installed=True)


def test_a_status_built_across_a_rotation_never_pairs_the_new_server_with_the_old_port() -> None:
    """The flaky lab test's interleaving, made certain: a status request began while vpn1 was
    connected with its forwarded port, and the rotation to vpn2 was published while the lock was
    read for it. The answer is one moment: connecting to vpn2 with no forwarded port (the host
    dropped it, and the lock closes it), never ``vpn2`` with vpn1's port."""

    async def main() -> dict[str, JSON]:
        plugins = [("p0", Recorder(port=40000))]
        host = PluginHost(plugins, FakeLock(), interface="tl0", server_of=lambda n: FakeServer())
        runtime = RotatingWhileTheLockIsRead(host)
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            runtime.publish("connected", "vpn1")
            with anyio.fail_after(10):
                while host.view.forwarded is None:
                    await anyio.sleep(0.005)
            report = await status_now(runtime, host)  # type: ignore[arg-type]
            tg.cancel_scope.cancel()
        return report.as_json()

    shown = anyio.run(main)
    assert (shown["state"], shown["server"]) == ("connecting", "vpn2")
    assert shown["forwarded_port"] is None and shown["forwarded_ports"] == []
