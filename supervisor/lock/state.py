"""The lock as read while the daemon runs: one frozen value for the status and the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from msgspec import Struct, field
from msgspec.structs import force_setattr

# A reading of the table hands every counter in one mapping; those of the forwarded ports'
# set carry this prefix and go to ``LockState.inbound``.
INBOUND_PREFIX = "inbound:"


class LockState(Struct, frozen=True):
    """What a reading of the lock found.

    ``installed``: the ordinary table is in place; ``matching``: it is exactly what the daemon
    last installed; ``owned``: the flush-proof twin is held; ``counters``: packets refused per
    named counter of the ordinary table; ``egress``: the uplinks the egress chain holds;
    ``bypass``: workloads whose frames skip the host's netfilter (supervisor.net.bypass), each
    as kind, interface and detail; ``inbound``: per forwarded port (``"40001/tcp"``) the packets
    that opened a connection to it through the tunnel. The default is what an unreadable lock is
    taken for: not installed."""

    installed: bool = False
    matching: bool = False
    owned: bool = False
    counters: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    egress: tuple[str, ...] = ()
    bypass: tuple[Mapping[str, str], ...] = ()
    inbound: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        counters, inbound = dict(self.counters), dict(self.inbound)
        for key in [k for k in counters if k.startswith(INBOUND_PREFIX)]:
            inbound[key.removeprefix(INBOUND_PREFIX)] = counters.pop(key)
        force_setattr(self, "counters", MappingProxyType(counters))
        force_setattr(self, "inbound", MappingProxyType(inbound))
        force_setattr(self, "bypass", tuple(MappingProxyType(dict(w)) for w in self.bypass))
