"""A tunnel set up by hand in the lab's client (wireguard-go + wg + ip), as wg-quick would.

For the lab's own tests, the lock's tests and bench/bench_lock.py: nothing of tunlock's backends
in it, so what they measure or assert is the lab's or the lock's alone. Test code: the product
(`tunlock lab`) never builds a tunnel by hand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

from supervisor.lab.topology import (
    TUNNEL_CLIENT_V4,
    TUNNEL_CLIENT_V6,
    UAPI_DIR,
    WG_PORT,
    Lab,
    ip_batch,
    sh,
)

FWMARK = 0xCA6C
TABLE = 51820
# wg-quick's full-tunnel rules: unmarked packets use the tunnel's table, except that the main
# table still wins for anything more specific than a default route.
_RULES = (
    ("not", "fwmark", str(FWMARK), "table", str(TABLE)),
    ("table", "main", "suppress_prefixlength", "0"),
)


@contextlib.contextmanager
def hand_tunnel(lab: Lab, server: int = 1) -> Iterator[str]:
    """Bring the client's tunnel up to ``server`` with full-tunnel policy routing; yield its name."""
    ifname = lab.client_ifname
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("client"), "wireguard-go", "-f", ifname],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (UAPI_DIR / f"{ifname}.sock").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "wireguard-go did not start"
            time.sleep(0.01)
        target = lab.servers[server - 1]
        sh(
            "ip",
            "netns",
            "exec",
            lab.ns("client"),
            "wg",
            "set",
            ifname,
            "fwmark",
            str(FWMARK),
            "private-key",
            str(lab.dir / "client.key"),
            "peer",
            target.public_key,
            "endpoint",
            f"{target.endpoint_v4}:{WG_PORT}",
            "allowed-ips",
            "0.0.0.0/0,::/0",
        )
        ip_batch(
            lab.ns("client"),
            [
                f"addr add {TUNNEL_CLIENT_V4}/32 dev {ifname}",
                f"addr add {TUNNEL_CLIENT_V6}/128 dev {ifname} nodad",
                f"link set {ifname} up",
                f"route add default dev {ifname} table {TABLE}",
                f"route add ::/0 dev {ifname} table {TABLE}",
            ],
        )
        for family in ("-4", "-6"):
            for rule in _RULES:
                sh("ip", family, "-n", lab.ns("client"), "rule", "add", *rule)
        yield ifname
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            (UAPI_DIR / f"{ifname}.sock").unlink()
        for family in ("-4", "-6"):
            for rule in _RULES:
                sh("ip", family, "-n", lab.ns("client"), "rule", "del", *rule, check=False)
