"""The tunnel interface's own settings: up, MTU and addresses, over rtnetlink (pyroute2).

What they are for a server is ``LinkPlan`` in ``supervisor.net.routing_plan``.

Idempotent by design: ``configure_link`` compares what the kernel has with what
the server wants and changes only the difference, so it serves a first
connect, a swap to a server with other addresses, and the adoption of a running
tunnel alike (the last changes nothing at all).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import ip_interface
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.errors import TunlockError
from supervisor.log import get_logger
from supervisor.net.routing_plan import DEFAULT_MTU as DEFAULT_MTU  # wg-quick's default (see there)
from supervisor.net.routing_plan import without_link_local
from supervisor.servers import IPInterface

log = get_logger(__name__)

_IFA_F_NODAD = 0x02


class LinkError(TunlockError):
    """The tunnel interface could not be set up as asked."""


async def collect(result: Any) -> list[Any]:
    """pyroute2 answers some requests with a list and dumps with an async generator: a list always."""
    if hasattr(result, "__aiter__"):
        return [item async for item in result]
    return list(result)


async def link_index(ipr: AsyncIPRoute, ifname: str) -> int | None:
    """The index of ``ifname`` in this namespace, or None when there is no such link."""
    found = await ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


async def link_addresses(ipr: AsyncIPRoute, index: int) -> set[IPInterface]:
    """The addresses on link ``index``, without the IPv6 link-local ones the kernel manages."""
    out: set[IPInterface] = set()
    for msg in await collect(await ipr.addr("dump", index=index)):
        if msg["index"] != index:
            continue  # older kernels ignore the filter
        address = ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        if not (address.version == 6 and address.is_link_local):
            out.add(address)
    return out


async def configure_link(
    ipr: AsyncIPRoute, ifname: str, addresses: Iterable[IPInterface], mtu: int | None = None
) -> None:
    """Give ``ifname`` exactly ``addresses`` and ``mtu`` (default 1420), and bring it up."""
    index = await link_index(ipr, ifname)
    if index is None:
        raise LinkError(f"interface {ifname} does not exist")
    wanted = {ip_interface(a) for a in addresses}
    have = await link_addresses(ipr, index)
    try:
        (link,) = await collect(await ipr.link("get", index=index))
        if link.get_attr("IFLA_MTU") != (mtu or DEFAULT_MTU):
            await ipr.link("set", index=index, mtu=mtu or DEFAULT_MTU)
        for address in sorted(wanted - have, key=str):
            await ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                # A tunnel has no neighbours to collide with; DAD would only delay the address.
                **({"flags": _IFA_F_NODAD} if address.version == 6 else {}),
            )
        for address in sorted(have - wanted, key=str):
            await ipr.addr("del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        if not link["flags"] & 1:  # IFF_UP
            without_link_local(ifname)  # one small /proc write, as for src_valid_mark
            await ipr.link("set", index=index, state="up")
    except NetlinkError as err:
        raise LinkError(f"cannot configure {ifname}: {err}") from None
    if wanted != have:
        log.info("tunnel addresses set", ifname=ifname, addresses=sorted(str(a) for a in wanted))
