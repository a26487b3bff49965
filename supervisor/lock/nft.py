"""Applying, reading and removing the lock with the ``nft`` tool.

Each change is one ``nft -f -`` call, which the kernel applies as one
transaction: it either takes effect whole or not at all, so a failed apply keeps
the old table. ``nft`` (not a hand-rolled netlink batch) because it is the
reference implementation of the ruleset language, already a dependency of every
host that has nftables, and its errors name the offending line.
"""

from __future__ import annotations

import re
import subprocess

from msgspec import Struct

from supervisor.lock.libnftables import LockError
from supervisor.lock.links import AppliedLinks, apply_read
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import (
    COUNTERS,
    EGRESS_COUNTER,
    TUNNEL_INBOUND_SET,
    fingerprint,
    render,
    render_endpoint_swap,
    render_tunnel_inbound_swap,
)
from supervisor.lock.state import INBOUND_PREFIX
from supervisor.safety import ensure_safe_to_lock
from supervisor.servers import Endpoint

NFT = "nft"
_TIMEOUT_S = 10.0


class LockStatus(Struct, frozen=True):
    installed: bool
    fingerprint: str | None
    counters: dict[str, int]

    def matches(self, policy: LockPolicy) -> bool:
        return self.installed and self.fingerprint == fingerprint(policy)


def _nft(args: list[str], script: str | None = None) -> str:
    try:
        done = subprocess.run([NFT, *args], input=script, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except FileNotFoundError:
        raise LockError("the nft tool is not installed (Debian: apt-get install nftables)") from None
    except subprocess.TimeoutExpired:
        raise LockError(f"nft {' '.join(args)} did not answer within {_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise LockError(f"nft {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def apply(policy: LockPolicy) -> AppliedLinks:
    """Install or replace the whole table in one transaction (idempotent).

    The LAN is narrowed to the subnets on-link at this moment (supervisor.lock.onlink), and the
    egress chain goes on the physical uplinks found now (supervisor.lock.links): what was read
    is returned so that a caller can tell when it changes.
    """
    ensure_safe_to_lock()
    return apply_read(policy, lambda filled: _nft(["-f", "-"], render(filled)))


def swap_endpoints(policy: LockPolicy, old: frozenset[Endpoint], new: frozenset[Endpoint]) -> None:
    """Let the tunnel reach ``new`` instead of ``old``: element changes in one transaction."""
    ensure_safe_to_lock()
    # The egress table holds the endpoints too: a caller that does not say where the egress
    # chain is (policy.egress_devices, as the guard does) gets it looked up, or the swap would
    # leave the uplink's egress dropping the new endpoint's WireGuard packets.
    egress = bool(policy.egress_devices) or _egress_listing(policy.table) is not None
    script = render_endpoint_swap(policy.table, old, new, egress=egress)
    if script:
        _nft(["-f", "-"], script)


def swap_tunnel_inbound(
    policy: LockPolicy, old: frozenset[tuple[str, int]], new: frozenset[tuple[str, int]]
) -> None:
    """Accept ``new`` instead of ``old`` (protocol, port) pairs through the tunnel, in one
    transaction."""
    ensure_safe_to_lock()
    script = render_tunnel_inbound_swap(policy.table, old, new)
    if script:
        _nft(["-f", "-"], script)


def status(table: str) -> LockStatus:
    """Whether the table is installed, which policy it carries, and its counters."""
    try:
        text = _nft(["list", "table", "inet", table])
    except LockError as err:
        if "No such file or directory" in str(err):
            return LockStatus(installed=False, fingerprint=None, counters={})
        raise
    # The text listing, not `nft -j`: nft 1.0.6's JSON leaves out the table's comment.
    match = re.search(r'comment "tunlock lock ([0-9a-f]{16})"', text)
    return LockStatus(installed=True, fingerprint=match.group(1) if match else None, counters=_counters(text))


def _counters(text: str) -> dict[str, int]:
    return {
        name: int(packets)
        for name, packets in re.findall(r"counter (\w+) \{\s*packets (\d+) bytes \d+", text)
        if name in COUNTERS
    }


def _inbound_counters(text: str) -> dict[str, int]:
    """Packets per element of the tunnel_inbound set, as ``"inbound:40001/tcp"`` keys (see
    ``LockState``)."""
    block = re.search(rf"set {TUNNEL_INBOUND_SET} \{{(.*?)\n\s*\}}", text, re.S)
    if block is None:
        return {}
    return {
        f"{INBOUND_PREFIX}{port}/{protocol}": int(packets)
        for protocol, port, packets in re.findall(r"(tcp|udp) \. (\d+) counter packets (\d+)", block.group(1))
    }


def reading(table: str) -> tuple[str, dict[str, int]]:
    """One listing of the table: as a tamper check compares it (counters zeroed), and its counters."""
    return parse_reading(_nft(["list", "table", "inet", table]))


def parse_reading(text: str) -> tuple[str, dict[str, int]]:
    """A table's listing as a tamper check compares it (counters zeroed), and its counters: the
    named ones and, under ``INBOUND_PREFIX``, each forwarded port's (``LockState.inbound``)."""
    counters = _counters(text) | _inbound_counters(text)
    return re.sub(r"packets \d+ bytes \d+", "packets 0 bytes 0", text), counters


def listing(table: str) -> str:
    """The table as nft prints it, counters zeroed: what a tamper check compares."""
    return reading(table)[0]


def remove(table: str) -> bool:
    """Delete the table and its egress table (the only way to open the lock); False if it was
    not installed."""
    if not status(table).installed:
        return False
    _nft(["-f", "-"], f"delete table inet {table}\nadd table netdev {table}\ndelete table netdev {table}\n")
    return True


def saved(table: str) -> str | None:
    """The table as nft lists it, with its egress table when there is one (what ``restore``
    puts back), or None when the lock is absent."""
    try:
        text = _nft(["list", "table", "inet", table])
    except LockError as err:
        if "No such file or directory" in str(err):
            return None
        raise
    return text + (_egress_listing(table) or "")


def _egress_listing(table: str) -> str | None:
    try:
        return _nft(["list", "table", "netdev", table])
    except LockError:  # none (or no netdev family in this kernel)
        return None


def restore(table: str, text: str | None) -> None:
    """Put back what ``saved`` returned in one transaction: the tables as they were (an egress
    table that was not there is removed), or no lock (None)."""
    ensure_safe_to_lock()
    if text is None:
        remove(table)
        return
    head = f"add table inet {table}\ndelete table inet {table}\n"
    if _egress_listing(table) is not None or f"table netdev {table}" in text:
        head += f"add table netdev {table}\ndelete table netdev {table}\n"
    _nft(["-f", "-"], head + text)


def egress_counter(table: str) -> int | None:
    """The egress chain's drop counter, or None when the egress table is not installed."""
    try:
        text = _nft(["list", "table", "netdev", table])
    except LockError:
        return None
    match = re.search(rf"counter {EGRESS_COUNTER} \{{\s*packets (\d+)", text)
    return int(match.group(1)) if match else None
