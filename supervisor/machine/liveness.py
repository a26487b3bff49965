"""Is the server still answering? A judgement from counter samples, pure.

Handshake age alone finds a dead server only after WireGuard's 180 s reject timer. Instead the
machine compares received bytes between samples: while rx grows, the server is alive and one
sample a second is enough. When rx stops growing, the link may simply be idle, so each sample
also sends a light probe through the tunnel (its answer shows up as rx) and samples come faster.
The server is dead once rx has not grown for ``dead_after_s`` *and* at least
``min_unanswered_probes`` probes went out in that silence: a lossy but working link answers
some of a dozen probes, so it never reaches that verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from supervisor.machine.events import StatsRead
from supervisor.machine.settings import Settings


class Verdict(Enum):
    ALIVE = "alive"  # rx grew: sample again after the normal interval
    QUIET = "quiet"  # rx did not grow: probe, and sample again soon
    DEAD = "dead"


@dataclass(frozen=True)
class Liveness:
    """What the samples so far say about the current peer."""

    since: float  # when this peer began (connect, verify): the baseline for "fresh"
    rx_bytes: int | None = None  # last sample's counter; None before the first
    last_rx_at: float | None = None  # when rx last grew (or the first sample)
    unanswered: int = 0  # probes sent since rx last grew
    ever_answered: bool = False  # rx grew, or a handshake completed, since ``since``

    def judge(self, sample: StatsRead, settings: Settings) -> tuple[Liveness, Verdict, str | None]:
        """The new liveness, the verdict, and (when dead) why."""
        now = sample.now
        age = sample.handshake_age_s
        answered = self.ever_answered or (age is not None and age <= now - self.since)
        if self.rx_bytes is None or sample.rx_bytes < self.rx_bytes:
            # First sample, or the counters restarted (a new peer or a restarted backend):
            # a baseline, not a judgement of silence.
            new = Liveness(self.since, sample.rx_bytes, now, 0, answered)
        elif sample.rx_bytes > self.rx_bytes:
            new = Liveness(self.since, sample.rx_bytes, now, 0, True)
        else:
            last_rx_at = self.last_rx_at if self.last_rx_at is not None else now
            new = Liveness(self.since, sample.rx_bytes, last_rx_at, self.unanswered + 1, answered)
        if age is not None and age > settings.handshake_max_age_s:
            return new, Verdict.DEAD, f"no handshake for {age:.0f} s"
        if new.last_rx_at == now:
            return new, (Verdict.ALIVE if new.ever_answered else Verdict.QUIET), None
        silent_for = now - (new.last_rx_at if new.last_rx_at is not None else now)
        # ``unanswered`` counts this sample's probe too (it is sent on QUIET): compare before it.
        if silent_for >= settings.dead_after_s and self.unanswered >= settings.min_unanswered_probes:
            return new, Verdict.DEAD, f"silent for {silent_for:.1f} s while probing"
        return new, Verdict.QUIET, None
