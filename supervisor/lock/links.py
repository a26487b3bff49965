"""What the lock reads of the host's links each time it is applied, and the egress fallback.

A policy says what the config asks; applying it fills in what the links are now: the on-link
subnets (supervisor.lock.onlink), the physical uplinks that get the egress chain and the local
bridges whose port-to-port traffic forward lets through (supervisor.net.bypass). The guard
compares what it read at the last apply with what it reads after each route or link change,
and applies again when they differ.

The egress chain needs the netdev ``egress`` hook (Linux >= 5.16; a chain on a device that is
absent needs Linux >= 6.16). Where the kernel refuses it, the lock is applied without it, in
the same call, and a warning names what is then not covered: the workloads of
supervisor.net.bypass, whose frames skip the host's other hooks.
"""

from __future__ import annotations

from collections.abc import Callable

from msgspec import Struct
from msgspec.structs import replace

from supervisor.errors import TunlockError
from supervisor.lock.onlink import read_onlink
from supervisor.lock.policy import LockPolicy
from supervisor.log import get_logger
from supervisor.net.bypass import BypassWorkload, read_link_facts
from supervisor.net.ipjson import read_ip_state
from supervisor.servers import IPNetwork

log = get_logger(__name__)


class AppliedLinks(Struct, frozen=True):
    """The links as the lock saw them when it was applied."""

    onlink: tuple[IPNetwork, ...] = ()
    # The devices the egress chain is on; empty when there are none or the kernel has no hook.
    egress_devices: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    bypass: tuple[BypassWorkload, ...] = ()
    # Whether the kernel refused the egress chain (the lock went in without it).
    egress_refused: bool = False

    def same_links(self, other: AppliedLinks) -> bool:
        """Whether ``other`` (read now) would render the same lock as this (what was applied)."""
        wanted = self.egress_devices if not self.egress_refused else ()
        theirs = other.egress_devices if not self.egress_refused else ()
        return (self.onlink, wanted, self.bridges) == (other.onlink, theirs, other.bridges)


def read_links(policy: LockPolicy) -> AppliedLinks:
    """The links of this network namespace as ``policy`` would be applied to them now."""
    exclude = (policy.tunnel_interface,)
    state = read_ip_state()
    facts = read_link_facts(exclude=exclude, uplinks=policy.uplinks, state=state)
    return AppliedLinks(
        onlink=read_onlink(exclude=exclude, state=state),
        egress_devices=facts.uplinks,
        bridges=facts.bridges,
        bypass=facts.bypass,
    )


def with_links(policy: LockPolicy, links: AppliedLinks) -> LockPolicy:
    """``policy`` filled in with the links read."""
    return replace(policy, onlink=links.onlink, egress_devices=links.egress_devices, bridges=links.bridges)


def apply_read(policy: LockPolicy, install: Callable[[LockPolicy], object]) -> AppliedLinks:
    """Read the links, and ``install`` the policy filled in with them (one transaction). If the
    kernel refuses the egress chain, install it without, and say what that leaves open."""
    links = read_links(policy)
    filled = with_links(policy, links)
    try:
        install(filled)
        return links
    except TunlockError as err:  # nft's LockError, through nft or the owning context
        first = err
    # Each attempt is one transaction too, so a refused one changed nothing: first without the
    # chain but removing a stale egress table (whose old endpoint sets would drop the tunnel),
    # then without any netdev statement (a kernel built without netdev tables).
    for attempt in (replace(filled, egress_devices=()), replace(filled, egress_devices=(), netdev=False)):
        if attempt == filled:
            continue
        try:
            install(attempt)
            break
        except TunlockError:
            continue
    else:
        raise first
    log.warning(
        "the kernel refused the lock's egress chain (it needs Linux >= 5.16, and >= 6.16 for an "
        "uplink that is absent): frames of macvlan/ipvlan children of the uplink and of VMs bridged "
        "onto it are not covered by the lock",
        devices=list(links.egress_devices),
        error=str(first),
        bypass=[w.as_dict() for w in links.bypass],
    )
    return replace(links, egress_refused=True)


def egress_in_force(links: AppliedLinks | None) -> bool:
    return links is not None and bool(links.egress_devices) and not links.egress_refused
