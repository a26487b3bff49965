"""Which forwarded port the lock may accept: the trust decision every provider's grant goes through.

The provider, not the user, picks a forwarded port (a gateway grants one; a static port is at
least the user's, but may since be held by another program), and whatever the port, the lock
would accept it through the tunnel. A port below 1024, one outside ``allowed_ports``, or one that
a program not named in ``listeners`` (the torrent clients) already accepts on would expose a
service the user never chose: a gateway granting 22 would put the host's SSH on the internet.
``grant_refusal`` says why such a port is refused; it is pure, and ``holders`` reads the socket
table it judges (blocking: a worker thread).
"""

from __future__ import annotations

from collections.abc import Sequence

from plugins import sockets

FIRST_UNPRIVILEGED = 1024
# The programs a forwarded port is for: torrent clients, by executable name.
DEFAULT_LISTENERS = (
    "qbittorrent-nox",
    "qbittorrent",
    "transmission-daemon",
    "transmission-gtk",
    "transmission-qt",
    "deluged",
    "rtorrent",
    "aria2c",
)

Holders = Sequence[tuple[sockets.Socket, Sequence[sockets.Program]]]


def grant_refusal(
    port: int, allowed: Sequence[range], holders: Holders, listeners: frozenset[str]
) -> str | None:
    """Why the lock must not accept ``port`` that a provider granted, or None when it may.
    ``holders``: the sockets of this namespace that accept on ``port``, with their programs;
    ``listeners``: program names, or ``uid:N`` for any socket of that owner (a client in another
    container, whose process cannot be seen from here)."""
    if port < FIRST_UNPRIVILEGED:
        return f"port {port} is below {FIRST_UNPRIVILEGED}: a system service's, never forwarded"
    if not any(port in r for r in allowed):
        return f"port {port} is outside allowed_ports ({', '.join(map(shown_range, allowed))})"
    for sock, programs in holders:
        if sock.port != port or sock.loopback_only or f"uid:{sock.uid}" in listeners:
            continue
        if not programs:
            return (
                f"port {port} ({sock.protocol}) is held by a process tunlock cannot see (uid "
                f"{sock.uid}, another PID namespace?), not by one of listeners"
            )
        foreign = next((p for p in programs if p.name not in listeners), None)
        if foreign is not None:
            return (
                f"port {port} ({sock.protocol}) is held by {foreign.name} (pid {foreign.pid}), "
                "not by one of listeners"
            )
    return None


def shown_range(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def port_ranges(value: object) -> tuple[range, ...]:
    """``allowed_ports`` (ports and ``"low-high"`` ranges, each within 1024-65535) as ranges;
    ValueError saying what is wrong."""
    wrong = ValueError(
        f'{value!r}: a list of ports and ranges such as [51413, "40000-65535"], '
        f"each within {FIRST_UNPRIVILEGED}-65535"
    )
    if not isinstance(value, list | tuple) or not value:
        raise wrong
    ranges = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif (
            isinstance(item, str)
            and item.count("-") == 1
            and all(part.strip().isascii() and part.strip().isdigit() for part in item.split("-"))
        ):
            low, high = (int(part) for part in item.split("-"))
        else:
            raise wrong
        if not FIRST_UNPRIVILEGED <= low <= high <= 65535:
            raise wrong
        ranges.append(range(low, high + 1))
    return tuple(ranges)


def holders(port: int) -> list[tuple[sockets.Socket, list[sockets.Program]]]:
    """The sockets accepting on ``port`` here, with their programs (blocking: a thread)."""
    on_port = [s for s in sockets.accepting_sockets() if s.port == port and not s.loopback_only]
    programs = sockets.programs_of(s.inode for s in on_port)
    return [(s, programs[s.inode]) for s in on_port]
