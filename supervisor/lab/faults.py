"""Faults the lab injects, each by name (``tunlock lab fault NAME [ARG]``).

Servers are numbered from 1. The kernel here has no netem, so loss is an nft
rule in the ISP that drops a random share of the client link's packets (both
ways); delay needs netem and says so where it is missing.
"""

from __future__ import annotations

import os
import signal

from supervisor.lab.topology import Lab, LabError, process_alive, sh, uapi_pid

_FAULT_TABLE = "labfault"


def _isp_nft(lab: Lab, script: str) -> None:
    sh("ip", "netns", "exec", lab.ns("isp"), "nft", "-f", "-", input=script)


def _drop_isp_chain(lab: Lab, chain: str) -> None:
    """Remove one fault's chain (absent is fine: the fault was not on)."""
    sh(
        "ip",
        "netns",
        "exec",
        lab.ns("isp"),
        "nft",
        "delete",
        "chain",
        "inet",
        _FAULT_TABLE,
        chain,
        check=False,
    )


def kill_server(lab: Lab, index: str = "1") -> str:
    server = lab.servers[int(index) - 1]
    if not server.wg_pid:  # a kernel WireGuard server: its interface is all there is of it
        sh("ip", "-n", server.ns, "link", "del", server.ifname)
        return f"deleted the WireGuard interface of {server.name}"
    os.kill(server.wg_pid, signal.SIGKILL)
    return f"killed wireguard-go of {server.name} (pid {server.wg_pid})"


def restart_server(lab: Lab, index: str = "1") -> str:
    """Start a killed server again: its wireguard-go, keys, peer and tunnel addresses, as built."""
    server = lab.servers[int(index) - 1]
    if process_alive(server.wg_pid):
        return f"{server.name} is running"
    lab.start_server_tunnel(server)
    lab.state.save()
    return f"{server.name} started again (pid {server.wg_pid})"


def blackhole_server(lab: Lab, index: str = "1") -> str:
    """Drop everything to and from a server silently, in the ISP (no ICMP, no RST)."""
    server = lab.servers[int(index) - 1]
    v4, v6 = server.endpoint_v4, server.endpoint_v6
    _isp_nft(
        lab,
        f"""table inet {_FAULT_TABLE} {{
  chain blackhole{server.index} {{
    type filter hook forward priority -10;
    ip daddr {v4} drop
    ip saddr {v4} drop
    ip6 daddr {v6} drop
    ip6 saddr {v6} drop
  }}
}}
""",
    )
    return f"blackholed {server.name} ({server.endpoint_v4}, {server.endpoint_v6})"


def restore_server(lab: Lab, index: str = "1") -> str:
    server = lab.servers[int(index) - 1]
    _drop_isp_chain(lab, f"blackhole{server.index}")
    return f"{server.name} reachable again"


def loss(lab: Lab, percent: str = "20") -> str:
    """Drop ``percent`` % of the client link's packets at random, both directions."""
    share = int(percent)
    if not 0 < share < 100:
        raise LabError("loss takes a percentage from 1 to 99")
    clear_loss(lab)
    _isp_nft(
        lab,
        f"""table inet {_FAULT_TABLE} {{
  chain loss {{
    type filter hook prerouting priority -10;
    iifname "cl0" numgen random mod 100 < {share} drop
  }}
  chain loss_out {{
    type filter hook postrouting priority -10;
    oifname "cl0" numgen random mod 100 < {share} drop
  }}
}}
""",
    )
    return f"{share} % loss on the client link, both ways"


def clear_loss(lab: Lab) -> str:
    for chain in ("loss", "loss_out"):
        _drop_isp_chain(lab, chain)
    return "no loss"


def delay(lab: Lab, ms: str = "100") -> str:
    try:
        sh(
            "ip",
            "netns",
            "exec",
            lab.ns("isp"),
            "tc",
            "qdisc",
            "replace",
            "dev",
            "cl0",
            "root",
            "netem",
            "delay",
            f"{int(ms)}ms",
        )
    except LabError as err:
        raise LabError(f"delay needs netem, which this kernel lacks ({err})") from None
    return f"{int(ms)} ms delay towards the client"


def link_down(lab: Lab) -> str:
    """The ISP side goes down: the client keeps its address but loses the carrier (a pulled cable)."""
    sh("ip", "-n", lab.ns("isp"), "link", "set", "cl0", "down")
    return "client link down (no carrier)"


def link_up(lab: Lab) -> str:
    sh("ip", "-n", lab.ns("isp"), "link", "set", "cl0", "up")
    return "client link up"


def delete_default_route(lab: Lab) -> str:
    sh("ip", "-n", lab.ns("client"), "route", "del", "default", check=False)
    sh("ip", "-n", lab.ns("client"), "-6", "route", "del", "default", check=False)
    return "client default routes deleted (v4 and v6)"


def restore_default_route(lab: Lab) -> str:
    sh("ip", "-n", lab.ns("client"), "route", "replace", "default", "via", "192.0.2.1")
    sh("ip", "-n", lab.ns("client"), "-6", "route", "replace", "default", "via", "2001:db8:c::1")
    return "client default routes restored"


def delete_tunnel_interface(lab: Lab) -> str:
    sh("ip", "-n", lab.ns("client"), "link", "del", lab.client_ifname)
    return f"deleted {lab.client_ifname} in the client"


def client_wireguard_pid(lab: Lab) -> int | None:
    return uapi_pid(lab.client_ifname)


def kill_client_wireguard_go(lab: Lab) -> str:
    pid = client_wireguard_pid(lab)
    if pid is None:
        raise LabError(f"no wireguard-go serves {lab.client_ifname}")
    os.kill(pid, signal.SIGKILL)
    return f"killed the client's wireguard-go (pid {pid})"


def flush_client_ruleset(lab: Lab) -> str:
    sh("ip", "netns", "exec", lab.ns("client"), "nft", "flush", "ruleset")
    return "flushed the client's whole nftables ruleset"


FAULTS = {
    f.__name__.replace("_", "-"): f
    for f in (
        kill_server,
        restart_server,
        blackhole_server,
        restore_server,
        loss,
        clear_loss,
        delay,
        link_down,
        link_up,
        delete_default_route,
        restore_default_route,
        delete_tunnel_interface,
        kill_client_wireguard_go,
        flush_client_ruleset,
    )
}


def inject(lab: Lab, name: str, *args: str) -> str:
    """Inject the fault ``name`` (dashes or underscores) and say what was done."""
    fault = FAULTS.get(name.replace("_", "-"))
    if fault is None:
        raise LabError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    return fault(lab, *args)
