"""Namespace mode's web-UI link: a veth pair from the host into the namespace.

A web UI inside the namespace (qBittorrent's 8080, Transmission's 9091) listens on the
namespace's addresses; the host reaches it over this pair, and the LAN through the host (a
reverse proxy or a port forward with masquerade, docs/namespace.md). Inside, the pair's end is the
one interface that is not the tunnel: the lock there accepts on it only connections opened from
the host's end to ``namespace.ui_tcp`` and their replies (the administrator's path of the lock,
supervisor/lock/configured.py), so nothing inside can open a connection or send a datagram out
through it.

The pair is made after the lock is in force inside, and left in place when the daemon stops (the
lock stays too); a restart finds it and only puts back what is missing.
"""

from __future__ import annotations

import hashlib
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.errors import TunlockError
from supervisor.log import get_logger
from supervisor.net.netns import Placement

log = get_logger(__name__)

INSIDE_IFNAME = "tunlock-ui"


class UiLinkError(TunlockError):
    """The web-UI link cannot be made; the message says why."""


def host_ifname(namespace: str) -> str:
    """The host's end: one per namespace, within the 15 characters of an interface name."""
    return "tlui" + hashlib.sha256(namespace.encode()).hexdigest()[:8]


async def _address(ipr: AsyncIPRoute, ifname: str, address: IPv4Address, prefixlen: int) -> None:
    index = (await ipr.link_lookup(ifname=ifname))[0]
    try:
        await ipr.addr("add", index=index, address=str(address), prefixlen=prefixlen)
    except NetlinkError as err:
        if err.code != 17:  # EEXIST: there from an earlier run
            raise
    await ipr.link("set", index=index, state="up")


async def ensure_ui_link(placement: Placement, subnet: IPv4Network) -> str:
    """Make the pair (if missing) with its addresses, both ends up; the host end's name."""
    host_end, inside_end = list(subnet.hosts())
    name = host_ifname(placement.name)
    try:
        async with await placement.host_route() as host:
            if not await host.link_lookup(ifname=name):
                await host.link(
                    "add",
                    ifname=name,
                    kind="veth",
                    peer={"ifname": INSIDE_IFNAME, "net_ns_fd": placement.app_fd},
                )
            await _address(host, name, host_end, subnet.prefixlen)
        async with AsyncIPRoute() as inside:  # this thread is in the namespace
            await _address(inside, INSIDE_IFNAME, inside_end, subnet.prefixlen)
    except (NetlinkError, IndexError) as err:
        raise UiLinkError(f"cannot make the web-UI link {name} <-> {INSIDE_IFNAME}: {err}") from None
    log.info(
        "web-UI link in place",
        host_end=f"{name} {host_end}",
        namespace_end=f"{INSIDE_IFNAME} {inside_end}",
    )
    return name
