"""The part of the configuration the machine decides with: servers by name, timings, strategy."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class MachineSettings(Struct, frozen=True):
    servers: tuple[str, ...]
    strategy: Literal["sequential", "random"] = "sequential"
    # rotation
    cooldown_s: float = 60.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 60.0
    # detection (see ``supervisor.machine.liveness`` for why a count and a window)
    # Samples while rx keeps pace, no probe. A silent server shows as doubt at the second sample
    # after it fell silent (the first still sees the answers from before), so this sets the
    # delay before the doubt: 0.25-0.5 s. Idle tunnels sample at idle_interval_s instead.
    interval_s: float = 0.25
    idle_interval_s: float = 2.0
    probe_interval_s: float = 0.25  # connecting: a sample and a probe this often
    idle_probe_s: float = 10.0
    # In doubt (tx grew, rx did not): a sample and a probe this often (33 a second).
    doubt_probe_interval_s: float = 0.03
    # The verdict needs this many probes in a row unanswered: 31 is the fewest that a working
    # link with 30 % loss each way (51 % of round trips lost) all loses with a chance of at most
    # 1e-9, ``probes_needed(0.30, 1e-9)``; at 20 % each way the chance is 2e-14.
    min_unanswered_probes: int = 31
    # ...and a doubt that lasted this long: a burst of total loss shorter than this never
    # decides, however many probes it swallowed (31 probes at 33 a second span 0.9 s).
    dead_after_s: float = 1.0
    # A probe counts as unanswered only this long after it went out: above the path's RTT.
    probe_reply_s: float = 0.25
    handshake_max_age_s: float = 180.0
    connect_timeouts_s: tuple[float, ...] = (4.0, 8.0, 15.0)
    # WireGuard sends an unanswered handshake initiation again only after REKEY_TIMEOUT (5 s),
    # longer than the first connect window: one lost packet would fail a healthy server. So
    # while connecting, a sample that finds the handshake unanswered for
    # ``handshake_retries_s[attempt]`` starts it afresh (samples come every probe_interval_s).
    # A restart drops the answer still on its way to the replaced peer, so the pace must leave
    # room for the path's round trip: 0.5 s first (8 initiations in the 4 s window: at 20 % loss
    # both ways all 8 fail about once in 3,500 connects, the odds ``min_unanswered_probes``
    # accepts), then twice and four times that on the next consecutive attempts (8 and 7
    # initiations in their 8 s and 15 s windows) for a path slower than half a second.
    handshake_retries_s: tuple[float, ...] = (0.5, 1.0, 2.0)
    # A gap at least this long (or three of the slowest sampling periods, if longer) between two
    # events while a tunnel is up means the daemon did not run: a suspended VM, a SIGSTOP. The
    # silence is then ours, not the server's (``core.step``). Longer than anything the runtime
    # waits for while the machine waits (a stats read, 2 s), so a busy machine is not taken for
    # a suspended one; a false "resume" would only restart the watch, never fail a server.
    resume_gap_min_s: float = 10.0
    lock_mode: Literal["permanent", "session"] = "permanent"
    # Servers with nothing to probe (no tunnel DNS and no health.probe_target): no answer can be
    # asked for through their session, so connecting ends on the handshake response alone.
    unprobed: frozenset[str] = frozenset()

    def connect_timeout(self, attempt: int) -> float:
        """The limit for a first handshake on the ``attempt``-th consecutive try (0-based)."""
        return self.connect_timeouts_s[min(attempt, len(self.connect_timeouts_s) - 1)]

    def resume_gap(self, asleep: bool = False) -> float:
        """How long a gap between two events means the daemon was not running (see above).
        ``asleep``: an idle tunnel with the traffic watch in place, sampled only when its idle
        probe is due, so that pace counts among the slowest."""
        slowest = max(self.interval_s, self.idle_interval_s, self.probe_interval_s)
        if asleep:
            slowest = max(slowest, self.idle_probe_s)
        return max(self.resume_gap_min_s, 3 * slowest)

    def handshake_retry(self, attempt: int) -> float:
        """How long a handshake may go unanswered, on the ``attempt``-th try, before a new one."""
        return self.handshake_retries_s[min(attempt, len(self.handshake_retries_s) - 1)]
