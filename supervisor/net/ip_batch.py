"""The tunnel's plumbing (``TunnelPlan``) rendered as ``ip -batch`` runs of iproute2, one per family.

The early start (issue #27) sets the tunnel up before the daemon is imported, and the daemon
then adopts it (``Tunnel.adopt`` finds the rules and routes by content and completes what is
missing). Pure: the caller runs each ``IpBatch.argv`` with its ``IpBatch.stdin`` on the standard
input, in the namespace the tunnel lives in.

**Why iproute2, and not netlink messages of our own.** ``ip`` is a C program tunlock already
depends on (the lock reads links and routes with ``ip -j``; the image and ``install-server``
install it). Its runs apply the whole plan in a few milliseconds, as wg-quick does, where
the daemon's path first imports pyroute2 (~46 ms) and its async stack. Writing the rtnetlink
messages by hand (links, addresses, routes, rules and their attributes) would be a second
netlink library to keep right beside pyroute2, for one call at start.

**One run per family.** ``ip`` reads no family from a rule's text (``ip rule`` is IPv4 unless
told ``-6``, whatever address it names), and ``-4``/``-6`` is given once per run, not per line.
So there are two runs, IPv4's then IPv6's, each in the order the daemon applies the plan: the
link's MTU, addresses and ``up`` (in the first run; IPv6's addresses, which ``ip -4`` refuses, in
IPv6's), the administrator's reply rule, the table's default route, then the rules with the
catch-all last. Within each family the administrator's rule is thus in before any tunnel rule,
and the catch-all never without what comes before it. tests/lab/test_ip_batch.py checks in the
kernel that the result is the very links, addresses, rules and routes the daemon makes.

**For a namespace without our rules.** ``rule add`` of a rule that is already there fails (the
kernel refuses a duplicate; ``ip rule`` has no ``replace``) and ``ip`` stops at that line: the
caller first clears what an earlier daemon may have left (:func:`ip_undo_batches` with ``admin``,
nothing at a boot), runs the batches in order and stops at the first that fails.
``ip`` sets no sysctl: where IPv4 is routed, the caller also calls
``supervisor.net.routing_plan.enable_src_valid_mark``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from supervisor.net.routing_plan import ROUTE_PROTOCOL, ROUTE_SCOPE, DefaultRoute, RuleSpec, TunnelPlan

# What the configuration accepts as an interface name; anything else (a space, a newline) would
# change the batch's lines, so it is refused here too.
_IFNAME = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")


@dataclass(frozen=True)
class IpBatch:
    """One ``ip`` run: its arguments and the commands for its standard input."""

    argv: tuple[str, ...]
    stdin: str


def ip_batches(plan: TunnelPlan) -> list[IpBatch]:
    """The ``ip`` runs that make ``plan`` in a namespace that has none of it yet, in order."""
    link = plan.link
    for ifname in (link.ifname, plan.routing.ifname):
        if not _IFNAME.match(ifname):
            raise ValueError(f"not an interface name: {ifname!r}")
    dev = f"dev {link.ifname}"
    families = sorted({*plan.admin.families, *plan.routing.families, *(a.version for a in link.addresses)})
    batches: list[IpBatch] = []
    for family in families:
        first = not batches
        lines = [
            *([f"link set {dev} mtu {link.mtu}"] if first else []),
            *(
                f"address add {address} {dev}" + (" nodad" if family == 6 else "")
                for address in sorted(link.addresses, key=str)  # configure_link's order
                if address.version == family
            ),
            *([f"link set {dev} up"] if first else []),
            *(_rule_line(rule) for rule in plan.admin.rules() if rule.family == family),
            *(_route_line(route) for route in plan.routing.default_routes() if route.family == family),
            *(_rule_line(rule) for rule in plan.routing.rules() if rule.family == family),
        ]
        batches.append(IpBatch(("ip", f"-{family}", "-batch", "-"), "".join(f"{line}\n" for line in lines)))
    return batches


def ip_undo_batches(plan: TunnelPlan, *, admin: bool = False) -> list[IpBatch]:
    """The ``ip`` runs that take ``plan``'s tunnel rules away (the catch-all first), and with
    ``admin`` the administrator's reply rule after them; each run goes on past a rule that is not
    there (``-force``). What names the interface (routes, addresses) goes with it.

    Without ``admin`` this undoes a failed start, leaving the administrator's rule as the daemon
    leaves it when it closes the tunnel (supervisor/net/admin_route.py). With it, it clears the
    way for :func:`ip_batches` where an earlier daemon left its rules (a stopped daemon leaves the
    administrator's; one that died with its interface, all of them): ``rule add`` of a rule that
    is there fails."""
    batches: list[IpBatch] = []
    for family in sorted({*plan.routing.families, *(plan.admin.families if admin else ())}):
        rules = [*reversed(plan.routing.rules()), *(plan.admin.rules() if admin else ())]
        lines = "".join(f"{_rule_line(rule, 'del')}\n" for rule in rules if rule.family == family)
        batches.append(IpBatch(("ip", f"-{family}", "-force", "-batch", "-"), lines))
    return batches


def _route_line(route: DefaultRoute) -> str:
    where = "unreachable default" if route.ifname is None else f"default dev {route.ifname}"
    return f"route replace {where} table {route.table} proto {ROUTE_PROTOCOL} scope {ROUTE_SCOPE}"


def _rule_line(rule: RuleSpec, verb: str = "add") -> str:
    words = ["rule", verb]
    if rule.src is not None:
        words += ["from", str(rule.src)]
    if rule.dst is not None:
        words += ["to", str(rule.dst)]
    words += ["priority", str(rule.priority)]
    if rule.invert:
        words.append("not")
    if rule.fwmark is not None:
        words += ["fwmark", f"{rule.fwmark:#x}/0xffffffff"]
    if rule.suppress_prefixlength is not None:
        words += ["suppress_prefixlength", str(rule.suppress_prefixlength)]
    words += ["lookup", str(rule.table)]
    return " ".join(words)
