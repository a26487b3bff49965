"""The machine's states and the context that outlives them.

The four states of the status contract (``blocked``, ``connecting``, ``connected``, ``offline``)
plus ``stopped``, which only a stopping daemon passes through. Each state holds what it needs
and nothing more; what must survive a change of state (cooldowns, failure counts, the random
generator, where a reachable path exists) lives in ``Context``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import ClassVar, Literal, get_args

from msgspec import Struct

from supervisor.machine.liveness import Liveness
from supervisor.machine.settings import MachineSettings


class _NoPeer:
    """States without a server as the tunnel's peer."""

    __slots__ = ()  # a Struct's mixin adds no instance dictionary

    @property
    def server(self) -> None:
        return None


class Blocked(_NoPeer, Struct, frozen=True):
    """Locked and not connected: before start, between failed rounds (``retry_at``), on error."""

    name: ClassVar[str] = "blocked"
    since: float
    reason: str
    retry_at: float | None = None


class Connecting(Struct, frozen=True):
    """``server`` is the peer; waiting for the server to answer through a session (rx after a
    handshake)."""

    name: ClassVar[str] = "connecting"
    since: float
    server: str
    attempt: int
    liveness: Liveness
    # When the handshake in flight began (the connect, the last restart of it, or the sample that
    # found it complete: its session then has as long to carry an answer).
    initiated_at: float = 0.0
    # The rx counter at the first sample that found a handshake complete (None before, and again
    # when the counters restart with a new peer). Only rx beyond it is the server answering
    # through the session: a handshake response alone is not, as the server may have taken
    # another initiation of ours after it (see ``sample_while_connecting``).
    session_rx: int | None = None


class Connected(Struct, frozen=True):
    name: ClassVar[str] = "connected"
    since: float
    server: str
    liveness: Liveness
    # The traffic watch of an idle spell: "asked" for (``WatchTraffic``), then "armed" once it
    # said it listens (``TrafficWatchArmed``): asleep, the tunnel is sampled only when its idle
    # probe is due, since any packet wakes the daemon. "off" whenever the machine is awake.
    watch: Literal["off", "asked", "armed"] = "off"


class Offline(_NoPeer, Struct, frozen=True):
    """No usable path to any endpoint outside the tunnel: nothing is attempted until one returns.

    ``resume`` is the server to go back to, and ``intact`` whether its peer is still configured
    (then coming back only needs a check, not a new handshake).
    """

    name: ClassVar[str] = "offline"
    since: float
    resume: str | None
    intact: bool


class Stopped(_NoPeer, Struct, frozen=True):
    name: ClassVar[str] = "stopped"
    since: float


State = Blocked | Connecting | Connected | Offline | Stopped
STATE_TYPES: tuple[type, ...] = get_args(State)


class Failure(Struct, frozen=True):
    at: float
    server: str | None
    reason: str


_EMPTY: MappingProxyType[str, float] = MappingProxyType({})


class Context(Struct, frozen=True):
    settings: MachineSettings
    started: bool = False
    reachable: frozenset[str] | None = None  # None until the first path report: assume reachable
    cooling: MappingProxyType[str, float] = _EMPTY  # server -> skipped until
    failures: int = 0  # consecutive failed connects since the last success: the timeout ladder
    rounds: int = 0  # consecutive rounds in which every server failed: the backoff exponent
    last_server: str | None = None  # where sequential rotation continues from
    last_failure: Failure | None = None
    rng: int = 0
    last_event_at: float | None = None  # the latest event's time: a long gap after it was a suspension
    # Servers that forwarded a port (rotation prefers them) and those found unfit since (no port:
    # ``ServerUnfit``); both only ever filled when the user requires port forwarding.
    granted: frozenset[str] = frozenset()
    unfit: frozenset[str] = frozenset()

    def cooled(self, server: str, until: float) -> MappingProxyType[str, float]:
        return MappingProxyType({**self.cooling, server: until})

    def warmed(self, server: str) -> MappingProxyType[str, float]:
        return MappingProxyType({k: v for k, v in self.cooling.items() if k != server})


class Machine(Struct, frozen=True):
    """The whole of the machine's memory: the state and the context."""

    state: State
    context: Context

    @classmethod
    def initial(cls, settings: MachineSettings) -> Machine:
        return cls(Blocked(since=0.0, reason="not started"), Context(settings))
