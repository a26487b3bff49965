"""Workloads whose packets skip the host's netfilter, and the physical uplinks they go out by.

A packet of a macvlan or ipvlan child of the uplink, or of a VM or container bridged onto it,
leaves by the physical interface without passing the host's ``inet`` hooks: the child hands
its frame straight to the lower device, and a bridge forwards between its ports below IP unless
``br_netfilter`` is loaded and ``bridge-nf-call-iptables``/``-ip6tables`` are 1. The lock covers
them with an egress chain on each physical uplink (supervisor/lock/render.py), which every frame
leaving that device passes, whoever sent it. This module finds:

* the **physical uplinks**: the devices under the routes through a gateway, walked down
  through VLAN, macvlan and ipvlan links to their lower device, and through bridges and bonds to
  their ports (a bridge's veth and tap ports are workloads, not the way out);
* the **bypass workloads** (:func:`detect_bypass`): macvlan/ipvlan/macvtap children of an
  uplink, and uplinks that are ports of a bridge whose frames skip netfilter. The daemon logs
  them and reports them in its status, ``tunlock check`` and ``tunlock leaktest`` warn.
* the **local bridges**: the host's bridges with no uplink among their ports, where traffic
  between two ports (containers on one bridge) stays on the host; the lock's forward chain
  lets it through when ``br_netfilter`` hands bridged frames to it.

Everything is read from this network namespace: a child moved into another namespace (a
container's) is no longer listed here, so detection misses it; the egress chain does not.

The decisions are pure functions of ``ip -j -d link`` and ``ip -j route`` records (tested
without root); :func:`read_link_facts` reads them (supervisor/net/ipjson.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from msgspec import Struct

from supervisor.net.ipjson import IpState, read_ip_state

# Upper devices whose frames go out through their lower device (IFLA_LINK).
STACKED_KINDS = frozenset({"vlan", "macvlan", "macvtap", "ipvlan", "ipvtap"})
# Children of an uplink whose own frames never pass the host's netfilter.
CHILD_KINDS = frozenset({"macvlan", "macvtap", "ipvlan", "ipvtap"})
# Devices that aggregate ports: their frames leave through those ports.
MASTER_KINDS = frozenset({"bridge", "bond", "team"})
# Bridge ports that are a workload's end (a container's veth, a VM's tap), not the way out.
WORKLOAD_PORT_KINDS = frozenset({"veth", "tun", "tap"})

BRIDGE_NF_DIR = Path("/proc/sys/net/bridge")


class BypassWorkload(Struct, frozen=True):
    """A way out of the host that skips its netfilter hooks.

    ``kind``: ``macvlan``, ``ipvlan``, ``macvtap``, ``ipvtap`` (a child of an uplink) or
    ``bridge`` (an uplink enslaved to a bridge whose frames skip netfilter); ``interface``: the
    child or the bridge; ``detail``: one sentence for a person.
    """

    kind: str
    interface: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "interface": self.interface, "detail": self.detail}


def _kind(link: Mapping[str, Any]) -> str | None:
    info = link.get("linkinfo") or {}
    kind = info.get("info_kind")
    return str(kind) if kind else None


def _by_name(links: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(link["ifname"]): link for link in links if link.get("ifname")}


def gateway_devices(routes: Iterable[Mapping[str, Any]], exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The devices of routes through a gateway (``ip -j route`` records), ``exclude`` aside."""
    skip = {"lo", *exclude}
    out: set[str] = set()
    for route in routes:
        if route.get("type", "unicast") != "unicast":
            continue
        hops = route.get("nexthops") or [route]
        for hop in hops:
            if ("gateway" in hop or "via" in hop) and hop.get("dev") and hop["dev"] not in skip:
                out.add(str(hop["dev"]))
    return tuple(sorted(out))


def physical_below(name: str, links: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """The devices frames of ``name`` finally leave by: ``name`` walked down through stacked
    devices and masters (a bridge's workload ports left out)."""
    out: set[str] = set()
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        link = links.get(current)
        kind = _kind(link) if link else None
        if link is not None and kind in STACKED_KINDS and link.get("link") in links:
            todo.append(str(link["link"]))
        elif link is not None and kind in MASTER_KINDS:
            for port_name, port in links.items():
                if port.get("master") != current:
                    continue
                if kind == "bridge" and _kind(port) in WORKLOAD_PORT_KINDS:
                    continue
                todo.append(port_name)
        else:
            out.add(current)
    return tuple(sorted(out))


def physical_uplinks(
    links: Iterable[Mapping[str, Any]], routes: Iterable[Mapping[str, Any]], exclude: Iterable[str] = ()
) -> tuple[str, ...]:
    """The physical devices under the routes through a gateway (pure)."""
    by_name = _by_name(links)
    out: set[str] = set()
    for device in gateway_devices(routes, exclude):
        out.update(physical_below(device, by_name))
    return tuple(sorted(out - {"lo", *exclude}))


def local_bridges(links: Iterable[Mapping[str, Any]], uplinks: Iterable[str]) -> tuple[str, ...]:
    """The bridges none of whose ports is an uplink: traffic between their ports stays here."""
    uplinks = set(uplinks)
    by_name = _by_name(links)
    out = []
    for name, link in by_name.items():
        if _kind(link) != "bridge":
            continue
        ports = {p for p, port in by_name.items() if port.get("master") == name}
        below = set(physical_below(name, by_name))
        if not (ports | below) & uplinks and name not in uplinks:
            out.append(name)
    return tuple(sorted(out))


def _masters_of(name: str, links: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The masters above ``name`` (its bridge, or the bridge of its bond), nearest first."""
    out = []
    current = links.get(name)
    while current is not None and current.get("master") and current["master"] not in out:
        out.append(str(current["master"]))
        current = links.get(str(current["master"]))
    return out


def detect_bypass(
    links: Iterable[Mapping[str, Any]],
    uplinks: Sequence[str],
    bridge_nf_call: Mapping[str, bool] | None,
    host_devices: Iterable[str] = (),
) -> list[BypassWorkload]:
    """The workloads whose frames reach ``uplinks`` without the host's netfilter (pure).

    ``links``: ``ip -j -d link`` records; ``bridge_nf_call``: ``{"iptables": bool,
    "ip6tables": bool}`` as read from /proc/sys/net/bridge, or None when br_netfilter is not
    loaded (bridged frames then never reach netfilter); ``host_devices``: the devices the host
    routes through itself (a macvlan the host uses as its own uplink is no workload).
    """
    by_name = _by_name(links)
    uplink_set = set(uplinks)
    host = set(host_devices)
    found: list[BypassWorkload] = []
    for name, link in sorted(by_name.items()):
        kind = _kind(link)
        if kind not in CHILD_KINDS or name in host:
            continue
        lower = set(physical_below(name, by_name))
        if lower & uplink_set:
            found.append(
                BypassWorkload(
                    kind=str(kind),
                    interface=name,
                    detail=f"{kind} child of uplink {', '.join(sorted(lower & uplink_set))}: "
                    "its frames skip the host's netfilter",
                )
            )
    skips = bridge_nf_call is None or not (bridge_nf_call.get("iptables") and bridge_nf_call.get("ip6tables"))
    if skips:
        why = (
            "br_netfilter is not loaded"
            if bridge_nf_call is None
            else "bridge-nf-call-iptables/-ip6tables is 0"
        )
        reported: set[str] = set()
        for uplink in sorted(uplink_set):
            for master in _masters_of(uplink, by_name):
                if _kind(by_name.get(master, {})) == "bridge" and master not in reported:
                    reported.add(master)
                    found.append(
                        BypassWorkload(
                            kind="bridge",
                            interface=master,
                            detail=f"uplink {uplink} is a port of bridge {master} and {why}: "
                            "frames bridged onto it skip the host's netfilter",
                        )
                    )
    return found


def read_bridge_nf_call(directory: Path = BRIDGE_NF_DIR) -> dict[str, bool] | None:
    """Whether bridged IPv4/IPv6 frames are handed to netfilter; None without br_netfilter."""
    if not directory.is_dir():
        return None
    out = {}
    for family in ("iptables", "ip6tables"):
        try:
            out[family] = (directory / f"bridge-nf-call-{family}").read_text().strip() == "1"
        except OSError:
            out[family] = False
    return out


class LinkFacts(Struct, frozen=True):
    """What the lock needs to know of this namespace's links, read at one moment."""

    uplinks: tuple[str, ...]
    bridges: tuple[str, ...]
    bypass: tuple[BypassWorkload, ...]


def link_facts(
    links: Iterable[Mapping[str, Any]],
    routes: Iterable[Mapping[str, Any]],
    bridge_nf_call: Mapping[str, bool] | None,
    exclude: Iterable[str] = (),
    uplinks: Sequence[str] = (),
) -> LinkFacts:
    """The uplinks (``uplinks`` when configured, else found from the routes), the local bridges
    and the bypass workloads (pure)."""
    links = list(links)
    routes = list(routes)
    exclude = tuple(exclude)
    found = tuple(uplinks) or physical_uplinks(links, routes, exclude)
    host = gateway_devices(routes, exclude)
    return LinkFacts(
        uplinks=found,
        bridges=local_bridges(links, found),
        bypass=tuple(detect_bypass(links, found, bridge_nf_call, host)),
    )


def read_link_facts(
    exclude: Iterable[str] = (), uplinks: Sequence[str] = (), state: IpState | None = None
) -> LinkFacts:
    """:func:`link_facts` of this network namespace as it is now (``state``: read already)."""
    state = state if state is not None else read_ip_state()
    return link_facts(state.links, state.routes, read_bridge_nf_call(), exclude, uplinks)


def find_bypass(exclude: Iterable[str] = (), uplinks: Sequence[str] = ()) -> list[BypassWorkload]:
    """:func:`detect_bypass` on this network namespace as it is now (``exclude``: the tunnel;
    ``uplinks``: as configured, else found from the routes)."""
    return list(read_link_facts(exclude, uplinks).bypass)
