"""``tunlock status --json``: built on request from the parts that know, never written into.

Three sources, each the only owner of what it reports:

- the runtime's ``Status``: the machine's state as last published, the tunnel's counters,
  the last failure, the backend;
- the lock's ``LockState``, read for this answer;
- the plugin host's ``PluginsReport``: the forwarded port(s) the lock accepted, and each
  plugin's report.

``StatusReport.build`` takes a copy of each into one frozen value; ``as_json`` is the contract of
DESIGN.md (``state``, ``server``, ``handshake_age_s``, ``lock.installed``, ``forwarded_port``,
``namespace``, and more), and the metrics are rendered from the same value. One publish changes
both the runtime's status and the plugins' view, so those two are taken together, with no await
between them (``supervisor.daemon.status_now`` reads the lock first); otherwise an answer could
pair a rotation's new server with the port of the connection it left.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from msgspec import Struct, field

from supervisor.jsonvalue import JSON
from supervisor.lock.state import LockState
from supervisor.wireguard.backend import TunnelStats

if TYPE_CHECKING:
    from supervisor.plugins import Forwarded, PluginsReport
    from supervisor.runtime import FailureReport, Status


class StatusReport(Struct, frozen=True):
    """The daemon as ``tunlock status`` shows it, at one moment."""

    state: str
    server: str | None
    since: float  # wall clock, when ``state`` began
    reason: str | None
    stats: TunnelStats | None
    last_failure: FailureReport | None
    backend: str | None
    lock: LockState
    forwarded: Forwarded | None = None
    plugins: Mapping[str, Mapping[str, JSON]] = field(default_factory=lambda: MappingProxyType({}))
    namespace: str | None = None  # namespace mode's namespace; None: the whole host is locked

    @classmethod
    def build(
        cls,
        machine: Status,
        lock: LockState,
        plugins: PluginsReport | None = None,
        *,
        namespace: str | None = None,
    ) -> StatusReport:
        """One answer from the three sources (``plugins``: None when no plugin is enabled)."""
        return cls(
            state=machine.state,
            server=machine.server,
            since=machine.since_wall,
            reason=machine.reason,
            # The last counters belong to the tunnel of the server in use, if there is one.
            stats=machine.stats if machine.server is not None else None,
            last_failure=machine.last_failure,
            backend=machine.backend,
            lock=lock,
            forwarded=plugins.forwarded if plugins else None,
            plugins=plugins.plugins if plugins else MappingProxyType({}),
            namespace=namespace,
        )

    def inbound_packets(self) -> int:
        """The lock's count for the forwarded ports (every protocol), since they were accepted."""
        ports = {str(p) for p in self.forwarded.ports} if self.forwarded else set()
        return sum(n for key, n in self.lock.inbound.items() if key.split("/")[0] in ports)

    def as_json(self, now: float | None = None) -> dict[str, JSON]:
        """The ``status --json`` contract; ``now`` (wall clock) for the ages, default now."""
        now = time.time() if now is None else now
        stats = self.stats
        handshake_age = None
        if stats is not None and stats.last_handshake is not None:
            handshake_age = round(max(0.0, now - stats.last_handshake), 1)
        fw = self.forwarded
        return {
            "state": self.state,
            "server": self.server,
            "handshake_age_s": handshake_age,
            "lock": {
                "installed": self.lock.installed,
                "matching": self.lock.matching,
                "owned": self.lock.owned,
                "egress": list(self.lock.egress),
                "bypass": [dict(w) for w in self.lock.bypass],
                "inbound": dict(self.lock.inbound),
            },
            "since": round(self.since, 3),
            "reason": self.reason,
            "endpoint": str(stats.endpoint) if stats and stats.endpoint else None,
            "rx_bytes": stats.rx_bytes if stats else None,
            "tx_bytes": stats.tx_bytes if stats else None,
            "last_failure": self.last_failure.as_json() if self.last_failure else None,
            "backend": self.backend,
            "forwarded_port": fw.port if fw else None,
            "forwarded_ports": list(fw.ports) if fw else [],
            "forwarded_age_s": round(max(0.0, now - fw.since), 1) if fw else None,
            # Connections opened to the forwarded port(s) through the tunnel, as the lock counted
            # them: a number that stops growing is a port nobody reaches any more.
            "forwarded_inbound_packets": self.inbound_packets() if fw else None,
            "plugins": {name: dict(report) for name, report in self.plugins.items()},
            "namespace": self.namespace,
        }
