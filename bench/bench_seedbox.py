"""From a failover to the torrent client listening on the new forwarded port: the timeline.

Run (root, from the repository):
    PYTHONPATH=. .venv/bin/python bench/bench_seedbox.py [qbittorrent|transmission|deluge] [RUNS] [--required]

Builds a lab with two servers, each with the lab's NAT-PMP gateway (vpn1 hands out 40001,
vpn2 40002), starts the torrent client and ``tunlock run`` with the natpmp plugin and the
client's plugin, kills vpn1's wireguard-go, and prints for each run when (seconds after the
kill) the daemon reported vpn2 connected, NAT-PMP granted the port, the lock accepted it, the
plugin confirmed the client's port over its API, and the kernel's socket table first showed
the client listening on it (polled every 20 ms). Two shared cores: figures vary between runs.

``--required``: ``[plugins.natpmp] required = true`` and a third server; vpn2's gateway refuses
every port, so after vpn1 dies the daemon connects to vpn2, is refused, leaves it (unfit) and
ends on vpn3 with its port 40003; the timeline shows each of those steps.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime

from supervisor.lab import faults
from supervisor.lab.daemon import LabDaemon
from supervisor.lab.topology import Lab
from tests.lab.seedbox import QUICK, set_gateway, start_gateways, wait_until, write_config
from tests.lab.torrent_clients import (
    DELUGE_DAEMON_PORT,
    DELUGE_PASSWORD,
    DELUGE_WEB_PORT,
    QBT_PASSWORD,
    QBT_USER,
    QBT_WEBUI_PORT,
    TRANSMISSION_PASSWORD,
    TRANSMISSION_RPC_PORT,
    TRANSMISSION_USER,
    listening_ports,
    start_deluge,
    start_qbittorrent,
    start_transmission,
    write_secret,
)


def _is(event: dict, name: str, **fields: object) -> bool:
    return event.get("event") == name and all(event.get(k) == v for k, v in fields.items())


def events(required: bool) -> dict[str, Callable[[dict], bool]]:
    """What to look for in the daemon's log, in the order it should come."""
    port = 40003 if required else 40002
    found: dict[str, Callable[[dict], bool]] = {
        "connected to vpn2": lambda e: _is(e, "state", state="connected", server="vpn2")
    }
    if required:
        found |= {
            "vpn2's gateway refused": lambda e: _is(e, "server unfit: it forwards no port", server="vpn2"),
            "vpn2 left (unfit)": lambda e: (
                _is(e, "state", state="connecting", server="vpn3")
                and "vpn2 is unfit" in (e.get("reason") or "")
            ),
            "connected to vpn3": lambda e: _is(e, "state", state="connected", server="vpn3"),
        }
    return found | {
        "NAT-PMP granted the port": lambda e: _is(e, "port forwarded", port=port),
        "lock accepts the port": lambda e: (
            _is(e, "inbound ports on the tunnel") and f"{port}/tcp" in e.get("ports", [])
        ),
        "client confirmed over its API": lambda e: _is(
            e, "client now listens on the forwarded port", port=port
        ),
    }


def one_run(client: str, required: bool) -> dict[str, float]:
    port = 40003 if required else 40002
    with Lab.up(servers=3 if required else 2) as lab:
        start_gateways(lab, {1: 40001, 2: 40002, 3: 40003})
        if required:
            set_gateway(lab, 2, "refuse", 40002)
        if client == "qbittorrent":
            proc, own = start_qbittorrent(lab), QBT_WEBUI_PORT
            secret = write_secret(lab, "qbt-password", QBT_PASSWORD)
            options = f'username = "{QBT_USER}"\npassword_file = "{secret}"'
        elif client == "deluge":
            proc, own = start_deluge(lab), DELUGE_DAEMON_PORT
            options = (
                f'url = "http://127.0.0.1:{DELUGE_WEB_PORT}/json"\npassword_env = "SEEDBOX_DELUGE_PASSWORD"'
            )
        else:
            proc, own = start_transmission(lab), TRANSMISSION_RPC_PORT
            options = f'username = "{TRANSMISSION_USER}"\npassword_env = "SEEDBOX_TRANSMISSION_PASSWORD"'
        natpmp = "[plugins.natpmp]\nrequired = true\ntries = 3\n\n" if required else ""
        config = write_config(
            lab,
            f'[plugins]\nenabled = ["natpmp", "{client}"]\n\n{natpmp}[plugins.{client}]\n'
            + textwrap.dedent(options)
            + "\n",
        )
        env = {
            **QUICK,
            "SEEDBOX_TRANSMISSION_PASSWORD": TRANSMISSION_PASSWORD,
            "SEEDBOX_DELUGE_PASSWORD": DELUGE_PASSWORD,
        }
        with LabDaemon(lab, env=env, config=config) as daemon:
            daemon.start()
            wait_until(lambda: listening_ports(lab, proc.pid, own) == {40001}, "the client on 40001", 30)
            killed_wall = time.time()
            killed = time.monotonic()
            faults.kill_server(lab, "1")
            wait_until(lambda: listening_ports(lab, proc.pid, own) == {port}, f"the client on {port}", 60)
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
            for name, matches in events(required).items():
                if name not in timeline and at > 0 and matches(event):
                    timeline[name] = at
        timeline["kernel shows the client listening"] = listening
        return timeline


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--required"]
    required = "--required" in sys.argv[1:]
    client = args[0] if args else "qbittorrent"
    runs = int(args[1]) if len(args) > 1 else 3
    results = [one_run(client, required) for _ in range(runs)]
    mode = ", required = true: vpn2 forwards no port" if required else ""
    print(
        f"{client}: seconds after vpn1's wireguard-go was killed ({runs} runs{mode}; 2 shared cores, noisy)"
    )
    for name in [*events(required), "kernel shows the client listening"]:
        values = [r[name] for r in results if name in r]
        if values:
            print(
                f"  {name:36s} median {statistics.median(values):6.2f}  "
                f"runs {', '.join(f'{v:.2f}' for v in values)}"
            )


if __name__ == "__main__":
    main()
