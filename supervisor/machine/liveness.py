"""Is the server still answering? A judgement from counter samples, pure.

Handshake age alone finds a dead server only after WireGuard's 180 s reject timer. Instead the
machine compares the counters between samples, rx against tx:

- rx grew: the server answers; the next sample after ``interval_s`` (``ALIVE``);
- neither grew: nothing was sent, so nothing was owed; the link is idle (``IDLE``): samples
  slow down to ``idle_interval_s``, and a light probe goes out only every ``idle_probe_s``,
  which keeps an idle daemon nearly free while its picture never gets staler than that;
- tx grew but rx did not: something went unanswered (``QUIET``): each sample now sends a probe
  through the tunnel (its answer shows up as rx) and samples come every ``probe_interval_s``.

The server is dead once rx has not grown for ``dead_after_s`` *and* at least
``min_unanswered_probes`` probes went out in that silence: a lossy but working link answers
some of a dozen probes, so it never reaches that verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from supervisor.machine.events import StatsRead
from supervisor.machine.settings import Settings


class Verdict(Enum):
    ALIVE = "alive"  # rx grew: sample again after interval_s
    IDLE = "idle"  # nothing sent, nothing received: sample again after idle_interval_s
    IDLE_PROBE = "idle-probe"  # idle for idle_probe_s: one probe, then sample after interval_s
    QUIET = "quiet"  # sent but not answered: probe, and sample again soon
    DEAD = "dead"


@dataclass(frozen=True)
class Liveness:
    """What the samples so far say about the current peer."""

    since: float  # when this peer began (connect, verify): the baseline for "fresh"
    rx_bytes: int | None = None  # last sample's counters; None before the first
    tx_bytes: int | None = None
    settled_at: float | None = None  # last sample that owed nothing: rx grew, or nothing was sent
    unanswered: int = 0  # samples (each with a probe) that found something owed
    ever_answered: bool = False  # rx grew, or a handshake completed, since ``since``
    idle_since: float | None = None  # nothing sent since then (the idle probe's clock)

    def judge(self, sample: StatsRead, settings: Settings) -> tuple[Liveness, Verdict, str | None]:
        """The new liveness, the verdict, and (when dead) why."""
        now = sample.now
        age = sample.handshake_age_s
        answered = self.ever_answered or (age is not None and age <= now - self.since)
        rx, tx = sample.rx_bytes, sample.tx_bytes
        if self.rx_bytes is None or self.tx_bytes is None or rx < self.rx_bytes or tx < self.tx_bytes:
            # First sample, or the counters restarted (a new peer or a restarted backend):
            # a baseline, not a judgement of silence.
            new = Liveness(self.since, rx, tx, now, 0, answered)
            verdict = Verdict.ALIVE if answered else Verdict.QUIET
        elif rx > self.rx_bytes:
            new = Liveness(self.since, rx, tx, now, 0, True)
            verdict = Verdict.ALIVE
        else:
            settled_at = self.settled_at if self.settled_at is not None else now
            if tx == self.tx_bytes and self.unanswered == 0:
                # Idle: nothing owed, so silence starts counting only from the next thing sent.
                idle_since = self.idle_since if self.idle_since is not None else settled_at
                new = Liveness(self.since, rx, tx, now, 0, answered, idle_since)
                idle_probe = now - idle_since >= settings.idle_probe_s
                verdict = Verdict.IDLE_PROBE if idle_probe else Verdict.IDLE
                if idle_probe:
                    new = replace(new, idle_since=now)
            else:
                new = Liveness(self.since, rx, tx, settled_at, self.unanswered + 1, answered)
                verdict = Verdict.QUIET
                silent_for = now - settled_at
                # ``self.unanswered`` counts the probes already out, before this sample's own.
                if silent_for >= settings.dead_after_s and self.unanswered >= settings.min_unanswered_probes:
                    return new, Verdict.DEAD, f"silent for {silent_for:.1f} s while probing"
        if age is not None and age > settings.handshake_max_age_s:
            return new, Verdict.DEAD, f"no handshake for {age:.0f} s"
        return new, verdict, None
