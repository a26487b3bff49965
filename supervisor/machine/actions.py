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

from msgspec import Struct

from supervisor.machine.events import Timer


class ApplyLock(Struct, frozen=True):
    """Install the whole lock (one transaction), letting the tunnel reach ``servers`` only."""

    servers: tuple[str, ...]


class SetLockServers(Struct, frozen=True):
    """Swap the endpoints the tunnel may reach to ``servers``' (element changes, no gap)."""

    servers: tuple[str, ...]


class RemoveLock(Struct, frozen=True):
    """Delete the lock table: only on stop, and only in ``session`` mode."""


class ConfigurePeer(Struct, frozen=True):
    """Make ``server`` the tunnel's peer (create the interface, or swap the peer on it)."""

    server: str


class CompleteAdoption(Struct, frozen=True):
    """Check the adopted tunnel's addresses, routes and resolvers for ``server`` and put right
    what is missing: after the lock, since that tunnel carries traffic already. A failure is
    answered with ``ConnectFailed``, as a failed ``ConfigurePeer`` is."""

    server: str


class RestartHandshake(Struct, frozen=True):
    """Set ``server``'s peer again, as it is: a new peer has no handshake history, so the probe
    after it sends an initiation now instead of after WireGuard's 5 s retry timer."""

    server: str


class RemovePeer(Struct, frozen=True):
    """Leave the interface without a peer: nothing passes, nothing leaks."""


class CloseTunnel(Struct, frozen=True):
    """Delete the interface, its routes and DNS (stop)."""


class ReadStats(Struct, frozen=True):
    """Read handshake age and counters; the answer comes back as ``StatsRead`` (or
    ``StatsUnreadable``)."""


class Probe(Struct, frozen=True):
    """Send one light probe through the tunnel; its answer shows up in the rx counter."""


class WatchTraffic(Struct, frozen=True):
    """Idle: post ``TrafficSeen`` on the tunnel's next packet, once, so that traffic starting
    after an idle spell is judged at once rather than at the next idle sample. Arming it again
    while armed changes nothing."""


class StopWatchingTraffic(Struct, frozen=True):
    """The idle spell is over (or a probe of our own is about to go): disarm ``WatchTraffic``."""


class StartTimer(Struct, frozen=True):
    """(Re)arm ``timer`` to fire after ``delay_s``; a timer armed again replaces the earlier one."""

    timer: Timer
    delay_s: float


class CancelTimer(Struct, frozen=True):
    """Stop ``timer``; one that fired meanwhile is dropped as stale, never acted on."""

    timer: Timer


class PublishStatus(Struct, frozen=True):
    """The state changed: tell the log, the control socket and the metrics."""

    state: str
    server: str | None
    reason: str | None


class Exit(Struct, frozen=True):
    """Everything is done: end the runtime."""


Action = (
    ApplyLock
    | SetLockServers
    | RemoveLock
    | ConfigurePeer
    | CompleteAdoption
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
    CompleteAdoption: "the tunnel: the adopted tunnel's addresses, routes and DNS checked and completed",
    RestartHandshake: "the tunnel: the same peer set again",
    RemovePeer: "the tunnel: the peer removed, the interface kept",
    CloseTunnel: "the tunnel: interface, routes and DNS undone",
    ReadStats: "the tunnel's backend: counters and handshake age, answered as an event",
    Probe: "the prober (`health.py`, `net/probe.py`): one ICMP echo or DNS query through the tunnel",
    WatchTraffic: "the traffic watch (`net/wake.py`): a packet socket on the tunnel, idle spells only",
    StopWatchingTraffic: "the traffic watch: its socket closed",
    StartTimer: "the runtime: a timer task with a generation",
    CancelTimer: "the runtime: the timer's task cancelled",
    PublishStatus: "the runtime: the log, then its subscribers (the plugin host, systemd's notifier)",
    Exit: "the runtime: the loop ends",
}
