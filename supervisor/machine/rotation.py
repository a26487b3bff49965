"""Which server next, and how long to wait when none is left: pure, with chance passed in.

A failed server is skipped for ``cooldown_s``. When every reachable server is cooling down, the
machine waits an exponentially growing, capped, jittered delay, then tries again ignoring the
cooldowns (otherwise a short backoff would find them all still cooling). Chance comes from a
small deterministic generator whose state lives in the machine's context and whose seed arrives
with ``Start``: the same events always give the same choices, which is what lets tests replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from supervisor.machine.settings import MachineSettings

_MASK64 = (1 << 64) - 1


def next_random(state: int) -> tuple[float, int]:
    """A float in [0, 1) and the next generator state (splitmix64: tiny, well mixed, pure)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53), state


def eligible(
    settings: MachineSettings,
    reachable: frozenset[str] | None,
    cooling: Mapping[str, float],
    now: float,
    *,
    exclude: Iterable[str] = (),
    ignore_cooldown: bool = False,
) -> list[str]:
    """Configured servers, in order, that are reachable, not excluded and (unless ignored) not cooling."""
    skip = set(exclude)
    return [
        name
        for name in settings.servers
        if name not in skip
        and (reachable is None or name in reachable)
        and (ignore_cooldown or cooling.get(name, float("-inf")) <= now)
    ]


def preferred(candidates: list[str], granted: frozenset[str]) -> list[str]:
    """The candidates that forwarded a port before, if any of them is one; else all of them: a
    seedbox that needs a forwarded port tries first where it got one."""
    chosen = [name for name in candidates if name in granted]
    return chosen or candidates


def choose(
    settings: MachineSettings, candidates: list[str], after: str | None, rng: int
) -> tuple[str | None, int]:
    """Pick from ``candidates``: the next after ``after`` in config order, or one at random."""
    if not candidates:
        return None, rng
    if settings.strategy == "random":
        draw, rng = next_random(rng)
        return candidates[int(draw * len(candidates))], rng
    if after in settings.servers:
        position = settings.servers.index(after)
        order = {
            name: (settings.servers.index(name) - position - 1) % len(settings.servers) for name in candidates
        }
        return min(candidates, key=order.__getitem__), rng
    return candidates[0], rng


def nominal_backoff(settings: MachineSettings, rounds: int) -> float:
    """The delay after ``rounds`` (>= 1) consecutive rounds of every server failing, before jitter."""
    exponent = min(max(rounds - 1, 0), 32)  # 2**32 times any sane initial is far past any cap
    return min(settings.backoff_max_s, settings.backoff_initial_s * 2**exponent)


def backoff(settings: MachineSettings, rounds: int, rng: int) -> tuple[float, int]:
    """The jittered delay: between half the nominal and the nominal ("equal jitter"), capped."""
    nominal = nominal_backoff(settings, rounds)
    draw, rng = next_random(rng)
    return nominal / 2 + draw * nominal / 2, rng
