"""A light probe through the tunnel, so a silent server shows within seconds.

WireGuard alone says little about a dead server: the handshake age only grows
past 180 s before the tunnel is certainly dead, and an idle tunnel receives
nothing at all. So when the machine is in doubt (or the tunnel has been idle a
while) the supervisor sends an ICMP echo *through the tunnel* (bound to the
tunnel interface) to a target on the far side, by default the server's tunnel
resolver: a live server answers and the tunnel's rx counter moves; a dead one
leaves tx growing against a flat rx. The verdict is the state machine's, from
counter samples, so the prober only sends: it never waits for the answer.

In doubt the machine probes tens of times a second, so a probe must cost next
to nothing: one raw socket per address family, opened on first use and kept,
a non-blocking ``sendto`` of a 16-byte echo (a 36-byte IPv4 packet in the
tunnel, 108 bytes on the wire once WireGuard pads and wraps it over IPv4), no
task and no timer per probe. The socket is told to receive nothing (``ICMP_FILTER`` /
``ICMP6_FILTER`` block every type), so answers never queue in it; the answer
that counts is the one WireGuard already counted.

The packets and the sockets are supervisor/net/probe.py's.

Without CAP_NET_RAW (podman grants no NET_RAW by default; a hardened unit may drop it) a raw
socket cannot be had. The prober then sends a DNS query (the root's NS, 17 bytes) over UDP
to port 53 of the target instead, which the default target, the server's tunnel resolver,
answers, and the answer moves rx the same way. The lock lets DNS through the tunnel only to
the server's resolvers, so a custom ``probe_target`` that is not one of them needs CAP_NET_RAW;
the prober says so once in the log when it falls back.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from ipaddress import IPv4Address, IPv6Address, ip_address

from supervisor.log import get_logger
from supervisor.net.probe import probe_socket, send_probe

log = get_logger(__name__)


class IcmpProber:
    """Echo requests from raw sockets bound to the tunnel interface (needs CAP_NET_RAW), one per
    address family, kept open between probes; DNS queries over UDP where raw sockets are refused."""

    def __init__(self) -> None:
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        self._sockets: dict[tuple[int, str], socket.socket] = {}
        self.raw = True  # False once raw sockets were refused: the UDP fallback is in use

    def send(self, target: IPv4Address | IPv6Address, ifname: str) -> None:
        """Send one probe; raises ``OSError`` when it cannot go (no interface, refused)."""
        target = ip_address(target)
        v6 = target.version == 6
        self._seq = (self._seq + 1) & 0xFFFF
        payload = struct.pack("!d", time.monotonic())
        sock = self._socket(v6, ifname)
        try:
            send_probe(sock, self.raw, target, self._ident, self._seq, payload)
        except BlockingIOError:
            pass  # the socket's send buffer is full: this probe is lost, as on a lossy link
        except OSError:
            # The interface may have been deleted and made again (a new index): bind afresh.
            self._close(v6, ifname)
            raise

    def _socket(self, v6: bool, ifname: str) -> socket.socket:
        key = (6 if v6 else 4, ifname)
        sock = self._sockets.get(key)
        if sock is None:
            if self.raw:
                try:
                    sock = probe_socket(v6, ifname, raw=True)
                except PermissionError:
                    self.raw = False
                    log.warning(
                        "no raw socket (CAP_NET_RAW): probing with DNS queries to the probe target "
                        "instead; the target must be one of the server's tunnel resolvers (the "
                        "default), since the lock lets DNS through the tunnel to those alone"
                    )
            if sock is None:
                sock = probe_socket(v6, ifname, raw=False)
            self._sockets[key] = sock
        return sock

    def _close(self, v6: bool, ifname: str) -> None:
        sock = self._sockets.pop((6 if v6 else 4, ifname), None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    async def __aenter__(self) -> IcmpProber:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()
