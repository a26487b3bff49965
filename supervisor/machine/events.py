"""What the machine hears: plain data, time and chance included.

Every event carries ``now`` (monotonic seconds, as the runtime read it) so that the machine never
reads a clock; the one event that seeds its choices (``Start``) carries the seed. Servers are
named, never passed as objects: the machine decides *which* server, the adapters know *what* a
server is.

The machine's values (events, actions, states, context) are frozen msgspec Structs rather than
frozen dataclasses: the same immutable, comparable, hashable, matchable records, but made in C
when the module loads. The dataclass decorator writes and compiles five methods per class, and
the machine's forty-odd classes cost the daemon's start ~12 ms that way (issue #27 item 4).
``msgspec.structs.replace`` is their ``dataclasses.replace``.
"""

from __future__ import annotations

from typing import Literal, get_args

from msgspec import Struct

from supervisor.machine.settings import MachineSettings

Timer = Literal["connect", "sample", "backoff"]
TIMERS: tuple[Timer, ...] = ("connect", "sample", "backoff")


class Start(Struct, frozen=True):
    """The daemon is up and the lock is about to be ensured; ``adopted`` is a running tunnel's server."""

    now: float
    seed: int
    adopted: str | None = None


class Stop(Struct, frozen=True):
    """SIGTERM or SIGINT: tear the tunnel down and end (the lock stays unless in session mode)."""

    now: float


class PathsChanged(Struct, frozen=True):
    """The servers whose endpoint has a usable route outside the tunnel changed."""

    now: float
    reachable: frozenset[str]


class StatsRead(Struct, frozen=True):
    """One reading of the tunnel's counters (the answer to ``ReadStats``)."""

    now: float
    rx_bytes: int
    tx_bytes: int
    handshake_age_s: float | None


class StatsUnreadable(Struct, frozen=True):
    """``ReadStats`` failed: the tunnel could not be read in time (the answer instead of ``StatsRead``)."""

    now: float
    reason: str


class TimerFired(Struct, frozen=True):
    now: float
    timer: Timer


class TrafficSeen(Struct, frozen=True):
    """A packet went through the tunnel while the watch asked for by ``WatchTraffic`` was armed:
    traffic started after an idle spell (or the watch's answer came late, after it)."""

    now: float


class TrafficWatchArmed(Struct, frozen=True):
    """The watch asked for by ``WatchTraffic`` is in place: the first packet either way will
    post ``TrafficSeen``, so an idle tunnel need not be sampled until its next idle probe."""

    now: float


class TunnelLost(Struct, frozen=True):
    """The tunnel interface was deleted under us."""

    now: float


class BackendDown(Struct, frozen=True):
    """The WireGuard backend stopped serving the interface (wireguard-go died); it restarts itself."""

    now: float
    reason: str


class BackendUp(Struct, frozen=True):
    """The backend serves the interface again, its last configuration re-applied."""

    now: float


class ConnectFailed(Struct, frozen=True):
    """Configuring ``server`` as the peer raised (the answer to a failed ``ConfigurePeer``)."""

    now: float
    server: str
    reason: str


class LockTampered(Struct, frozen=True):
    """Another program changed or deleted the lock; the guard has already restored it."""

    now: float
    reason: str


class RotateRequested(Struct, frozen=True):
    """``tunlock rotate``: move to another server."""

    now: float


class ReconnectRequested(Struct, frozen=True):
    """``tunlock reconnect``: set the current server's peer up afresh."""

    now: float


class ConfigReloaded(Struct, frozen=True):
    """SIGHUP read a valid configuration; the runtime has re-applied the lock's base policy.

    ``reachable`` is where paths exist under the new server list, looked up as it was read (a
    server new to the machine has no report yet); ``None`` keeps what the machine knows.
    """

    now: float
    settings: MachineSettings
    reachable: frozenset[str] | None = None


class ServerUnfit(Struct, frozen=True):
    """``server`` cannot give what the user requires of a connection: with ``[plugins.natpmp]
    required = true``, its gateway refused a port or stayed silent through the plugin's tries.
    Posted by the plugin host; the machine leaves the server like a failed one."""

    now: float
    server: str
    reason: str


class PortGranted(Struct, frozen=True):
    """``server`` forwarded a port (posted when forwarding is required): rotation prefers it."""

    now: float
    server: str


Event = (
    Start
    | Stop
    | PathsChanged
    | StatsRead
    | StatsUnreadable
    | TimerFired
    | TrafficSeen
    | TrafficWatchArmed
    | TunnelLost
    | BackendDown
    | BackendUp
    | ConnectFailed
    | LockTampered
    | RotateRequested
    | ReconnectRequested
    | ConfigReloaded
    | ServerUnfit
    | PortGranted
)
EVENT_TYPES: tuple[type, ...] = get_args(Event)
