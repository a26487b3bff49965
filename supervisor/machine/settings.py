"""The part of the configuration the machine decides with: servers by name, timings, strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Settings:
    servers: tuple[str, ...]
    strategy: Literal["sequential", "random"] = "sequential"
    # rotation
    cooldown_s: float = 60.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 60.0
    # detection (see ``supervisor.machine.liveness`` for why a count and a window)
    interval_s: float = 0.5  # samples while rx keeps pace, no probe
    idle_interval_s: float = 2.0
    probe_interval_s: float = 0.25  # connecting: a sample and a probe this often
    idle_probe_s: float = 10.0
    # In doubt (tx grew, rx did not): a sample and a probe this often (25 a second).
    doubt_probe_interval_s: float = 0.04
    # The verdict needs this many probes in a row unanswered: 31 is the fewest that a working
    # link with 30 % loss each way (51 % of round trips lost) all loses with a chance of at most
    # 1e-9, ``probes_needed(0.30, 1e-9)``; at 20 % each way the chance is 2e-14.
    min_unanswered_probes: int = 31
    # ...and a doubt that lasted this long: a burst of total loss shorter than this never
    # decides, however many probes it swallowed. 31 probes at 25 a second span 1.2 s as well.
    dead_after_s: float = 1.2
    # A probe counts as unanswered only this long after it went out: above the path's RTT.
    probe_reply_s: float = 0.25
    handshake_max_age_s: float = 180.0
    connect_timeouts_s: tuple[float, ...] = (4.0, 8.0, 15.0)
    lock_mode: Literal["permanent", "session"] = "permanent"

    def connect_timeout(self, attempt: int) -> float:
        """The limit for a first handshake on the ``attempt``-th consecutive try (0-based)."""
        return self.connect_timeouts_s[min(attempt, len(self.connect_timeouts_s) - 1)]
