"""The tunnel's plumbing rendered for ``ip -batch`` runs (the early start, issue #27).

The lab test (tests/lab/test_ip_batch.py) proves the kernel ends up with exactly what the
daemon's pyroute2 path makes; these check the text: what is in it, in which order, and what never
is (a key).
"""

from __future__ import annotations

import subprocess
import sys
from ipaddress import ip_address, ip_network
from pathlib import Path

import msgspec
import pytest
from msgspec.structs import replace

from supervisor.net.ip_batch import ip_batches, ip_undo_batches
from supervisor.net.routes import FullTunnelRouting
from supervisor.net.routing_plan import ADMIN_MARK, TunnelPlan
from supervisor.servers import Server
from supervisor.wgquick import load_server
from supervisor.wireguard.tunnel import TunnelSettings

from .samples import PRESHARED_KEY, PRIVATE_KEY, VALID_SERVER

SETTINGS = TunnelSettings(
    ifname="tl0", fwmark=0xCA6C, route_table=51820, owned_targets=(ip_address("10.64.0.53"),)
)


@pytest.fixture
def dual_stack(tmp_path: Path) -> Server:
    (tmp_path / "vpn1.conf").write_text(VALID_SERVER)  # 10.64.1.2/32, fd00:64:1::2/128, DNS 10.64.1.1
    return load_server(tmp_path / "vpn1.conf")


@pytest.fixture
def ipv4_only(tmp_path: Path) -> Server:
    text = VALID_SERVER.replace("Address = 10.64.1.2/32, fd00:64:1::2/128", "Address = 10.64.1.2/32")
    (tmp_path / "v4.conf").write_text(text.replace("[Interface]", "[Interface]\nMTU = 1380"))
    return load_server(tmp_path / "v4.conf")


def runs(server: Server, families: tuple[int, ...] = (4, 6)) -> dict[str, list[str]]:
    """Each ``ip`` run's family option and its lines, in the order they are to run."""
    out: dict[str, list[str]] = {}
    for batch in ip_batches(TunnelPlan.for_server(SETTINGS, server, families)):
        assert batch.argv[0] == "ip" and batch.argv[2:] == ("-batch", "-")
        assert batch.stdin.endswith("\n")
        out[batch.argv[1]] = batch.stdin.splitlines()
    return out


def test_a_dual_stack_server_in_the_daemons_order(dual_stack: Server) -> None:
    assert list(runs(dual_stack).items()) == [
        (
            "-4",
            [
                # The link: MTU, exactly the server's addresses, up.
                "link set dev tl0 mtu 1420",
                "address add 10.64.1.2/32 dev tl0",
                "link set dev tl0 up",
                # The administrator's replies by the main table, before any tunnel rule.
                "rule add priority 32750 fwmark 0x746c0022/0xffffffff lookup 254",
                # The table's default: a static route of universe scope, as the daemon makes it.
                "route replace default dev tl0 table 51820 proto 4 scope 0",
                # WireGuard's own packets, what the tunnel owns (the configured target, its
                # resolver, its prefix) and what leaves from its address, then suppress, the
                # catch-all.
                "rule add priority 32758 fwmark 0xca6c/0xffffffff lookup 254",
                "rule add to 10.64.0.53/32 priority 32759 lookup 51820",
                "rule add to 10.64.1.1/32 priority 32759 lookup 51820",
                "rule add to 10.64.1.2/32 priority 32759 lookup 51820",
                "rule add from 10.64.1.2/32 priority 32759 lookup 51820",
                "rule add priority 32760 suppress_prefixlength 0 lookup 254",
                "rule add priority 32761 not fwmark 0xca6c/0xffffffff lookup 51820",
            ],
        ),
        (
            "-6",
            [
                "address add fd00:64:1::2/128 dev tl0 nodad",  # a tunnel has no neighbours: no DAD
                "rule add priority 32750 fwmark 0x746c0022/0xffffffff lookup 254",
                "route replace default dev tl0 table 51820 proto 4 scope 0",
                "rule add priority 32758 fwmark 0xca6c/0xffffffff lookup 254",
                "rule add to fd00:64:1::2/128 priority 32759 lookup 51820",
                "rule add from fd00:64:1::2/128 priority 32759 lookup 51820",
                "rule add priority 32760 suppress_prefixlength 0 lookup 254",
                "rule add priority 32761 not fwmark 0xca6c/0xffffffff lookup 51820",
            ],
        ),
    ]


def test_the_rules_are_the_daemons_rules_in_the_daemons_order(dual_stack: Server) -> None:
    """Rendered from the very RuleSpecs the pyroute2 path adds, one line each, in order."""
    routing = FullTunnelRouting.for_server(SETTINGS, (4, 6), dual_stack)
    for option, rendered in runs(dual_stack).items():
        family = int(option[1])
        rules = [line for line in rendered if line.startswith("rule")]
        admin, tunnel = rules[0], rules[1:]
        assert "0x746c0022" in admin
        ours = [rule for rule in routing.rules() if rule.family == family]
        assert len(tunnel) == len(ours)
        for rule, line in zip(ours, tunnel, strict=True):
            assert f"priority {rule.priority} " in line and line.endswith(f"lookup {rule.table}")
            assert (" not " in line) == rule.invert


def test_an_ipv4_only_server_gets_an_unreachable_ipv6_default(ipv4_only: Server) -> None:
    rendered = runs(ipv4_only)
    assert rendered["-4"][:3] == [
        "link set dev tl0 mtu 1380",
        "address add 10.64.1.2/32 dev tl0",
        "link set dev tl0 up",
    ]
    assert "route replace default dev tl0 table 51820 proto 4 scope 0" in rendered["-4"]
    # IPv6 still gets its rules: it is sent to the unreachable default, not out of the host.
    assert rendered["-6"] == [
        "rule add priority 32750 fwmark 0x746c0022/0xffffffff lookup 254",
        "route replace unreachable default table 51820 proto 4 scope 0",
        "rule add priority 32758 fwmark 0xca6c/0xffffffff lookup 254",
        "rule add priority 32760 suppress_prefixlength 0 lookup 254",
        "rule add priority 32761 not fwmark 0xca6c/0xffffffff lookup 51820",
    ]


def test_without_ipv6_on_the_interface_only_ipv4_is_routed(ipv4_only: Server) -> None:
    rendered = runs(ipv4_only, families=(4,))
    assert list(rendered) == ["-4"]
    assert rendered["-4"][-1] == "rule add priority 32761 not fwmark 0xca6c/0xffffffff lookup 51820"


def test_no_key_is_ever_part_of_the_batch(dual_stack: Server) -> None:
    text = "".join(
        " ".join(batch.argv) + batch.stdin
        for batch in ip_batches(TunnelPlan.for_server(SETTINGS, dual_stack, (4, 6)))
    )
    for key in (PRIVATE_KEY, PRESHARED_KEY, dual_stack.peer.public_key):
        assert key not in text and key[:12] not in text


def test_an_interface_name_that_would_change_the_lines_is_refused(dual_stack: Server) -> None:
    for ifname in ("tl0\nrule flush", "tl 0", "", "a" * 16):
        with pytest.raises(ValueError, match="not an interface name"):
            ip_batches(TunnelPlan.for_server(replace(SETTINGS, ifname=ifname), dual_stack, (4, 6)))


def test_the_plan_is_what_the_tunnel_routes(dual_stack: Server) -> None:
    """The tunnel's routing for a server: its prefixes, resolvers and targets owned, its
    addresses as sources, no unreachable family when it has both."""
    routing = FullTunnelRouting.for_server(SETTINGS, (4, 6), dual_stack)
    assert isinstance(routing, FullTunnelRouting)
    assert (routing.ifname, routing.table, routing.fwmark, routing.priority) == ("tl0", 51820, 0xCA6C, 32760)
    assert routing.owned == tuple(
        ip_network(n) for n in ("10.64.0.53/32", "10.64.1.1/32", "10.64.1.2/32", "fd00:64:1::2/128")
    )
    assert routing.sources == (ip_network("10.64.1.2/32"), ip_network("fd00:64:1::2/128"))
    assert routing.unreachable == ()
    bare = FullTunnelRouting.for_server(SETTINGS, (4, 6))
    assert bare.owned == bare.sources == bare.unreachable == ()


PROBE = """\
import sys
import supervisor.net.ip_batch, supervisor.net.routing_plan
heavy = ("pyroute2", "anyio", "structlog", "supervisor.log", "supervisor.config")
print(" ".join(name for name in heavy if name in sys.modules))
"""


def test_the_plan_and_its_rendering_import_without_the_daemons_stack() -> None:
    """The early start imports them before the daemon: none of the daemon's libraries may come
    along. Without site, as a fresh interpreter's own imports; msgspec, which the configuration
    loaded before (the plan's records are its Structs), is found where it is installed."""
    root = Path(__file__).resolve().parents[2]
    installed = Path(msgspec.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-S", "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": f"{root}:{installed}"},
    )
    assert result.stdout.split() == [], f"imported along with the plan: {result.stdout}"


def test_undoing_takes_the_tunnel_rules_away_catch_all_first_and_keeps_the_admin_rule(
    dual_stack: Server,
) -> None:
    plan = TunnelPlan.for_server(SETTINGS, dual_stack, (4, 6))
    added = {
        b.argv[1]: [line for line in b.stdin.splitlines() if line.startswith("rule add")]
        for b in ip_batches(plan)
    }
    undo = {b.argv[1]: (b.argv, b.stdin.splitlines()) for b in ip_undo_batches(plan)}
    for family, (argv, lines) in undo.items():
        assert argv == ("ip", family, "-force", "-batch", "-"), "goes on past a rule that is not there"
        tunnel_rules = [line for line in added[family] if "priority 32750" not in line]
        assert lines == [line.replace("rule add", "rule del") for line in reversed(tunnel_rules)]
        assert "not fwmark" in lines[0], "the catch-all goes first"
    # Clearing the way for a start also takes the administrator's rule (ip rule has no replace).
    cleared = {b.argv[1]: b.stdin.splitlines() for b in ip_undo_batches(plan, admin=True)}
    for family, lines in cleared.items():
        assert lines[-1] == f"rule del priority 32750 fwmark {ADMIN_MARK:#x}/0xffffffff lookup 254"
        assert lines[:-1] == undo[family][1]
