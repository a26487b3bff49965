"""The path monitor without root: a fake rtnetlink in place of pyroute2's ``AsyncIPRoute``.

What is tested is the monitor's own logic: which events lead to a re-check, what a re-check
concludes from links and route lookups (through a live link, not the tunnel; a sample per
family), that only changes are reported, and ENOBUFS. The fake answers as the kernel would (link
dumps with carrier and operstate, route lookups by destination); real netlink is the lab's.
"""

from __future__ import annotations

import errno
import math
from collections.abc import AsyncIterator
from ipaddress import ip_address
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_TC

from supervisor.net import monitor
from supervisor.net.monitor import PathMonitor, PathsChanged, TunnelLinkGone
from supervisor.servers import Endpoint

GUARD_S = 10.0  # only stops a broken test from hanging
FWMARK = 0x5154
BLACKHOLE = -1


def endpoint(host: str) -> Endpoint:
    return Endpoint(ip_address(host), 51820)


A, B, C = endpoint("198.51.100.1"), endpoint("203.0.113.1"), endpoint("192.0.2.1")
V6 = endpoint("2001:db8::1")


class Msg(dict[str, Any]):
    """A netlink message as pyroute2 hands it over: fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class Kernel:
    """Links and routes as the fake kernel holds them, and the event bursts to deliver."""

    def __init__(self) -> None:
        # index -> (name, carrier, operstate)
        self.links: dict[int, tuple[str, int, str]] = {1: ("lo", 1, "UNKNOWN"), 2: ("eth0", 1, "UP")}
        self.routes: dict[str, int] = {}  # destination -> outgoing link index; missing: unreachable
        self.lookups: list[tuple[str, int]] = []
        self.subscribed: list[int | None] = []  # the groups of each bind, in order
        send, self.bursts = anyio.create_memory_object_stream[list[Msg] | NetlinkError](math.inf)
        self.send_burst = send.send_nowait

    def route_everything_via(self, index: int, *endpoints: Endpoint) -> None:
        for ep in endpoints:
            self.routes[str(ep.host)] = index


class FakeIPRoute:
    """The subset of ``AsyncIPRoute`` the monitor uses."""

    kernel: Kernel

    async def __aenter__(self) -> FakeIPRoute:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def bind(self, groups: int | None = None) -> None:
        self.kernel.subscribed.append(groups)

    def setsockopt(self, *args: object) -> None:
        return None

    async def get(self) -> AsyncIterator[Msg]:
        burst = await self.kernel.bursts.receive()
        if isinstance(burst, NetlinkError):
            raise burst
        for msg in burst:
            yield msg

    async def route(self, command: str, *, dst: str, mark: int) -> list[Msg]:
        assert command == "get"
        self.kernel.lookups.append((dst, mark))
        oif = self.kernel.routes.get(dst)
        if oif is None:
            raise NetlinkError(errno.ENETUNREACH, "Network is unreachable")
        if oif == BLACKHOLE:
            return [Msg({"RTA_TABLE": 254})]  # a route with no outgoing interface
        return [Msg({"RTA_OIF": oif})]

    async def link(self, command: str) -> AsyncIterator[Msg]:
        assert command == "dump"
        links = [
            Msg({"IFLA_IFNAME": name, "IFLA_CARRIER": carrier, "IFLA_OPERSTATE": state}, index=index)
            for index, (name, carrier, state) in self.kernel.links.items()
        ]

        async def dump() -> AsyncIterator[Msg]:
            for link in links:
                yield link

        return dump()


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    kernel = Kernel()
    FakeIPRoute.kernel = kernel
    monkeypatch.setattr(monitor, "AsyncIPRoute", FakeIPRoute)
    return kernel


def event(kind: str, ifname: str = "eth0") -> Msg:
    return Msg({"IFLA_IFNAME": ifname}, event=kind)


def run(kernel: Kernel, endpoints: list[Endpoint], scenario: Any) -> list[monitor.Observation]:
    """Run a monitor over ``endpoints`` while ``scenario(monitor, reports)`` drives the kernel."""
    seen: list[monitor.Observation] = []

    async def main() -> None:
        send, reports = anyio.create_memory_object_stream[monitor.Observation](math.inf)

        async def report(observation: monitor.Observation) -> None:
            seen.append(observation)
            send.send_nowait(observation)

        path_monitor = PathMonitor(endpoints, FWMARK, "tun-test")
        with anyio.fail_after(GUARD_S):
            async with anyio.create_task_group() as tg:
                await tg.start(path_monitor.run, report)
                await scenario(path_monitor, reports)
                tg.cancel_scope.cancel()

    anyio.run(main)
    return seen


def test_paths_are_reported_on_start_then_only_when_they_change(kernel: Kernel) -> None:
    kernel.route_everything_via(2, A, B)

    async def scenario(_: PathMonitor, reports: MemoryObjectReceiveStream[monitor.Observation]) -> None:
        assert await reports.receive() == PathsChanged(frozenset({A, B}))
        kernel.send_burst([event("RTM_NEWADDR")])  # relevant, but nothing changed: no report
        kernel.links[2] = ("eth0", 0, "DOWN")  # the cable is pulled
        kernel.send_burst([event("RTM_NEWLINK")])
        assert await reports.receive() == PathsChanged(frozenset())
        kernel.links[2] = ("eth0", 1, "UP")
        kernel.send_burst([event("RTM_NEWNEIGH"), event("RTM_NEWROUTE")])
        assert await reports.receive() == PathsChanged(frozenset({A, B}))

    seen = run(kernel, [A, B], scenario)
    assert len(seen) == 3
    assert {mark for _, mark in kernel.lookups} == {FWMARK}  # looked up as WireGuard's packets go


def test_events_that_do_not_touch_paths_cause_no_recheck(kernel: Kernel) -> None:
    kernel.route_everything_via(2, A)

    async def scenario(_: PathMonitor, reports: MemoryObjectReceiveStream[monitor.Observation]) -> None:
        assert await reports.receive() == PathsChanged(frozenset({A}))
        del kernel.routes[str(A.host)]  # a re-check now would report A gone
        kernel.send_burst([event("RTM_NEWNEIGH"), event("RTM_DELNEIGH")])
        kernel.send_burst([event("RTM_DELLINK", "tun-test")])
        # Neighbour events caused no re-check; the tunnel's deletion is reported, then re-checked.
        assert await reports.receive() == TunnelLinkGone("tun-test")
        assert await reports.receive() == PathsChanged(frozenset())

    run(kernel, [A], scenario)
    # Nor does the kernel send them: every stale ARP entry on the LAN would wake an idle daemon.
    (groups,) = kernel.subscribed
    assert groups is not None and groups & RTMGRP_LINK and groups & RTMGRP_IPV4_ROUTE
    assert not groups & (RTMGRP_NEIGH | RTMGRP_TC), hex(groups)


def test_a_route_through_the_tunnel_a_blackhole_or_none_at_all_is_no_path(kernel: Kernel) -> None:
    kernel.links[7] = ("tun-test", 1, "UNKNOWN")
    kernel.route_everything_via(7, A)  # back through the tunnel: useless to reach the server
    kernel.route_everything_via(2, V6)  # B: no route
    kernel.route_everything_via(BLACKHOLE, C)

    async def scenario(_: PathMonitor, reports: MemoryObjectReceiveStream[monitor.Observation]) -> None:
        assert await reports.receive() == PathsChanged(frozenset({V6}))

    run(kernel, [A, B, C, V6], scenario)


def test_enobufs_rereads_the_whole_state_and_other_netlink_errors_end_the_monitor(kernel: Kernel) -> None:
    kernel.route_everything_via(2, A)

    async def scenario(_: PathMonitor, reports: MemoryObjectReceiveStream[monitor.Observation]) -> None:
        assert await reports.receive() == PathsChanged(frozenset({A}))
        del kernel.routes[str(A.host)]
        kernel.send_burst(NetlinkError(errno.ENOBUFS, "No buffer space available"))  # events lost
        assert await reports.receive() == PathsChanged(frozenset())
        kernel.send_burst(NetlinkError(errno.EPERM, "Operation not permitted"))
        await anyio.sleep_forever()

    with pytest.raises(BaseExceptionGroup) as caught:
        run(kernel, [A], scenario)
    assert caught.group_contains(NetlinkError, match="Operation not permitted")


def test_new_endpoints_are_checked_at_once(kernel: Kernel) -> None:
    kernel.route_everything_via(2, A, B)

    async def scenario(
        path_monitor: PathMonitor, reports: MemoryObjectReceiveStream[monitor.Observation]
    ) -> None:
        assert await reports.receive() == PathsChanged(frozenset({A}))
        path_monitor.set_endpoints([A, B])
        assert await reports.receive() == PathsChanged(frozenset({A, B}))

    run(kernel, [A], scenario)


def test_a_large_family_is_judged_by_a_sample_of_it(kernel: Kernel) -> None:
    many = [endpoint(f"198.51.100.{i}") for i in range(1, 41)]
    kernel.route_everything_via(2, *many, V6)

    async def scenario(_: PathMonitor, reports: MemoryObjectReceiveStream[monitor.Observation]) -> None:
        assert await reports.receive() == PathsChanged(frozenset({*many, V6}))

    run(kernel, [*many, V6], scenario)
    assert len(kernel.lookups) == monitor.MAX_ENDPOINTS_CHECKED_PER_FAMILY + 1


def test_a_sample_without_a_path_takes_its_whole_family_with_it(kernel: Kernel) -> None:
    many = [endpoint(f"198.51.100.{i}") for i in range(1, 41)]
    kernel.route_everything_via(2, *many[monitor.MAX_ENDPOINTS_CHECKED_PER_FAMILY :])

    async def scenario(_: PathMonitor, reports: MemoryObjectReceiveStream[monitor.Observation]) -> None:
        assert await reports.receive() == PathsChanged(frozenset())

    run(kernel, many, scenario)
