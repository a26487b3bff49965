"""The checks beside the probes, judged from what was read (pure).

Each is ``ok`` (holds), ``FAIL`` (something can get out, or the lock is not what the
configuration asks: the run exits 1) or ``note`` (neither: said for the reader).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from supervisor.leaktest.judge import Outcome, Verdict
from supervisor.leaktest.probes import Probe
from supervisor.servers import IPAddress


class Status(StrEnum):
    OK = "ok"
    FAIL = "FAIL"
    NOTE = "note"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    how: str


def check_lock(table: str, installed: bool, fingerprint: str | None, known: Mapping[str, str]) -> CheckResult:
    """The ordinary table: present, and carrying a policy the configuration makes.

    ``known`` maps the fingerprints the configuration can give (every server, none, each server
    alone, as the daemon narrows it) to what each is.
    """
    if not installed:
        return CheckResult(
            "lock", Status.FAIL, f"table inet {table} is absent: nothing blocks traffic outside the tunnel"
        )
    if fingerprint is not None and fingerprint in known:
        return CheckResult(
            "lock", Status.OK, f"table inet {table} matches the configuration ({known[fingerprint]})"
        )
    return CheckResult(
        "lock",
        Status.FAIL,
        f"table inet {table} differs from the configuration (fingerprint {fingerprint or 'missing'}): "
        "another tool or an older configuration wrote it; `tunlock lock apply` puts it right",
    )


def check_egress(table: str, installed: bool, devices: Sequence[str]) -> CheckResult:
    """The egress chain (``netdev`` table of the lock's name): it holds the uplinks for what skips
    the host's other hooks (macvlan children, bridged VMs). Absent, the ``inet`` table still
    holds the host's own traffic: a note, unless the uplinks are known and it should be there."""
    if installed:
        on = f" on {', '.join(devices)}" if devices else ""
        return CheckResult("lock-egress", Status.OK, f"table netdev {table} holds the egress{on}")
    return CheckResult(
        "lock-egress",
        Status.NOTE,
        f"table netdev {table} is absent: frames that skip the host's hooks (macvlan children, "
        "bridged VMs) are not held; Linux >= 5.16 has the egress hook, `tunlock lock apply` adds it",
    )


def check_owned(
    table: str,
    installed: bool,
    daemon_running: bool,
    daemon_owned: bool | None,
    fingerprint: str | None = None,
    known: Mapping[str, str] | None = None,
) -> CheckResult:
    """The owned twin: held while the daemon runs (docs/lock.md, "Tampering"), with a policy the
    configuration gives (``known``, as for :func:`check_lock`)."""
    if installed:
        if known is not None and fingerprint not in known:
            return CheckResult(
                "lock-owned",
                Status.FAIL,
                f"table inet {table} differs from the configuration (fingerprint {fingerprint or 'missing'})",
            )
        return CheckResult("lock-owned", Status.OK, f"table inet {table} is present and matches")
    if not daemon_running:
        return CheckResult(
            "lock-owned", Status.NOTE, f"table inet {table} is absent: it is held only while the daemon runs"
        )
    if daemon_owned is False:
        return CheckResult(
            "lock-owned",
            Status.NOTE,
            f"table inet {table} is absent: the daemon runs without the owner flag (old kernel or nft); "
            "the guard alone restores the lock after a flush",
        )
    return CheckResult("lock-owned", Status.FAIL, f"table inet {table} is absent while the daemon runs")


def check_dns(
    resolv_conf: str, named: Sequence[IPAddress], tunnel: Iterable[IPAddress], connected: bool
) -> CheckResult:
    """Connected: the resolver file names the tunnel's resolvers only. Otherwise the lock is what
    keeps DNS in (the DNS probes show it) and the file's content is only said."""
    tunnel = set(tunnel)
    listed = ", ".join(map(str, named)) or "no resolver"
    others = [a for a in named if a not in tunnel and not a.is_loopback]
    if not connected:
        return CheckResult(
            "dns",
            Status.NOTE,
            f"{resolv_conf} names {listed}; not connected: the lock is what keeps DNS in (the dns probes)",
        )
    if not named:
        return CheckResult("dns", Status.FAIL, f"{resolv_conf} names no resolver while connected")
    if others:
        return CheckResult(
            "dns",
            Status.FAIL,
            f"{resolv_conf} names {', '.join(map(str, others))}, not the tunnel's resolvers; "
            "names will not resolve while the lock refuses them",
        )
    loopback = [a for a in named if a.is_loopback]
    if loopback:
        return CheckResult(
            "dns",
            Status.NOTE,
            f"{resolv_conf} names a local resolver ({listed}): what it forwards to is not checked",
        )
    return CheckResult("dns", Status.OK, f"{resolv_conf} names the tunnel's resolvers ({listed})")


def check_ipv6(results: Iterable[tuple[Probe, Verdict]], has_ipv6: bool) -> CheckResult:
    """IPv6 goes through the tunnel or is refused: no IPv6 probe got out."""
    if not has_ipv6:
        return CheckResult("ipv6", Status.OK, "no IPv6 address outside the tunnel: nothing of IPv6 can leave")
    v6 = [(p, v) for p, v in results if p.family == 6]
    leaked = [p for p, v in v6 if v.outcome is Outcome.LEAK]
    if leaked:
        return CheckResult("ipv6", Status.FAIL, f"{len(leaked)} of {len(v6)} IPv6 probes got out")
    tunnel = sum(1 for _, v in v6 if v.outcome is Outcome.TUNNEL)
    return CheckResult(
        "ipv6",
        Status.OK,
        f"{len(v6)} IPv6 probes: {tunnel} into the tunnel, {len(v6) - tunnel} refused or unseen",
    )


def check_bypass(workloads: Sequence[tuple[str, str, str]], egress_held: bool) -> CheckResult:
    """Workloads whose frames skip the host's ``inet`` hooks: (kind, interface, detail). Only
    the egress chain on the uplink holds them (docs/lock.md); without it they get out."""
    if not workloads:
        return CheckResult("bypass", Status.OK, "no workload bypasses this host's firewall")
    named = "; ".join(f"{kind} {interface} ({detail})" for kind, interface, detail in workloads)
    if egress_held:
        return CheckResult("bypass", Status.NOTE, f"held only by the egress chain on the uplink: {named}")
    return CheckResult(
        "bypass", Status.FAIL, f"not held by the lock (no egress chain on the uplink): {named}"
    )


def check_tunnel(state: str | None, answered: bool | None, detail: str) -> CheckResult:
    """With the daemon connected, a query through the tunnel is answered."""
    if state is None:
        return CheckResult(
            "tunnel", Status.NOTE, "no daemon answers on the control socket: the tunnel is not tried"
        )
    if state != "connected":
        return CheckResult("tunnel", Status.NOTE, f"the daemon is {state}: the tunnel is not tried")
    if answered is None:
        return CheckResult("tunnel", Status.NOTE, f"connected; {detail}")
    if answered:
        return CheckResult("tunnel", Status.OK, f"connected, traffic through the tunnel works: {detail}")
    return CheckResult("tunnel", Status.FAIL, f"connected, but nothing through the tunnel answered: {detail}")
