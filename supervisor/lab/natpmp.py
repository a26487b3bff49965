"""The lab's NAT-PMP gateway (RFC 6886), run inside a VPN server's namespace. Lab only.

``python -m supervisor.lab.natpmp CONTROL STATE`` answers on the server's tunnel address, port
5351, as a provider's gateway does: a map request gets the port the control file names, and the
server then forwards that port (TCP and UDP, on its public address) to the address the request
came from, through the tunnel (DNAT in a table of its own). A request with lifetime 0 gives the
mapping up. The control file (JSON, re-read at every request, written by the test) says how to
behave::

    {"mode": "ok" | "refuse" | "silent", "port": 40001, "keep": false, "suggested": false}

The granted port is the control file's whatever the client asked for, as a hostile or broken
gateway may grant any port (22, say); ``keep`` makes it ignore unmap requests and go on
forwarding, so that only the client's lock stands between the port and the internet.
``suggested`` makes it grant the suggested external port when that is one of 1024-65535 (a
gateway that can give a client its port back), and the control file's otherwise.

The messages are packed here with ``struct`` from the RFC's tables, not with tunlock's codec,
so that the lab does not merely mirror the client under test; Debian's ``natpmpc`` checks it.
The state file records what was asked and granted (the tests read it).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from supervisor.lab.topology import TUNNEL_SERVER_V4

TABLE = "labpmp"
EPOCH_START = time.monotonic()


def forward(port: int | None, client: str, extra: list[int]) -> None:
    """The server's public ``port`` (TCP and UDP) to ``client`` through the tunnel; None: none.
    ``extra`` ports go to the client too, as a provider that hands out a whole address would."""
    script = f"add table ip {TABLE}\ndelete table ip {TABLE}\n"
    if port is not None:
        ports = ", ".join(str(p) for p in sorted({port, *extra}))
        script += (
            f"table ip {TABLE} {{\n"
            f"  chain pre {{\n    type nat hook prerouting priority dstnat;\n"
            f'    iifname "eth0" meta l4proto {{ tcp, udp }} th dport {{ {ports} }} dnat to {client}\n  }}\n'
            f"}}\n"
        )
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def save(path: Path, state: dict) -> None:
    """Whole or not at all: a test reads it at any moment."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(path)


def main(argv: list[str]) -> int:
    control, state_path = Path(argv[0]), Path(argv[1])
    state: dict = {"requests": 0, "maps": [], "unmaps": 0, "forwarded": None}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((TUNNEL_SERVER_V4, 5351))
    save(state_path, state)
    while True:
        data, (source, source_port) = sock.recvfrom(64)
        settings: dict[str, Any] = (
            json.loads(control.read_text()) if control.exists() else {"mode": "ok", "port": 40001}
        )
        state["requests"] += 1
        epoch = int(time.monotonic() - EPOCH_START)
        if settings["mode"] == "silent" or len(data) < 2 or data[0] != 0:
            save(state_path, state)
            continue
        op = data[1]
        result = 2 if settings["mode"] == "refuse" else 0
        if op == 0:
            public = socket.inet_aton(settings.get("public", "198.51.100.6"))
            reply = struct.pack("!BBHI", 0, 128, result, epoch) + public
        elif op in (1, 2) and len(data) >= 12:
            internal, suggested, lifetime = struct.unpack_from("!HHI", data, 4)
            wanted = (
                suggested if settings.get("suggested") and 1024 <= suggested <= 65535 else settings["port"]
            )
            port = wanted if result == 0 and lifetime else 0
            granted = min(lifetime, 3600)
            if result == 0 and lifetime:
                state["maps"].append(
                    {"op": op, "port": port, "lifetime": granted, "from": source, "suggested": suggested}
                )
                if state["forwarded"] != [port, source]:
                    forward(port, source, settings.get("extra", []))
                    state["forwarded"] = [port, source]
            elif result == 0:
                state["unmaps"] += 1
                if state["forwarded"] is not None and not settings.get("keep"):
                    forward(None, source, [])
                    state["forwarded"] = None
            reply = struct.pack("!BBHIHHI", 0, 128 + op, result, epoch, internal, port, granted)
        else:
            reply = struct.pack("!BBHI", 0, 128 + op, 5, epoch)
        save(state_path, state)  # before the reply: whoever got the reply may read it at once
        sock.sendto(reply, (source, source_port))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
