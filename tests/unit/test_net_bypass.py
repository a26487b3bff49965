"""Finding the physical uplinks and the workloads whose frames skip the host's netfilter."""

from __future__ import annotations

from typing import Any

from supervisor.net.bypass import BypassWorkload, detect_bypass, link_facts, local_bridges, physical_uplinks

NF_ON = {"iptables": True, "ip6tables": True}
NF_OFF = {"iptables": False, "ip6tables": False}


def link(
    name: str, kind: str | None = None, *, lower: str | None = None, master: str | None = None
) -> dict[str, Any]:
    record: dict[str, Any] = {"ifname": name}
    if kind:
        record["linkinfo"] = {"info_kind": kind}
    if lower:
        record["link"] = lower
    if master:
        record["master"] = master
    return record


DEFAULT_VIA = [{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"}]


def test_the_uplink_is_the_device_of_the_default_route() -> None:
    links = [link("lo"), link("eth0"), link("tunlock0", "wireguard")]
    routes = [*DEFAULT_VIA, {"dst": "192.0.2.0/24", "dev": "eth0"}, {"dst": "default", "dev": "tunlock0"}]
    assert physical_uplinks(links, routes, exclude=("tunlock0",)) == ("eth0",)


def test_vlan_and_macvlan_uplinks_resolve_to_their_lower_device() -> None:
    links = [
        link("eth0"),
        link("eth0.100", "vlan", lower="eth0"),
        link("mv0", "macvlan", lower="eth1"),
        link("eth1"),
    ]
    routes = [
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0.100"},
        {"dst": "default", "gateway": "2001:db8::1", "dev": "mv0"},
    ]
    assert physical_uplinks(links, routes) == ("eth0", "eth1")


def test_a_bridge_uplink_resolves_to_its_hardware_ports_not_its_workloads() -> None:
    links = [
        link("br0", "bridge"),
        link("eth0", master="br0"),
        link("vnet0", "tun", master="br0"),
        link("veth1", "veth", master="br0"),
    ]
    routes = [{"dst": "default", "gateway": "192.0.2.1", "dev": "br0"}]
    assert physical_uplinks(links, routes) == ("eth0",)


def test_multipath_gateways_count() -> None:
    routes = [
        {
            "dst": "default",
            "nexthops": [{"gateway": "192.0.2.1", "dev": "eth0"}, {"gateway": "198.51.100.1", "dev": "eth1"}],
        }
    ]
    assert physical_uplinks([link("eth0"), link("eth1")], routes) == ("eth0", "eth1")


def test_a_macvlan_child_of_the_uplink_is_a_bypass() -> None:
    links = [link("eth0"), link("mv1", "macvlan", lower="eth0"), link("mv2", "macvlan", lower="eth9")]
    found = detect_bypass(links, ["eth0"], NF_ON)
    assert [(w.kind, w.interface) for w in found] == [("macvlan", "mv1")]
    assert "eth0" in found[0].detail


def test_the_hosts_own_macvlan_uplink_is_no_workload() -> None:
    links = [link("eth0"), link("mv0", "macvlan", lower="eth0"), link("ipv1", "ipvlan", lower="eth0")]
    found = detect_bypass(links, ["eth0"], NF_ON, host_devices=["mv0"])
    assert [(w.kind, w.interface) for w in found] == [("ipvlan", "ipv1")]


def test_an_uplink_bridge_is_a_bypass_unless_bridged_frames_reach_netfilter() -> None:
    links = [link("br0", "bridge"), link("eth0", master="br0"), link("vnet0", "tun", master="br0")]
    assert detect_bypass(links, ["eth0"], NF_ON) == []
    (off,) = detect_bypass(links, ["eth0"], NF_OFF)
    assert (off.kind, off.interface) == ("bridge", "br0")
    assert "bridge-nf-call" in off.detail
    (absent,) = detect_bypass(links, ["eth0"], None)
    assert "br_netfilter is not loaded" in absent.detail
    assert absent.as_dict() == {"kind": "bridge", "interface": "br0", "detail": absent.detail}


def test_an_uplink_in_a_bond_in_a_bridge_is_found() -> None:
    links = [link("br0", "bridge"), link("bond0", "bond", master="br0"), link("eth0", master="bond0")]
    routes = [{"dst": "default", "gateway": "192.0.2.1", "dev": "br0"}]
    facts = link_facts(links, routes, None)
    assert facts.uplinks == ("eth0",)
    assert facts.bypass == (BypassWorkload("bridge", "br0", facts.bypass[0].detail),)


def test_local_bridges_are_those_without_an_uplink() -> None:
    links = [
        link("docker0", "bridge"),
        link("veth1", "veth", master="docker0"),
        link("br0", "bridge"),
        link("eth0", master="br0"),
    ]
    assert local_bridges(links, ["eth0"]) == ("docker0",)


def test_configured_uplinks_win_over_the_routes() -> None:
    links = [link("br0", "bridge"), link("up0", "veth", master="br0"), link("vm0", "veth", master="br0")]
    routes = [{"dst": "default", "gateway": "192.0.2.1", "dev": "br0"}]
    assert link_facts(links, routes, NF_OFF).uplinks == ()
    facts = link_facts(links, routes, NF_OFF, uplinks=["up0"])
    assert facts.uplinks == ("up0",)
    assert facts.bridges == ()
    assert [w.interface for w in facts.bypass] == ["br0"]


def test_status_names_each_bypass_workload_and_whether_the_lock_holds_it() -> None:
    from supervisor.control.cli import describe

    workload = {"kind": "macvlan", "interface": "mv1", "detail": "macvlan child of uplink eth0"}
    held = {"installed": True, "matching": True, "egress": ["eth0"], "bypass": [workload]}
    text = describe({"state": "connected", "lock": held})
    assert "bypass:    macvlan mv1: held by the egress chain on eth0" in text
    open_ = describe({"state": "connected", "lock": {**held, "egress": []}})
    assert "bypass:    macvlan mv1: NOT held by the lock (no egress chain here)" in open_
    assert "bypass" not in describe({"state": "connected", "lock": {"installed": True, "matching": True}})
