"""Tunnel plumbing in the lab: addresses and MTU, wg-quick-style policy routing, and DNS.

What is checked is what the kernel decides (``ip route get``: where would a packet go, with and
without the tunnel's fwmark) and what a program sees (pings answered, resolv.conf), before and
after the tunnel is closed. Parametrized over the backends like the backend tests.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from ipaddress import ip_interface
from pathlib import Path

import msgspec
import pytest
from pyroute2 import AsyncIPRoute

from supervisor.net.routes import FullTunnelRouting
from supervisor.safety import current_lab_namespace
from supervisor.wireguard.tunnel import TunnelSettings, open_tunnel

from .wg_lab import (  # noqa: F401  (two of these are fixtures, registered by import)
    FWMARK,
    ORIGINAL_RESOLV_CONF,
    PHYSICAL,
    TABLE,
    TUNNEL_SERVER_V4,
    WgLab,
    backend_params,
    ifindex,
    lab_skip_reason,
    logs_to_the_current_stdout,  # a fixture
    ping,
    tunnel_settings,
    wg_lab_fixture,  # the `lab` fixture, seen through WgLab
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.anyio,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]


@pytest.fixture(params=backend_params())
def settings(lab: WgLab, request: pytest.FixtureRequest) -> Iterator[TunnelSettings]:
    yield from tunnel_settings(lab, request.param, FWMARK, TABLE)


def ip(*argv: str) -> str:
    """`ip` in the calling thread's namespace (the client's, inside a test)."""
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=True, timeout=10).stdout


def route_dev(*argv: str) -> str:
    """The device the kernel would send a packet out of (`ip route get ...`)."""
    words = ip("route", "get", *argv).split()
    return words[words.index("dev") + 1]


def our_rules(family: str) -> list[str]:
    return [line for line in ip(family, "rule").splitlines() if line.split(":")[0] in ("32760", "32761")]


def owned_rules() -> list[str]:
    """The rules of the tunnel's own prefixes and addresses (priority 32759), without it."""
    return [
        line.split(":", 1)[1].strip() for line in ip("-4", "rule").splitlines() if line.startswith("32759:")
    ]


async def test_everything_but_wireguard_goes_into_the_tunnel(lab: WgLab, settings: TunnelSettings) -> None:
    ifname = settings.ifname
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(lab.server(1))
        assert route_dev("203.0.113.7") == ifname
        assert route_dev("2001:db8:ffff::7") == ifname
        # WireGuard's own UDP carries the fwmark: it takes the main table, out of the physical link.
        assert route_dev("203.0.113.7", "mark", str(FWMARK)) == PHYSICAL
        assert route_dev("2001:db8:ffff::7", "mark", str(FWMARK)) == PHYSICAL
        # suppress_prefixlength 0: the main table's specific routes (the link's subnet) still win.
        assert route_dev("192.0.2.1") == PHYSICAL
        assert ping(TUNNEL_SERVER_V4) == 3  # no -I: routed into the tunnel by the policy alone
        # No IPv6 link-local address: the kernel would send router solicitations with it, into
        # the tunnel, for good (each woke an idle daemon).
        assert "scope link" not in ip("-6", "addr", "show", "dev", ifname)
        assert "fd00:99::2/128" in ip("-6", "addr", "show", "dev", ifname)
        for family in ("-4", "-6"):
            rules = our_rules(family)
            assert len(rules) == 2
            assert "lookup main suppress_prefixlength 0" in rules[0]
            assert f"not from all fwmark {FWMARK:#x} lookup {TABLE}" in rules[1]
        assert settings.resolv_conf.read_text().endswith("nameserver 10.99.0.1\n")
        await tunnel.close()

    # Closed: the host routes as before, its resolv.conf is its own again, the interface is gone.
    assert our_rules("-4") == [] and our_rules("-6") == [] and owned_rules() == []
    assert ip("route", "show", "table", str(TABLE)) == ""
    assert route_dev("203.0.113.7") == PHYSICAL
    assert settings.resolv_conf.read_text() == ORIGINAL_RESOLV_CONF
    with pytest.raises(OSError):
        ifindex(ifname)


@pytest.fixture
def ipv6_off_for_new_links(settings: TunnelSettings) -> Iterator[None]:
    """New interfaces in the client's namespace (where ``settings`` put this thread) start with
    IPv6 disabled, as on a host that turns it off to keep IPv6 from leaking
    (net.ipv6.conf.default.disable_ipv6)."""
    assert current_lab_namespace() is not None, "a lab namespace's sysctl, never this machine's"
    flag = Path("/proc/sys/net/ipv6/conf/default/disable_ipv6")
    before = flag.read_text()
    flag.write_text("1\n")
    try:
        yield
    finally:
        flag.write_text(before)


async def test_with_ipv6_off_on_the_interface_a_dual_stack_server_connects_over_ipv4(
    lab: WgLab, settings: TunnelSettings, ipv6_off_for_new_links: None
) -> None:
    # The server gives the client fd00:99::2/128 too; an interface with IPv6 disabled refuses
    # IPv6 addresses, and the connect failed on it where it should carry IPv4 alone.
    ifname = settings.ifname
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(lab.server(1))
        assert ping(TUNNEL_SERVER_V4) == 3
        assert "inet 10.99.0.2/32" in ip("-4", "addr", "show", "dev", ifname)
        assert ip("-6", "addr", "show", "dev", ifname).strip() == ""
        assert our_rules("-6") == [] and len(our_rules("-4")) == 2
        await tunnel.close()


async def test_routing_is_idempotent_and_repairs_what_is_missing(
    lab: WgLab, settings: TunnelSettings
) -> None:
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(lab.server(1))
        routing = FullTunnelRouting(settings.ifname, TABLE, FWMARK)
        async with AsyncIPRoute() as ipr:
            await routing.apply(ipr)  # a second time, as an adopting daemon does
            assert len(our_rules("-4")) == 2 and len(our_rules("-6")) == 2
            assert await routing.missing(ipr) == []

            ip("-4", "rule", "del", "priority", "32761")
            ip("-6", "route", "del", "default", "table", str(TABLE))
            assert sorted(await routing.missing(ipr)) == [
                "IPv6 default route in table 51820",
                "rule RuleSpec(family=4, priority=32761, table=51820, fwmark=51820, invert=True, "
                "suppress_prefixlength=None, dst=None, src=None)",
            ]
            await routing.apply(ipr)
            assert await routing.missing(ipr) == []
        assert route_dev("203.0.113.7") == settings.ifname
        await tunnel.close()


async def test_a_swap_changes_addresses_and_mtu_only_where_the_server_differs(
    lab: WgLab, settings: TunnelSettings
) -> None:
    plain = lab.server(1)
    other = msgspec.structs.replace(
        plain, name="vpn1-alt", addresses=(*plain.addresses, ip_interface("10.98.0.2/32")), mtu=1380
    )
    # Both share one peer (key and endpoint): the swaps keep it rather than set it again within
    # milliseconds, which the server would punish (see the next test).
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(plain)
        index = ifindex(settings.ifname)
        assert "mtu 1420" in ip("link", "show", settings.ifname)

        await tunnel.connect(other)
        shown = ip("addr", "show", settings.ifname)
        assert "10.98.0.2/32" in shown and all(str(a) in shown for a in plain.addresses)
        assert "mtu 1380" in shown
        # The tunnel's own prefixes and addresses are routed into it ahead of the main table.
        owned = owned_rules()
        assert f"from all to 10.98.0.2 lookup {TABLE}" in owned
        assert f"from 10.98.0.2 lookup {TABLE}" in owned

        await tunnel.connect(plain)
        shown = ip("addr", "show", settings.ifname)
        assert "10.98.0.2" not in shown and "mtu 1420" in shown
        assert "10.98.0.2" not in " ".join(owned_rules())  # the earlier server's rules are gone
        assert f"from all to {TUNNEL_SERVER_V4} lookup {TABLE}" in owned_rules()  # its resolver
        assert ifindex(settings.ifname) == index  # the same interface throughout
        assert ping(TUNNEL_SERVER_V4) == 3
        await tunnel.close()


async def test_handshakes_restarted_in_quick_succession_still_connect_at_once(
    lab: WgLab, settings: TunnelSettings
) -> None:
    """The rule: a WireGuard server drops an initiation that follows the last one it accepted
    from the same peer within 20 ms (or carries a timestamp in the same 16.8 ms grain), and the
    initiator sends its next one only 5 s later. A peer set anew sends its initiation with its
    first packet; three of them set back to back, each with a packet behind it, must still leave
    a tunnel that answers within a second or two, not after 5 s."""
    server = lab.server(1)
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(server)
        assert ping(TUNNEL_SERVER_V4) == 3
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for _ in range(3):
                await tunnel.restart_handshake(server)
                udp.sendto(b"initiate", (str(TUNNEL_SERVER_V4), 9))  # the new peer's first packet
        assert ping(TUNNEL_SERVER_V4, count=1, wait=2) == 1
        await tunnel.close()


async def test_disconnect_keeps_the_routes_so_nothing_leaves_outside_the_tunnel(
    lab: WgLab, settings: TunnelSettings
) -> None:
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(lab.server(1))
        await tunnel.disconnect()
        assert (await tunnel.stats()).public_key is None
        assert route_dev("203.0.113.7") == settings.ifname  # still into the (now peerless) tunnel
        assert ping(TUNNEL_SERVER_V4, count=2, wait=0.3) == 0
        await tunnel.connect(lab.server(1))
        assert ping(TUNNEL_SERVER_V4) == 3
        await tunnel.close()
