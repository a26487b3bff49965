"""The app of the container tier: every probe kind, in a loop, from its very first moment.

Runs inside an app container that shares the tunlock sidecar's network namespace (the tunlock
image's Python, this directory mounted at /tier). Each round sends every kind of
``supervisor.lab.probes.Probes.every_kind`` once and prints one JSON line:
``{"t": <wall clock at its start>, "ok": {kind: answered}}``; the first line, ``{"started": t}``, comes before
the first packet. Whether anything leaked is the lab observer's to say, not this program's.

    python /tier/app.py ENDPOINT_V4
"""

from __future__ import annotations

import json
import sys
import time

started = time.time()
print(json.dumps({"started": started}), flush=True)

from supervisor.lab import probes  # noqa: E402  (the timestamp first: the import takes a moment)
from supervisor.lab.topology import INTERNET_V4, INTERNET_V6, ISP_V4, LAN_HOST_V4  # noqa: E402

# Between rounds: a locked namespace refuses every probe at once, and this runs on a shared machine.
PAUSE_S = 0.05


def kinds(endpoint_v4: str) -> dict:
    """The kinds and names of Probes.every_kind; ICMP from a raw socket (no ping in the image)."""
    return {
        "icmp4": lambda: probes.icmp_echoed(INTERNET_V4),
        "icmp6": lambda: probes.icmp_echoed(INTERNET_V6),
        "icmp4-bound-to-wan0": lambda: probes.icmp_echoed(INTERNET_V4, interface="wan0"),
        "dns-udp-isp": lambda: probes.dns_udp_answered(ISP_V4),
        "dns-tcp-isp": lambda: probes.dns_tcp_answered(ISP_V4),
        "dns-udp-lan": lambda: probes.dns_udp_answered(LAN_HOST_V4),
        "tcp4": lambda: probes.tcp_answered(INTERNET_V4),
        "tcp6": lambda: probes.tcp_answered(INTERNET_V6),
        "udp4": lambda: probes.udp_echoed(INTERNET_V4),
        "udp6": lambda: probes.udp_echoed(INTERNET_V6),
        "udp-to-endpoint": lambda: probes.plain_udp_sent(endpoint_v4),
    }


def answered(probe) -> bool:
    try:
        return bool(probe())
    except OSError:  # refused by the lock, unreachable, timed out
        return False


def main() -> None:
    calls = kinds(sys.argv[1])
    while True:
        began = time.time()
        results = {name: answered(probe) for name, probe in calls.items()}
        print(json.dumps({"t": began, "ok": results}), flush=True)
        time.sleep(PAUSE_S)


if __name__ == "__main__":
    main()
