"""Workloads whose traffic leaves without passing this host's netfilter, named for the user.

A minimal reading of this namespace's links (``ip -j -d link``), written against the interface
the full detection shares (``detect_bypass() -> list[BypassWorkload]``):

* a macvlan, ipvlan or macvtap child of an uplink: its frames go straight to the parent's
  driver, past the host's IP hooks, so the lock never sees them;
* a physical link enslaved to a bridge while ``net.bridge.bridge-nf-call-iptables`` is 0 (or
  ``br_netfilter`` is not loaded): what is bridged to it is never seen by the ``inet`` hooks.

Children moved into another namespace (a container's) do not show here; finding those needs
every namespace's links.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_CHILD_KINDS = ("macvlan", "ipvlan", "macvtap", "ipvtap")
# Bridge ports that are a container's or a VM's end, not an uplink.
_VIRTUAL_PORTS = ("veth", "tun", "tap", "vxlan", "wireguard", "dummy")
_BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BypassWorkload:
    kind: str  # macvlan | ipvlan | macvtap | ipvtap | bridge
    interface: str
    detail: str


def bypassing(
    links: Iterable[dict], bridge_nf_call: bool, uplinks: Iterable[str] | None = None
) -> list[BypassWorkload]:
    """The bypassing workloads among ``ip -j -d link`` entries (pure)."""
    links = list(links)
    wanted = set(uplinks) if uplinks is not None else None
    kinds = {link.get("ifname"): link.get("linkinfo", {}).get("info_kind") for link in links}
    out: list[BypassWorkload] = []
    for link in links:
        name, kind = link.get("ifname", "?"), kinds.get(link.get("ifname"))
        parent = link.get("link")
        if kind in _CHILD_KINDS and parent and (wanted is None or parent in wanted):
            out.append(
                BypassWorkload(kind, name, f"a child of {parent}: its packets skip this host's firewall")
            )
        master = link.get("master")
        if master and kinds.get(master) == "bridge" and kind not in _VIRTUAL_PORTS and not bridge_nf_call:
            out.append(
                BypassWorkload(
                    "bridge",
                    master,
                    f"{name} is a port of bridge {master} and bridge-nf-call-iptables is 0: "
                    "bridged traffic skips the lock",
                )
            )
    return out


def detect_bypass(uplinks: Iterable[str] | None = None) -> list[BypassWorkload]:
    """The bypassing workloads of this network namespace (children of ``uplinks``, default all)."""
    done = subprocess.run(
        ["ip", "-j", "-d", "link", "show"], capture_output=True, text=True, timeout=_TIMEOUT_S, check=True
    )
    try:
        bridge_nf_call = _BRIDGE_NF.read_text().strip() == "1"
    except OSError:
        bridge_nf_call = False  # br_netfilter not loaded: bridged frames never reach the inet hooks
    return bypassing(json.loads(done.stdout or "[]"), bridge_nf_call, uplinks)
