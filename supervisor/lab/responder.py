"""The lab's internet host (and LAN host): answers TCP on port 80 and UDP echo on port 7.

Run inside a lab namespace: ``python -m supervisor.lab.responder [--lan]``. With
``--lan`` it serves TCP 80 on the LAN host address only (the ISP namespace holds
the ISP's own addresses too, which must not answer as "the LAN").
"""

from __future__ import annotations

import selectors
import socket
import sys

from supervisor.lab.topology import INTERNET_V4, INTERNET_V6, LAN_HOST_V4

REPLY = b"tunlock-lab ok\n"


def main(argv: list[str]) -> int:
    lan = "--lan" in argv
    sel = selectors.DefaultSelector()
    binds = (
        [(socket.AF_INET, LAN_HOST_V4)]
        if lan
        else [(socket.AF_INET, INTERNET_V4), (socket.AF_INET6, INTERNET_V6)]
    )
    for family, address in binds:
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((address, 80))
        tcp.listen(64)
        tcp.setblocking(False)
        sel.register(tcp, selectors.EVENT_READ, "tcp")
        if not lan:
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((address, 7))
            sel.register(udp, selectors.EVENT_READ, "udp")
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)  # only sockets are registered
            try:
                if key.data == "tcp":
                    conn, _ = sock.accept()
                    with conn:
                        conn.sendall(REPLY)
                else:
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data, peer)
            except OSError:
                continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
