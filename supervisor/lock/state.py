"""The lock as read while the daemon runs: one frozen value for the status and the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class LockState:
    """What a reading of the lock found.

    ``installed``: the ordinary table is in place; ``matching``: it is exactly what the daemon
    last installed; ``owned``: the flush-proof twin is held; ``counters``: packets refused per
    named counter of the ordinary table; ``egress``: the uplinks the egress chain holds;
    ``bypass``: workloads whose frames skip the host's netfilter (supervisor.net.bypass), each
    as kind, interface and detail. The default is what an unreadable lock is taken for: not
    installed."""

    installed: bool = False
    matching: bool = False
    owned: bool = False
    counters: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    egress: tuple[str, ...] = ()
    bypass: tuple[Mapping[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "counters", MappingProxyType(dict(self.counters)))
        object.__setattr__(self, "bypass", tuple(MappingProxyType(dict(w)) for w in self.bypass))
