"""The ISP's observer: every packet that arrives from the client, classified.

Runs inside the lab's ``isp`` namespace on its side of the client link (an
AF_PACKET socket sees every frame the client sends, whatever the client's
firewall thought of it) and writes one JSON line per packet that is neither a
real WireGuard message to a configured endpoint nor link upkeep. That count is
the leak count, as the ISP would see it.

Link upkeep is judged as the lock limits it (supervisor/lock/render.py), by
where it goes, since anything may be written into it: ARP; DHCPv4 requests to
255.255.255.255; DHCPv6 to ff02::1:2; NDP (hop limit 255) and MLD to a
link-local or multicast address, or NDP to a unicast address in the sender's
own /64 (a neighbour: the router's global address, say). A DHCP datagram to a
unicast server or an NDP message to an address beyond the link is a leak.

A "real WireGuard message" is UDP to an endpoint's exact address and port whose
payload has WireGuard's shape: type 1-4, three zero bytes, and the exact size
of its type (initiation 148, response 92, cookie 64, data at least 32 and a
multiple of 16). Any other UDP to the endpoint port counts as a leak.

The parsing is by hand: a few fixed header offsets, where a packet library
would be a large dependency for the lab alone.

Run: python -m supervisor.lab.observer IFACE OUT_FILE ENDPOINT [ENDPOINT...]
(ENDPOINT as ip:port or [ip6]:port). SIGTERM stops it. The lab syncs with it
by sending a raw frame from the client (a packet socket): the observer writes
``{"sync": token}``, so a reader that sees its token knows every frame before it
has been recorded. The frame has ARP's ethertype and starts with ``SYNC_MAGIC``
instead of an ARP header: the lock's egress chain on the uplink sees packet
sockets' frames too, and lets only ARP through of what is not IP.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from ipaddress import IPv4Address, IPv6Address, ip_address

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ETH_P_ARP = 0x0806
SYNC_ETHERTYPE = ETH_P_ARP
SYNC_MAGIC = b"tunlock-lab-sync:"
_WG_SIZES = {1: 148, 2: 92, 3: 64}
_DHCP_CLIENT = {(68, 67, "255.255.255.255"), (546, 547, "ff02::1:2")}


def _same_64(src: IPv4Address | IPv6Address, dst: IPv4Address | IPv6Address) -> bool:
    return src.packed[:8] == dst.packed[:8]


def is_wireguard(payload: bytes) -> bool:
    """Whether a UDP payload has the shape of a WireGuard message."""
    if len(payload) < 4 or payload[1:4] != b"\0\0\0":
        return False
    kind = payload[0]
    if kind in _WG_SIZES:
        return len(payload) == _WG_SIZES[kind]
    return kind == 4 and len(payload) >= 32 and len(payload) % 16 == 0


def classify(frame: bytes, endpoints: set[tuple[str, int]]) -> dict | None:
    """None for WireGuard to an endpoint and link upkeep; else a description of the leak."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    data = frame[14:]
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    if ethertype == SYNC_ETHERTYPE and data.startswith(SYNC_MAGIC):
        return {"sync": data[len(SYNC_MAGIC) :].rstrip(b"\0").decode(errors="replace")}
    if ethertype == 0x0800 and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        proto = data[9]
        src, dst = IPv4Address(data[12:16]), IPv4Address(data[16:20])
        l4 = data[ihl:]
        family = 4
    elif ethertype == 0x86DD and len(data) >= 40:
        proto = data[6]
        hop_limit = data[7]
        src, dst = IPv6Address(data[8:24]), IPv6Address(data[24:40])
        l4 = data[40:]
        family = 6
        if proto == 0 and len(l4) >= 8:  # hop-by-hop options (MLD reports carry one)
            proto, l4 = l4[0], l4[(l4[1] + 1) * 8 :]
        if proto == 58 and l4:
            icmp_type = l4[0]
            on_link = dst.is_link_local or dst.is_multicast or _same_64(src, dst)
            if icmp_type in (133, 134, 135, 136, 137) and hop_limit == 255 and on_link:
                return None  # NDP
            if icmp_type in (130, 131, 132, 143) and (dst.is_link_local or dst.is_multicast):
                return None  # MLD
    else:
        return None  # ARP and other non-IP link traffic
    leak: dict = {"family": family, "src": str(src), "dst": str(dst), "proto": proto, "len": len(frame)}
    if proto in (6, 17) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
        leak.update(sport=sport, dport=dport)
        if proto == 17:
            if (sport, dport, str(dst)) in _DHCP_CLIENT:
                return None  # DHCP client
            if (str(dst), dport) in endpoints and is_wireguard(l4[8:]):
                return None
            leak["kind"] = "udp-to-endpoint-not-wireguard" if (str(dst), dport) in endpoints else "udp"
        else:
            leak["kind"] = "tcp"
            if dport == 53 or sport == 53:
                leak["kind"] = "dns-tcp"
        if proto == 17 and dport == 53:
            leak["kind"] = "dns-udp"
    elif proto in (1, 58):
        leak["kind"] = f"icmpv{family}" if family == 6 else "icmp"
        if l4:
            leak["icmp_type"] = l4[0]
    else:
        leak["kind"] = f"ip-proto-{proto}"
    return leak


def _parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return str(ip_address(host.strip("[]"))), int(port)


def main(argv: list[str]) -> int:
    iface, out_path, *endpoint_args = argv
    endpoints = {_parse_endpoint(e) for e in endpoint_args}
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((iface, 0))
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sock.settimeout(0.2)
    with open(out_path, "a", buffering=1) as out:
        out.write(json.dumps({"ready": time.time()}) + "\n")
        while running:
            try:
                frame, addr = sock.recvfrom(65535)
            except (TimeoutError, InterruptedError):
                continue
            except OSError:
                # ENETDOWN once per link-down fault: the socket stays bound and sees the link
                # again when it comes back up.
                continue
            if addr[2] == PACKET_OUTGOING:
                continue  # only what arrives from the client
            verdict = classify(frame, endpoints)
            if verdict is not None:
                verdict["t"] = round(time.time(), 4)
                out.write(json.dumps(verdict) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
