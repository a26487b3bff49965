"""What the machine asks the runtime to do: plain data, executed in order.

The lock appears only as ``ApplyLock`` and ``SetLockServers``, both naming at most the one server
the tunnel may reach, and ``RemoveLock``, which the machine emits only when stopping in
``session`` mode. That is the whole of its power over the lock, and the property tests check it
over arbitrary event sequences. The runtime hands these to the lock's one writer while the daemon
runs (``supervisor/lock/guarded.py``), which also takes a reload's new base policy and the ports
plugins forward, each as an edit of one wanted value (``EXECUTED_BY`` below, printed by
``python -m supervisor.machine``).
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.machine.events import Timer


@dataclass(frozen=True)
class ApplyLock:
    """Install the whole lock (one transaction), letting the tunnel reach ``servers`` only."""

    servers: tuple[str, ...]


@dataclass(frozen=True)
class SetLockServers:
    """Swap the endpoints the tunnel may reach to ``servers``' (element changes, no gap)."""

    servers: tuple[str, ...]


@dataclass(frozen=True)
class RemoveLock:
    """Delete the lock table: only on stop, and only in ``session`` mode."""


@dataclass(frozen=True)
class ConfigurePeer:
    """Make ``server`` the tunnel's peer (create the interface, or swap the peer on it)."""

    server: str


@dataclass(frozen=True)
class RestartHandshake:
    """Set ``server``'s peer again, as it is: a new peer has no handshake history, so the probe
    after it sends an initiation now instead of after WireGuard's 5 s retry timer."""

    server: str


@dataclass(frozen=True)
class RemovePeer:
    """Leave the interface without a peer: nothing passes, nothing leaks."""


@dataclass(frozen=True)
class CloseTunnel:
    """Delete the interface, its routes and DNS (stop)."""


@dataclass(frozen=True)
class ReadStats:
    """Read handshake age and counters; the answer comes back as ``StatsRead`` (or
    ``StatsUnreadable``)."""


@dataclass(frozen=True)
class Probe:
    """Send one light probe through the tunnel; its answer shows up in the rx counter."""


@dataclass(frozen=True)
class WatchTraffic:
    """Idle: post ``TrafficSeen`` on the tunnel's next packet, once, so that traffic starting
    after an idle spell is judged at once rather than at the next idle sample. Arming it again
    while armed changes nothing."""


@dataclass(frozen=True)
class StopWatchingTraffic:
    """The idle spell is over (or a probe of our own is about to go): disarm ``WatchTraffic``."""


@dataclass(frozen=True)
class StartTimer:
    """(Re)arm ``timer`` to fire after ``delay_s``; a timer armed again replaces the earlier one."""

    timer: Timer
    delay_s: float


@dataclass(frozen=True)
class CancelTimer:
    """Stop ``timer``; one that fired meanwhile is dropped as stale, never acted on."""

    timer: Timer


@dataclass(frozen=True)
class PublishStatus:
    """The state changed: tell the log, the control socket and the metrics."""

    state: str
    server: str | None
    reason: str | None


@dataclass(frozen=True)
class Exit:
    """Everything is done: end the runtime."""


Action = (
    ApplyLock
    | SetLockServers
    | RemoveLock
    | ConfigurePeer
    | RestartHandshake
    | RemovePeer
    | CloseTunnel
    | ReadStats
    | Probe
    | WatchTraffic
    | StopWatchingTraffic
    | StartTimer
    | CancelTimer
    | PublishStatus
    | Exit
)


# Who carries each action out (supervisor/runtime.py dispatches them): documentation, printed
# beside the transition table so that a reader sees where the machine's decisions land.
EXECUTED_BY: dict[type, str] = {
    ApplyLock: "the lock's one writer (`lock/guarded.py`): the whole table, one transaction",
    SetLockServers: "the lock's one writer: the cheapest single transaction (element swap or whole table)",
    RemoveLock: "the lock's one writer: both tables removed, the guard stopped first",
    ConfigurePeer: "the tunnel (`wireguard/tunnel.py`): interface, peer, routes, DNS",
    RestartHandshake: "the tunnel: the same peer set again",
    RemovePeer: "the tunnel: the peer removed, the interface kept",
    CloseTunnel: "the tunnel: interface, routes and DNS undone",
    ReadStats: "the tunnel's backend: counters and handshake age, answered as an event",
    Probe: "the prober (`health.py`): one ICMP echo or DNS query through the tunnel",
    WatchTraffic: "the traffic watch (`net/wake.py`): a packet socket on the tunnel, idle spells only",
    StopWatchingTraffic: "the traffic watch: its socket closed",
    StartTimer: "the runtime: a timer task with a generation",
    CancelTimer: "the runtime: the timer's task cancelled",
    PublishStatus: "the runtime: the log, then its subscribers (the plugin host, systemd's notifier)",
    Exit: "the runtime: the loop ends",
}
