"""Is the server still answering? A judgement from counter samples, pure, escalating on doubt.

Handshake age alone finds a dead server only after WireGuard's 180 s reject timer. Instead the
machine compares the counters between samples, rx against tx, and pays for certainty only when
there is doubt:

- rx grew: the server answers; the next sample after ``interval_s`` (``ALIVE``), no probe;
- neither grew: nothing was sent, so nothing was owed; the link is idle (``IDLE``): samples
  slow down to ``idle_interval_s``, and a light probe goes out only every ``idle_probe_s``,
  which keeps an idle daemon nearly free while its picture never gets staler than that;
- tx grew but rx did not: doubt (``DOUBT``). From this sample on, every sample sends a probe
  through the tunnel (its answer shows up as rx) and samples come every
  ``doubt_probe_interval_s`` (tens a second), kept on schedule from the doubt's start (a late
  sample makes the next one sooner). The first rx growth clears the doubt, and the pace falls
  back to ``interval_s`` with no probe;
- an idle spell's probe answered with nothing else moving (rx and tx grew by the same bytes: a
  probe and its answer) is idle again at once, its probe clock restarted: no sample at the
  calm pace in between. That probe is the idle probe, or the doubt's first probe when what
  began the doubt was a lone keepalive (``KEEPALIVE_BYTES`` out, nothing in): WireGuard sends
  one 10 s after the last answer it got, so every idle probe's answer brings one.

Why a count *and* a window. Certainty grows with the number of probes, not with seconds: with
a loss ``p`` each way a probe's round trip is lost with ``1 - (1 - p)^2``, and independent
probes are all lost with that to the power of their number (``chance_all_lost``). The count
``min_unanswered_probes`` is chosen so that this is negligible at the loss one wants to ride
out (``probes_needed``: 31 at 30 % each way for at most 1e-9). Independence is what a burst
breaks: a link that drops *everything* for half a second loses every probe sent in it however
many there are, so the doubt must also have lasted ``dead_after_s``, the longest burst to ride
out. A probe counts as unanswered only once ``probe_reply_s`` has passed since it went out (its
answer may still be on its way), so the probes in flight never add to the count.

The server is dead when, in one doubt, at least ``min_unanswered_probes`` probes went out at
least ``probe_reply_s`` ago without rx growing, and the doubt began at least ``dead_after_s``
ago. Time is event data (each sample's ``now``), so the machine reads no clock.
"""

from __future__ import annotations

import math
from enum import Enum

from msgspec import Struct
from msgspec.structs import replace

from supervisor.machine.events import StatsRead
from supervisor.machine.settings import MachineSettings

# A WireGuard keepalive as the transfer counters count it: a data message with nothing in it.
KEEPALIVE_BYTES = 32


class Verdict(Enum):
    ALIVE = "alive"  # rx grew: sample again after interval_s, no probe
    IDLE = "idle"  # nothing sent, nothing received: sample again after idle_interval_s
    IDLE_PROBE = "idle-probe"  # idle for idle_probe_s: one probe, then sample after interval_s
    DOUBT = "doubt"  # sent but not answered: probe, and sample again after doubt_probe_interval_s
    DEAD = "dead"


def round_trip_loss(loss_each_way: float) -> float:
    """The chance that a probe or its answer is lost, with ``loss_each_way`` independent loss."""
    return 1 - (1 - loss_each_way) ** 2


def chance_all_lost(probes: int, loss_each_way: float) -> float:
    """The chance that ``probes`` independent probes on a working link all go unanswered."""
    return round_trip_loss(loss_each_way) ** probes


def probes_needed(loss_each_way: float, false_verdict: float) -> int:
    """The fewest consecutive unanswered probes that a working link with ``loss_each_way``
    produces with a chance of at most ``false_verdict`` (the default count's derivation)."""
    return math.ceil(math.log(false_verdict) / math.log(round_trip_loss(loss_each_way)))


class Liveness(Struct, frozen=True):
    """What the samples so far say about the current peer."""

    since: float  # when this peer began (connect, verify): the baseline for "fresh"
    rx_bytes: int | None = None  # last sample's counters; None before the first
    tx_bytes: int | None = None
    settled_at: float | None = None  # last sample that owed nothing: rx grew, or nothing was sent
    ever_answered: bool = False  # rx grew, or a handshake completed, since ``since``
    idle_since: float | None = None  # nothing sent since then (the idle probe's clock)
    # The doubt: when each of its probes went out (one per sample); empty when there is none.
    probes: tuple[float, ...] = ()
    # When the watch restarted after the daemon did not run (``core.resume_after_gap``): the
    # handshake aged meanwhile unwatched, so only its age since then counts against the server.
    resumed_at: float | None = None
    # The probe out is an idle spell's: the idle probe, or the doubt a lone keepalive began.
    probing_idle: bool = False

    @property
    def in_doubt(self) -> bool:
        return bool(self.probes)

    @property
    def doubt_since(self) -> float | None:
        """When the doubt began (its first probe), or None."""
        return self.probes[0] if self.probes else None

    @property
    def unanswered(self) -> int:
        """Probes out in this doubt, answered or not yet (0 when there is no doubt)."""
        return len(self.probes)

    def restarted_by(self, sample: StatsRead) -> bool:
        """The first sample, or counters that went back (a new peer or a restarted backend):
        a baseline, not a judgement of silence."""
        old_rx, old_tx = self.rx_bytes, self.tx_bytes
        return old_rx is None or old_tx is None or sample.rx_bytes < old_rx or sample.tx_bytes < old_tx

    def next_probe_in(self, now: float, settings: MachineSettings) -> float:
        """The delay to the doubt's next sample and probe: on a fixed schedule from the doubt's
        start, so that a late timer or a slow counter read (a busy machine) is made up on the
        next interval rather than stretching every one; between a third of the pace and the pace."""
        pace = settings.doubt_probe_interval_s
        began = self.doubt_since if self.doubt_since is not None else now
        due = began + len(self.probes) * pace
        return round(min(pace, max(pace / 3, due - now)), 6)

    def overdue(self, now: float, settings: MachineSettings) -> int:
        """This doubt's probes whose answer is overdue at ``now``: out for ``probe_reply_s``."""
        return sum(1 for sent in self.probes if now - sent >= settings.probe_reply_s)

    def judge(self, sample: StatsRead, settings: MachineSettings) -> tuple[Liveness, Verdict, str | None]:
        """The new liveness, the verdict, and (when dead) why."""
        now = sample.now
        age = sample.handshake_age_s
        answered = self.ever_answered or (age is not None and age <= now - self.since)
        rx, tx = sample.rx_bytes, sample.tx_bytes
        # Since the last sample (nothing before the first: that one is a baseline).
        got = rx - (self.rx_bytes if self.rx_bytes is not None else rx)
        sent = tx - (self.tx_bytes if self.tx_bytes is not None else tx)
        if self.restarted_by(sample) or self.rx_bytes is None:  # (the second only narrows the type)
            new = Liveness(self.since, rx, tx, now, answered, resumed_at=self.resumed_at)
            verdict = Verdict.ALIVE if answered else Verdict.DOUBT
            if verdict is Verdict.DOUBT:
                new = replace(new, probes=(now,))
        elif self.probing_idle and got > 0 and got == sent:
            # An idle spell's probe answered, and nothing else moved (a probe and its answer are
            # the same size): still idle, its probe clock restarted. Back to sleep at once rather
            # than after one more sample at the calm pace (issue #27: two samples per idle probe
            # instead of three).
            new = Liveness(self.since, rx, tx, now, True, now, resumed_at=self.resumed_at)
            verdict = Verdict.IDLE
        elif rx > self.rx_bytes or (answered and not self.ever_answered):
            # Any answer, to a probe or to anything else, clears the doubt at once; so does a
            # first handshake (connecting's probes must not count against a server that answered).
            new = Liveness(self.since, rx, tx, now, True, resumed_at=self.resumed_at)
            verdict = Verdict.ALIVE
        elif tx == self.tx_bytes and not self.in_doubt:
            # Idle: nothing owed, so silence starts counting only from the next thing sent.
            settled_at = self.settled_at if self.settled_at is not None else now
            idle_since = self.idle_since if self.idle_since is not None else settled_at
            idle_probe = now - idle_since >= settings.idle_probe_s
            idle_since = now if idle_probe else idle_since
            new = Liveness(
                self.since,
                rx,
                tx,
                now,
                answered,
                idle_since,
                resumed_at=self.resumed_at,
                probing_idle=idle_probe,
            )
            verdict = Verdict.IDLE_PROBE if idle_probe else Verdict.IDLE
        else:
            # Owed and unanswered: doubt. The verdict counts the probes already out, before this
            # sample's own, and only those whose answer is overdue.
            overdue = self.overdue(now, settings)
            began = self.doubt_since if self.doubt_since is not None else now
            if overdue >= settings.min_unanswered_probes and now - began >= settings.dead_after_s:
                why = f"silent: {overdue} probes unanswered over {now - began:.1f} s"
                return replace(self, rx_bytes=rx, tx_bytes=tx), Verdict.DEAD, why
            # A doubt that a lone keepalive began in an idle spell (WireGuard's passive keepalive:
            # 32 bytes out, 10 s after the last answer) probes for the idle spell.
            keepalive_only = self.idle_since is not None and got == 0 and sent <= KEEPALIVE_BYTES
            new = Liveness(
                self.since,
                rx,
                tx,
                self.settled_at,
                answered,
                None,
                (*self.probes, now),
                self.resumed_at,
                probing_idle=keepalive_only if not self.in_doubt else self.probing_idle,
            )
            verdict = Verdict.DOUBT
        # A handshake that aged while the daemon did not run is not the server's silence: after a
        # resume only the part of its age that was watched counts.
        watched = age if age is None or self.resumed_at is None else min(age, now - self.resumed_at)
        if watched is not None and watched > settings.handshake_max_age_s:
            return new, Verdict.DEAD, f"no handshake for {age:.0f} s"
        return new, verdict, None
