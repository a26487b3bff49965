"""Kernel change notifications on a netlink socket of the daemon's own, read as "something changed".

The lock guard needs to know *that* the nftables ruleset or the host's links, addresses and
routes changed, never *what* changed: after each burst it reads the table (or the links) back
and compares. So it subscribes to the kernel's multicast groups on a plain netlink socket and
reads whole bursts without decoding them. That replaces the ``nft monitor`` and
``ip monitor route address link`` children it used to keep (~8 MB of resident memory between
them, and a pipe per event): the kernel queues the messages on the socket, the event loop wakes
when it is readable, and nothing runs in between.

Written by hand because it is this small: pyroute2 decodes every message (which the guard does
not want) and has no asynchronous nfnetlink events socket; the only thing taken from netlink is
"the socket became readable".
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator

import anyio

# linux/netlink.h, linux/netfilter/nfnetlink.h, linux/rtnetlink.h
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11

# What ``ip monitor route address link`` followed.
LINK_GROUPS = (RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE)
# A burst of a big ruleset change fits; when it does not, the kernel says ENOBUFS, which is read
# as a change like any other (the guard reads everything back anyway).
_RCVBUF = 1024 * 1024
_READ = 65536


def subscribe(protocol: int, groups: tuple[int, ...]) -> socket.socket:
    """A non-blocking netlink socket of ``protocol`` that receives ``groups``' notifications.
    Needs CAP_NET_ADMIN for nftables' group; OSError when the kernel refuses."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol
    )
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except OSError:
        sock.close()
        raise
    return sock


def nftables_changes() -> socket.socket:
    """Subscribed to every nftables ruleset change in this network namespace."""
    return subscribe(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,))


def link_changes() -> socket.socket:
    """Subscribed to link, address and route changes in this network namespace."""
    return subscribe(NETLINK_ROUTE, LINK_GROUPS)


async def bursts(sock: socket.socket) -> AsyncIterator[None]:
    """Yield once for each burst of notifications (everything queued when the socket woke us),
    lost ones (ENOBUFS) included; end when the socket reads end-of-file. Other socket errors
    are raised: the subscription is gone."""
    while True:
        await anyio.wait_readable(sock)
        changed = False
        while True:
            try:
                data = sock.recv(_READ)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                changed = True  # the kernel dropped some: something changed all the same
                continue
            if not data:
                return
            changed = True
        if changed:
            yield
