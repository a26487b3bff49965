"""Watching rtnetlink for what the supervisor must react to at once.

Link, address and route changes arrive as kernel events (no polling): after
each burst the monitor asks the kernel which endpoints still have a usable path
*outside* the tunnel (a route lookup carrying the tunnel's fwmark, exactly as
WireGuard's own packets are routed, through an interface that is up and has a
carrier) and reports the set only when it changed. It also reports the tunnel
interface disappearing. If the kernel drops events (ENOBUFS: our receive
buffer overflowed), the monitor re-reads the whole state instead of trusting a
partial picture.

In namespace mode (``placement``) the two live apart: the endpoints' routes in the host
namespace, where WireGuard's UDP socket is, and the tunnel interface in the app namespace. The
monitor then holds one event socket in each, and ignores the host's RTM_DELLINK for the tunnel's
name (that is the interface moving into the app namespace, or a stale one of the host).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import ip_address
from typing import TYPE_CHECKING

import anyio
from msgspec import Struct
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
)

from supervisor.log import get_logger
from supervisor.servers import Endpoint

if TYPE_CHECKING:  # namespace mode's placement, imported only where that mode is on
    from supervisor.net.netns import Placement

log = get_logger(__name__)

# Lookups are cheap, but a host with thousands of endpoints must not do thousands per event:
# endpoints of one family share their route in practice, so a sample of each family suffices.
MAX_ENDPOINTS_CHECKED_PER_FAMILY = 16
_USABLE_OPERSTATES = ("UP", "UNKNOWN")
_RCVBUF = 4 * 1024 * 1024


class PathsChanged(Struct, frozen=True):
    """The endpoints that can be reached outside the tunnel right now."""

    reachable: frozenset[Endpoint]


class TunnelLinkGone(Struct, frozen=True):
    """The tunnel interface was deleted (by a person, another tool, or a dying backend)."""

    ifname: str


Observation = PathsChanged | TunnelLinkGone
Report = Callable[[Observation], Awaitable[None]]


class PathMonitor:
    """Reports endpoint reachability and tunnel-interface loss from rtnetlink events."""

    def __init__(
        self,
        endpoints: Iterable[Endpoint],
        fwmark: int,
        tunnel_ifname: str,
        placement: Placement | None = None,
    ) -> None:
        self._placement = placement
        self._endpoints = frozenset(endpoints)
        self._fwmark = fwmark
        self._tunnel_ifname = tunnel_ifname
        self._last: frozenset[Endpoint] | None = None
        self._recheck = anyio.Event()

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoints to watch (config reload); the next report reflects them."""
        self._endpoints = frozenset(endpoints)
        self._recheck.set()

    async def run(
        self, report: Report, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Report the current paths, then every change, until cancelled."""
        async with await self.route_socket() as events:
            await events.bind(groups=_PATH_GROUPS)
            events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            await self._check(report)
            async with anyio.create_task_group() as tg:
                if self._placement is not None:
                    await tg.start(self._follow_tunnel_link, report)
                task_status.started()
                tg.start_soon(self._recheck_on_request, report)
                await self._follow(events, report, tunnel_here=self._placement is None)
                tg.cancel_scope.cancel()

    async def route_socket(self) -> AsyncIPRoute:
        """An rtnetlink socket where the endpoints' routes are (the host, in namespace mode)."""
        return AsyncIPRoute() if self._placement is None else await self._placement.host_route()

    async def _follow_tunnel_link(
        self, report: Report, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Namespace mode: the tunnel interface's deletion, seen in the app namespace (ours)."""
        async with AsyncIPRoute() as events:
            await events.bind(groups=RTMGRP_LINK)
            events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            task_status.started()
            while True:
                try:
                    async for msg in events.get():
                        gone = msg.get("event") == "RTM_DELLINK"
                        if gone and msg.get_attr("IFLA_IFNAME") == self._tunnel_ifname:
                            await report(TunnelLinkGone(self._tunnel_ifname))
                except NetlinkError as err:
                    if err.code != errno.ENOBUFS:
                        raise
                    log.warning("netlink events were dropped (ENOBUFS) in the namespace")
                    try:
                        socket.if_nametoindex(self._tunnel_ifname)
                    except OSError:  # its deletion may have been among the dropped events
                        await report(TunnelLinkGone(self._tunnel_ifname))

    async def _recheck_on_request(self, report: Report) -> None:
        while True:
            await self._recheck.wait()
            self._recheck = anyio.Event()
            await self._check(report)

    async def _follow(self, events: AsyncIPRoute, report: Report, *, tunnel_here: bool = True) -> None:
        while True:
            relevant = False
            try:
                async for msg in events.get():
                    kind = msg.get("event")
                    if (
                        tunnel_here
                        and kind == "RTM_DELLINK"
                        and msg.get_attr("IFLA_IFNAME") == self._tunnel_ifname
                    ):
                        await report(TunnelLinkGone(self._tunnel_ifname))
                    if kind in _PATH_EVENTS:
                        relevant = True
            except NetlinkError as err:
                if err.code != errno.ENOBUFS:
                    raise
                log.warning("netlink events were dropped (ENOBUFS); re-reading the state")
                relevant = True
            if relevant:
                await self._check(report)

    async def _check(self, report: Report) -> None:
        # A socket per check, not one for the daemon's life: pyroute2 (0.9) files the kernel's
        # ACK that follows each ``route get`` answer under a sequence number it has already
        # released, in a queue nobody reads, so a long-lived query socket grows by one message
        # per lookup for as long as the daemon runs. Opening one costs ~3 ms, once per burst.
        async with await self.route_socket() as queries:
            reachable = await reachable_endpoints(queries, self._endpoints, self._fwmark, self._tunnel_ifname)
        if reachable != self._last:
            self._last = reachable
            await report(PathsChanged(reachable))


async def reachable_endpoints(
    ipr: AsyncIPRoute, endpoints: frozenset[Endpoint], fwmark: int, tunnel_ifname: str
) -> frozenset[Endpoint]:
    """The endpoints whose route (looked up with the tunnel's fwmark) leaves through a live link.

    Only a sample of each family is looked up (see MAX_ENDPOINTS_CHECKED_PER_FAMILY); the
    rest of a family shares the verdict of the sampled endpoints through the same link.
    """
    live_links, names = await _links(ipr)
    by_family: dict[int, list[Endpoint]] = {}
    for ep in sorted(endpoints, key=lambda e: (e.family, e.host.packed, e.port)):
        by_family.setdefault(ep.family, []).append(ep)
    reachable: set[Endpoint] = set()
    for family_endpoints in by_family.values():
        sample = family_endpoints[:MAX_ENDPOINTS_CHECKED_PER_FAMILY]
        verdicts = {ep: names.get(await _route_oif(ipr, ep, fwmark)) for ep in sample}
        usable = {ep for ep, ifname in verdicts.items() if ifname in live_links and ifname != tunnel_ifname}
        reachable |= usable
        if usable and len(family_endpoints) > len(sample):
            reachable |= set(family_endpoints[len(sample) :])
    return frozenset(reachable)


async def _route_oif(ipr: AsyncIPRoute, endpoint: Endpoint, fwmark: int) -> int | None:
    try:
        answer = await ipr.route("get", dst=str(ip_address(endpoint.host)), mark=fwmark)
    except NetlinkError:
        return None  # unreachable: no route at all
    for msg in answer:
        oif = msg.get_attr("RTA_OIF")
        if oif is not None:
            return oif
    return None


async def _links(ipr: AsyncIPRoute) -> tuple[set[str], dict[int | None, str]]:
    """Names of the links that can carry traffic (up, with a carrier), and every index's name."""
    live: set[str] = set()
    names: dict[int | None, str] = {}
    async for link in await ipr.link("dump"):
        name = link.get_attr("IFLA_IFNAME")
        names[link["index"]] = name
        if link.get_attr("IFLA_CARRIER") == 1 and link.get_attr("IFLA_OPERSTATE") in _USABLE_OPERSTATES:
            live.add(name)
    return live, names


# The groups whose notifications can change a path: pyroute2's default set also has the
# neighbour table's (every ARP/NDP entry going stale on the LAN) and traffic control's, which
# would only wake an idle daemon to parse them and throw them away.
_PATH_GROUPS = (
    RTMGRP_LINK
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_ROUTE
    | RTMGRP_IPV4_RULE
    | RTMGRP_IPV6_RULE
)
_PATH_EVENTS = frozenset(
    {
        "RTM_NEWLINK",
        "RTM_DELLINK",
        "RTM_NEWADDR",
        "RTM_DELADDR",
        "RTM_NEWROUTE",
        "RTM_DELROUTE",
        "RTM_NEWRULE",
        "RTM_DELRULE",
    }
)
