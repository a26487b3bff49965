"""Who holds a local port: the kernel's socket table of this network namespace, with owners.

The NAT-PMP plugin asks it before it lets the lock accept a port a gateway chose (a port another
program listens on must not be exposed), and the torrent-client plugins before they send a
password to a client's API on loopback (the listener must belong to the expected user).

Read by hand from ``/proc/net/{tcp,tcp6,udp,udp6}``: one read gives every socket's address,
state, owner uid and inode, and the table is a stable kernel interface. (pyroute2's sock_diag
gives the same fields over netlink but costs a socket per query and no process either; psutil
names processes but not a socket's uid.) A socket's programs are found as ``ss -p`` finds them:
the processes whose ``/proc/PID/fd`` holds ``socket:[inode]``. The parsers are pure; the two
readers are blocking and meant for a worker thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"  # a bound UDP socket that receives from anyone


@dataclass(frozen=True)
class Socket:
    """A socket that accepts from anyone: a TCP listener or a bound, unconnected UDP socket."""

    protocol: str  # "tcp" | "udp"
    address: IPv4Address | IPv6Address
    port: int
    uid: int
    inode: int

    @property
    def loopback_only(self) -> bool:
        """Bound to a loopback address: nothing from outside this host reaches it."""
        address = self.address
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback


def _address(hex_address: str) -> IPv4Address | IPv6Address:
    # The kernel prints each 32-bit word of the address in host byte order (little-endian here).
    raw = bytes.fromhex(hex_address)
    return ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def parse_table(text: str, protocol: str) -> list[Socket]:
    """The accepting sockets of one ``/proc/net/tcp``, ``tcp6``, ``udp`` or ``udp6`` text."""
    state = TCP_LISTEN if protocol == "tcp" else UDP_UNCONNECTED
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != state:
            continue
        address, _, port = fields[1].rpartition(":")
        found.append(Socket(protocol, _address(address), int(port, 16), int(fields[7]), int(fields[9])))
    return found


def accepting_sockets(protocols: Iterable[str] = ("tcp", "udp")) -> list[Socket]:
    """Every accepting socket of this process's network namespace (blocking: a worker thread)."""
    found: list[Socket] = []
    for protocol in protocols:
        for suffix in ("", "6"):
            with contextlib.suppress(OSError):
                found += parse_table(Path(f"/proc/net/{protocol}{suffix}").read_text(), protocol)
    return found


@dataclass(frozen=True)
class Program:
    pid: int
    name: str  # the executable's file name (``qbittorrent-nox``), else its 15-character comm


def programs_of(inodes: Iterable[int], proc: Path = Path("/proc")) -> dict[int, list[Program]]:
    """The processes holding each socket inode (blocking: a worker thread). A socket whose
    holder is in another PID namespace (a container sharing the network only) has none."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    holders: dict[int, list[Program]] = {inode: [] for inode in wanted.values()}
    if not wanted:
        return holders
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        held = set()
        with contextlib.suppress(OSError):  # a process that ended, or one we may not look into
            for fd in os.scandir(f"{entry.path}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target in wanted:
                        held.add(wanted[target])
        if held:
            program = Program(int(entry.name), _program_name(entry.path))
            for inode in held:
                holders[inode].append(program)
    return holders


def _program_name(process: str) -> str:
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(f"{process}/exe")).removesuffix(" (deleted)")
    with contextlib.suppress(OSError):
        return Path(f"{process}/comm").read_text().strip()
    return "?"
