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
    # detection
    interval_s: float = 0.5
    idle_interval_s: float = 2.0
    probe_interval_s: float = 0.25
    dead_after_s: float = 3.0
    idle_probe_s: float = 10.0
    # A lost probe or two must not kill a server on a lossy link: silence counts only once at
    # least this many probes in a row went unanswered (2 s of probing at the default pace; at
    # 20 % loss both ways one probe in three fails, eight in a row about once in 3,500 tries).
    min_unanswered_probes: int = 8
    handshake_max_age_s: float = 180.0
    connect_timeouts_s: tuple[float, ...] = (4.0, 8.0, 15.0)
    lock_mode: Literal["permanent", "session"] = "permanent"

    def connect_timeout(self, attempt: int) -> float:
        """The limit for a first handshake on the ``attempt``-th consecutive try (0-based)."""
        return self.connect_timeouts_s[min(attempt, len(self.connect_timeouts_s) - 1)]
