"""Literal IP addresses and ``IP:port`` endpoints, parsed strictly.

A server file's Endpoint and DNS and what a WireGuard device reports over UAPI are read alike;
this module needs nothing of the server-file reader (the UAPI adapter imports it alone).
"""

from __future__ import annotations

import functools
import re
import socket
from ipaddress import IPv4Address, IPv6Address

from supervisor.servers import Endpoint, IPAddress

_HOSTNAME = re.compile(r"^[A-Za-z0-9.-]+$")


# (speed) inet_pton parses in C what ipaddress parses slowly, and a provider's files share most
# values (client address, DNS, AllowedIPs), so caches spare the rest. Each raises ValueError.
@functools.lru_cache(maxsize=16384)
def parse_address(text: str) -> IPAddress:
    """An IPv4 or IPv6 address, strictly (no zone, no leading zeros)."""
    try:
        if ":" in text:
            return IPv6Address(socket.inet_pton(socket.AF_INET6, text))
        return IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        raise ValueError(f"{text!r} is not an IP address") from None


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts superscripts, which int() refuses."""
    return text.isascii() and text.isdigit()


def parse_endpoint(text: str) -> Endpoint:
    """``IP:port`` or ``[IPv6]:port``; raise ValueError with a reason a person can act on."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"endpoint {text!r} must be [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"endpoint {text!r} has no port: use IP:port or [IPv6]:port")
        if ":" in host:
            raise ValueError(f"endpoint {text!r}: put an IPv6 address in brackets, [IPv6]:port")
    try:
        address = parse_address(host)
    except ValueError:
        if _HOSTNAME.match(host):
            raise ValueError(
                f"endpoint host {host!r} is a name, not an IP address: resolving it would need DNS "
                "outside the tunnel, which the lock forbids; write the server's IP address instead"
            ) from None
        raise ValueError(f"endpoint host {host!r} is not an IP address") from None
    if not is_number(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"endpoint port {port!r} must be a number from 1 to 65535")
    return Endpoint(address, int(port))
