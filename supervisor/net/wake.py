"""Waking an idle daemon on the first packet through the tunnel.

An idle tunnel used to be sampled every ``health.idle_interval_s``, so traffic that starts toward
a server that fell silent meanwhile waited up to that long before the daemon even looked (2.1 s
to fail over instead of 1.5 s in the lab), and the samples in between kept an idle daemon busy.
While the machine calls the tunnel idle it asks for a watch (``WatchTraffic``): a packet socket
bound to the tunnel interface, open only for that spell, that becomes readable on the first
packet either way. One packet, one wake-up; nothing is read, nothing runs per packet, and busy
tunnels have no such socket at all. Once the socket listens the machine is told
(``TrafficWatchArmed``) and sleeps until the idle probe is due (``health.idle_probe_s``).

A packet socket rather than a rule in the lock (``log group``, a counter with notifications):
the lock is the guard's to compare and restore, and a rule switched on and off with each idle
spell would make every spell a lock transaction.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import anyio

ETH_P_ALL = 0x0003


class PacketWatch:
    """Waits for the next packet through an interface (the runtime's ``TrafficWatch``)."""

    async def next_packet(self, ifname: str, armed: Callable[[], Awaitable[None]]) -> None:
        """Await ``armed()`` once the socket listens, then return when a packet goes out or
        comes in through ``ifname``; OSError when the interface cannot be watched (gone, or no
        CAP_NET_RAW)."""
        # Protocol 0 at creation: the socket hears nothing until bound, so no packet of another
        # interface is queued in between; binding names the interface and every protocol at once.
        flags = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        with socket.socket(socket.AF_PACKET, flags, 0) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((ifname, ETH_P_ALL))
            await armed()
            await anyio.wait_readable(sock)
