"""Judging one probe from what was seen (pure): did it get out, and how do we know.

Evidence, strongest first:

1. **An answer from outside** on an interface that is not the tunnel: an ICMP time exceeded
   (the first router discarded it), an echo reply, a destination unreachable from another host,
   a TCP SYN-ACK or reset, a UDP or DNS answer. The packet left: ``LEAK``.
2. **Seen leaving** an interface that is not the tunnel, by the capture (a packet socket sees a
   packet once the kernel hands it to the interface's driver, after every firewall hook): it
   left, though nothing answered (the first router drops TTL-expired packets silently, or rate-
   limits its ICMP): ``LEAK``.
3. **Into the tunnel**: seen leaving through, or answered from, the tunnel interface: not a leak
   (an unbound probe while connected goes there).
4. **Refused by the kernel**: the send failed (``EPERM``: a firewall rule in the output path
   dropped or rejected it; ``ENOBUFS``: the egress chain on the uplink dropped it; ``ENETUNREACH``:
   no route), or the connection was refused with a
   local error and nothing of it was seen outside: ``blocked``.
5. **Nothing**: no error, no answer, not seen leaving: ``blocked``. With the capture that is
   nearly as strong as 4 (nothing passed any interface). Without it (no ``CAP_NET_RAW``) it is
   ``LEAK?``: the lock refuses every probe at send time or with a local reject, so a probe the
   kernel let go is one that passed every firewall hook, and its first hop's answer is what the
   lock's input chain drops; the run exits 1 rather than call it blocked.

A destination unreachable is evidence that the packet left only when it comes from another host
on an outside interface: one the lock (``reject``) or the kernel itself (no neighbour, no route)
generates is delivered through loopback, which the capture leaves out, and shows up as the
socket's error (rule 4).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from supervisor.leaktest.packets import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    ProbeKey,
    ReplyKind,
    is_probe,
    parse,
    reply_to,
)
from supervisor.leaktest.probes import Probe

# ICMP destination-unreachable codes, named for the report: (family, code) -> name.
UNREACHABLE_CODES = {
    (4, 0): "network unreachable",
    (4, 1): "host unreachable",
    (4, 3): "port unreachable",
    (4, 9): "network prohibited",
    (4, 10): "host prohibited",
    (4, 13): "administratively prohibited",
    (6, 0): "no route",
    (6, 1): "administratively prohibited",
    (6, 3): "address unreachable",
    (6, 4): "port unreachable",
    (6, 5): "source address failed policy",
    (6, 6): "reject route",
}
# Errors with which the kernel refuses a probe at send time or on connect, and what they mean.
REFUSALS = {
    errno.EPERM: "a firewall rule in the output path dropped or rejected it",
    errno.EACCES: "refused by a firewall reject (administratively prohibited)",
    errno.EHOSTUNREACH: "refused by a firewall reject, or no neighbour answered",
    errno.ECONNREFUSED: "a reset or port unreachable from this host: the lock's reject",
    errno.ENETUNREACH: "no route",
    errno.ENOBUFS: "dropped at the interface: the lock's egress chain, or a full queue",
    errno.EADDRNOTAVAIL: "no source address",
    errno.ENODEV: "no such interface",
    errno.ENXIO: "no such interface",
}


# Errors a socket reports when an ICMP error or a reset came back, wherever from.
_ANSWERED_ERRORS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH}


class Outcome(StrEnum):
    BLOCKED = "blocked"
    LEAK = "LEAK"
    TUNNEL = "tunnel"  # into the tunnel: not a leak
    UNTESTED = "untested"  # the probe could not be sent (no socket): proves nothing
    # Sent without refusal, no answer, and no capture to tell whether it left: not counted as
    # blocked (the run exits 1), since a probe that got out looks exactly like this.
    UNPROVEN = "LEAK?"


@dataclass(frozen=True)
class Reply:
    kind: ReplyKind
    source: str
    interface: str | None  # None: read from the probe's socket, the interface unknown
    code: int = 0

    def describe(self, family: int) -> str:
        what = str(self.kind)
        if self.kind is ReplyKind.UNREACHABLE:
            what = f"ICMP {UNREACHABLE_CODES.get((family, self.code), f'unreachable code {self.code}')}"
        on = f" on {self.interface}" if self.interface else ""
        return f"{what} from {self.source}{on}"


@dataclass(frozen=True)
class Evidence:
    """What was seen of one probe. ``send_error``: the errno of the send or connect (None: it
    went); ``setup_error``: why no socket could be made (then nothing was sent)."""

    send_error: int | None = None
    left_via: tuple[str, ...] = ()
    replies: tuple[Reply, ...] = ()
    captured: bool = True  # the capture ran (and dropped nothing)
    routed_via: str | None = None  # the interface the routing table picks for an unbound probe
    setup_error: str | None = None


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    how: str

    @property
    def leaked(self) -> bool:
        return self.outcome is Outcome.LEAK


# Which reply tells the most: an answer from the target, then the router's.
_PREFERENCE = (
    ReplyKind.DNS_ANSWER,
    ReplyKind.UDP_ANSWER,
    ReplyKind.SYN_ACK,
    ReplyKind.ECHO_REPLY,
    ReplyKind.RESET,
    ReplyKind.TIME_EXCEEDED,
    ReplyKind.UNREACHABLE,
)


def error_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def judge(probe: Probe, evidence: Evidence, tunnel: str) -> Verdict:
    """The verdict on ``probe`` (see the module docstring for the order of evidence)."""
    if evidence.setup_error:
        return Verdict(Outcome.UNTESTED, f"not sent: {evidence.setup_error}")
    route = probe.interface or evidence.routed_via

    def outside(interface: str | None) -> bool:
        where = interface or route
        return where != tunnel

    answers = sorted(
        (r for r in evidence.replies if outside(r.interface)), key=lambda r: _PREFERENCE.index(r.kind)
    )
    if answers:
        return Verdict(Outcome.LEAK, answers[0].describe(probe.family))
    left = [i for i in evidence.left_via if i != tunnel]
    if left:
        return Verdict(Outcome.LEAK, f"seen leaving {', '.join(sorted(set(left)))}, no answer")
    if tunnel in evidence.left_via or evidence.replies:
        return Verdict(Outcome.TUNNEL, f"went into the tunnel {tunnel}")
    if evidence.send_error is not None:
        name = error_name(evidence.send_error)
        meaning = REFUSALS.get(evidence.send_error, os.strerror(evidence.send_error).lower())
        if not evidence.captured and evidence.send_error in _ANSWERED_ERRORS:
            meaning += "; without the capture, an answer from the first hop would look the same"
        return Verdict(Outcome.BLOCKED, f"refused by the kernel: {name} ({meaning})")
    if evidence.captured:
        return Verdict(Outcome.BLOCKED, "not seen leaving any interface, no answer")
    return Verdict(
        Outcome.UNPROVEN,
        "sent, nothing refused it, no answer: without the capture this is how a probe that left "
        "looks too (the lock's input chain drops the first hop's answer)",
    )


def sort_captured(
    frames: Iterable[tuple[str, bool, bytes]], keys: Iterable[tuple[int, ProbeKey]]
) -> dict[int, tuple[list[str], list[Reply]]]:
    """Which captured packets belong to which probe: for each probe's index, the interfaces it was
    seen leaving by and the replies seen arriving. ``frames``: (interface, outgoing, IP packet)."""
    by_local: dict[tuple[int, str, int], list[tuple[int, ProbeKey]]] = {}
    for index, key in keys:
        by_local.setdefault((key.family, key.transport, key.local), []).append((index, key))
    out: dict[int, tuple[list[str], list[Reply]]] = {}
    for interface, outgoing, data in frames:
        packet = parse(data)
        if packet is None:
            continue
        # The packet the probe was, as sent or as quoted in an ICMP error, carries its local
        # port (or echo identifier) as the source; a direct answer carries it as the destination.
        about = packet if outgoing or packet.quoted is None else packet.quoted
        local = about.sport if outgoing or packet.quoted is not None or packet.icmp_type >= 0 else about.dport
        transport = _TRANSPORTS.get(about.proto)
        if transport is None:
            continue
        for index, key in by_local.get((about.family, transport, local), ()):
            left, replies = out.setdefault(index, ([], []))
            if outgoing:
                if is_probe(packet, key):
                    left.append(interface)
                continue
            said = reply_to(packet, key)
            if said is not None:
                replies.append(Reply(said[0], str(packet.src), interface, said[1]))
    return out


_TRANSPORTS = {PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmp", PROTO_UDP: "udp", PROTO_TCP: "tcp"}
