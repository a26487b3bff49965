"""From a failover to the torrent client listening on the new forwarded port: the timeline.

Run (root, from the repository):
    PYTHONPATH=. .venv/bin/python bench/bench_seedbox.py [qbittorrent|transmission] [RUNS]

Builds a lab with two servers, each with the lab's NAT-PMP gateway (vpn1 hands out 40001,
vpn2 40002), starts the torrent client and ``tunlock run`` with the natpmp plugin and the
client's plugin, kills vpn1's wireguard-go, and prints for each run when (seconds after the
kill) the daemon reported vpn2 connected, NAT-PMP granted the port, the lock accepted it, the
plugin confirmed the client's port over its API, and the kernel's socket table first showed
the client listening on it (polled every 20 ms). Two shared cores: figures vary between runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
import time
from datetime import datetime

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.topology import Lab
from tests.lab.seedbox import QUICK, start_gateways, wait_until, write_config
from tests.lab.torrent_clients import (
    QBT_PASSWORD,
    QBT_USER,
    QBT_WEBUI_PORT,
    TRANSMISSION_PASSWORD,
    TRANSMISSION_RPC_PORT,
    TRANSMISSION_USER,
    listening_ports,
    start_qbittorrent,
    start_transmission,
    write_secret,
)


def _is(event: dict, name: str, **fields: object) -> bool:
    return event.get("event") == name and all(event.get(k) == v for k, v in fields.items())


EVENTS = {
    "connected to vpn2": lambda e: _is(e, "state", state="connected", server="vpn2"),
    "NAT-PMP granted the port": lambda e: _is(e, "port forwarded", port=40002),
    "lock accepts the port": lambda e: (
        _is(e, "inbound ports on the tunnel") and "40002/tcp" in e.get("ports", [])
    ),
    "client confirmed over its API": lambda e: _is(e, "client now listens on the forwarded port", port=40002),
}


def one_run(client: str) -> dict[str, float]:
    with Lab.up(servers=2) as lab:
        start_gateways(lab, {1: 40001, 2: 40002})
        if client == "qbittorrent":
            proc, api = start_qbittorrent(lab), QBT_WEBUI_PORT
            secret = write_secret(lab, "qbt-password", QBT_PASSWORD)
            options = f'username = "{QBT_USER}"\npassword_file = "{secret}"'
        else:
            proc, api = start_transmission(lab), TRANSMISSION_RPC_PORT
            options = f'username = "{TRANSMISSION_USER}"\npassword_env = "SEEDBOX_TRANSMISSION_PASSWORD"'
        config = write_config(
            lab,
            f'[plugins]\nenabled = ["natpmp", "{client}"]\n\n[plugins.{client}]\n'
            + textwrap.dedent(options)
            + "\n",
        )
        env = {**QUICK, "SEEDBOX_TRANSMISSION_PASSWORD": TRANSMISSION_PASSWORD}
        with LabDaemon(lab, env=env, config=config) as daemon:
            daemon.start()
            wait_until(lambda: listening_ports(lab, proc.pid, api) == {40001}, "the client on 40001", 30)
            killed_wall = time.time()
            killed = time.monotonic()
            faults.kill_server(lab, "1")
            wait_until(lambda: listening_ports(lab, proc.pid, api) == {40002}, "the client on 40002", 60)
            listening = time.monotonic() - killed
            lines = daemon.log_events()
        timeline: dict[str, float] = {}
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            at = (
                datetime.fromisoformat(event.get("timestamp", "").replace("Z", "+00:00")).timestamp()
                - killed_wall
            )
            for name, matches in EVENTS.items():
                if name not in timeline and at > 0 and matches(event):
                    timeline[name] = at
        timeline["kernel shows the client listening"] = listening
        return timeline


def main() -> None:
    client = sys.argv[1] if len(sys.argv) > 1 else "qbittorrent"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results = [one_run(client) for _ in range(runs)]
    print(f"{client}: seconds after vpn1's wireguard-go was killed ({runs} runs; 2 shared cores, noisy)")
    for name in [*EVENTS, "kernel shows the client listening"]:
        values = [r[name] for r in results if name in r]
        if values:
            print(
                f"  {name:36s} median {statistics.median(values):6.2f}  "
                f"runs {', '.join(f'{v:.2f}' for v in values)}"
            )


if __name__ == "__main__":
    main()
