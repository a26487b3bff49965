"""A stand-in for the daemon in the adoption test: sets the tunnel up, says "ready", waits.

Run as ``python -m tests.lab.wg_agent`` in the client namespace with a JSON description of the
tunnel and its server on stdin (stdin, not argv: argv is visible to every user in ``ps`` and
it carries the private key). The test SIGKILLs it and checks that the tunnel outlives it.
"""

from __future__ import annotations

import json
import sys
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import anyio

from supervisor.log import configure
from supervisor.redact import Secret
from supervisor.servers import Endpoint, Peer, Server
from supervisor.wireguard.tunnel import TunnelSettings, open_tunnel


def server_from(spec: dict) -> Server:
    return Server(
        name=spec["name"],
        path=Path(spec["name"] + ".conf"),
        private_key=Secret(spec["private_key"]),
        addresses=tuple(ip_interface(a) for a in spec["addresses"]),
        peer=Peer(
            public_key=spec["public_key"],
            endpoint=Endpoint(ip_address(spec["endpoint_host"]), spec["endpoint_port"]),
            allowed_ips=tuple(ip_network(n) for n in spec["allowed_ips"]),
        ),
        dns=tuple(ip_address(d) for d in spec["dns"]),
    )


def server_spec(server: Server) -> dict:
    return {
        "name": server.name,
        "private_key": server.private_key.reveal(),
        "addresses": [str(a) for a in server.addresses],
        "public_key": server.peer.public_key,
        "endpoint_host": str(server.endpoint.host),
        "endpoint_port": server.endpoint.port,
        "allowed_ips": [str(n) for n in server.peer.allowed_ips],
        "dns": [str(d) for d in server.dns],
    }


async def main() -> None:
    configure("info", json=True)  # the log to stderr: stdout carries only "ready"
    spec = json.loads(sys.stdin.read())
    settings = TunnelSettings(
        ifname=spec["ifname"],
        fwmark=spec["fwmark"],
        route_table=spec["route_table"],
        backend=spec["backend"],
        resolv_conf=Path(spec["resolv_conf"]),
        state_dir=Path(spec["state_dir"]),
    )
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(server_from(spec["server"]))
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main)
