"""The early start's ``ip -batch`` runs make exactly what the daemon makes, so the daemon adopts it.

The early start (issue #27) renders the tunnel's plan (``supervisor.net.routing_plan``) for one
``ip -batch`` run per family (``supervisor.net.ip_batch``) before the daemon is imported; the
daemon then takes the tunnel over with its pyroute2 path, which finds rules and routes by content.
Here, in the lab client, on a wireguard-go interface as the early start makes it (no peer is
needed: what is checked is rtnetlink's objects): the batches run exactly as rendered; then the
daemon's checks find nothing missing, its apply adds and changes nothing, its remove leaves no
rule of ours behind; and the daemon's path on a fresh interface, from nothing, makes the very same
link, addresses, rules and routes as the batches did.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import msgspec
import pytest
from pyroute2 import AsyncIPRoute

from supervisor.net.admin_route import AdminReplyRouting
from supervisor.net.ip_batch import ip_batches
from supervisor.net.links import configure_link
from supervisor.net.routes import FullTunnelRouting
from supervisor.net.routing_plan import ADMIN_RULE_PRIORITY, TunnelPlan, routed_families
from supervisor.safety import current_lab_namespace
from supervisor.servers import Server
from supervisor.wgquick import load_server
from supervisor.wireguard.tunnel import TunnelSettings
from supervisor.wireguard.uapi import UAPI_DIR

from .conftest import LabUnderTest
from .wg_lab import FWMARK, TABLE, lab_skip_reason

pytestmark = [
    pytest.mark.lab(servers=1),
    pytest.mark.anyio,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

# Ours: the administrator's reply rule and the full-tunnel rules (priority 32760 by default).
OUR_PRIORITIES = (ADMIN_RULE_PRIORITY, *range(32758, 32762))
_numbers = itertools.count(1)


def ip_in(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *argv], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def ip_json_in(ns: str, *argv: str) -> list[dict[str, Any]]:
    return json.loads(ip_in(ns, "-d", "-j", *argv) or "[]")


def our_rules(ns: str) -> list[dict[str, Any]]:
    return [
        rule
        for family in ("-4", "-6")
        for rule in ip_json_in(ns, family, "rule", "show")
        if rule.get("priority") in OUR_PRIORITIES
    ]


def kernel_state(ns: str, ifname: str) -> dict[str, Any]:
    """The link, its addresses, our rules and our table's routes as the kernel reports them, with
    what differs between two links of the same settings left out (index, MAC, link-local)."""
    (link,) = ip_json_in(ns, "link", "show", "dev", ifname)
    addresses = [
        {k: v for k, v in address.items() if k not in ("valid_life_time", "preferred_life_time")}
        for entry in ip_json_in(ns, "address", "show", "dev", ifname)
        for address in entry["addr_info"]
        if address.get("scope") != "link"
    ]
    return {
        "link": {"mtu": link["mtu"], "flags": sorted(link["flags"])},
        "addresses": sorted(addresses, key=str),
        "rules": our_rules(ns),
        "routes": [ip_json_in(ns, family, "route", "show", "table", str(TABLE)) for family in ("-4", "-6")],
    }


@pytest.fixture
def ns(lab: LabUnderTest) -> str:
    return lab.lab.ns("client")


@contextlib.contextmanager
def wireguard_go(ns: str, ifname: str) -> Iterator[None]:
    """A wireguard-go interface ``ifname`` in ``ns``, stopped (by its PID) afterwards."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],  # exec: the PID is wireguard-go's
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    socket_file = UAPI_DIR / f"{ifname}.sock"
    try:
        deadline = time.monotonic() + 10
        while not socket_file.exists():  # wireguard-go announces its interface by nothing else
            assert time.monotonic() < deadline and proc.poll() is None, "wireguard-go did not start"
            time.sleep(0.01)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        socket_file.unlink(missing_ok=True)


@pytest.fixture
def ifname(lab: LabUnderTest, ns: str) -> Iterator[str]:
    """A name of the test's own (unique on the machine: wireguard-go's sockets are shared), and
    nothing of ours left in the client afterwards."""
    name = f"{lab.lab.client_ifname}b{next(_numbers)}"
    try:
        yield name
    finally:
        subprocess.run(["ip", "-n", ns, "link", "del", name], capture_output=True)
        for family in ("-4", "-6"):
            for priority in OUR_PRIORITIES:
                deleted = 0
                while deleted == 0:  # one rule per call, until none is left
                    deleted = subprocess.run(
                        ["ip", "-n", ns, family, "rule", "del", "priority", str(priority)],
                        capture_output=True,
                    ).returncode
            subprocess.run(
                ["ip", "-n", ns, family, "route", "flush", "table", str(TABLE)], capture_output=True
            )


@pytest.fixture(params=["dual-stack", "ipv4-only"])
def server(lab: LabUnderTest, request: pytest.FixtureRequest) -> Server:
    plain = load_server(lab.lab.dir / "servers" / "vpn1.conf")  # 10.99.0.2/32, fd00:99::2/128
    assert plain.families == {4, 6}
    if request.param == "dual-stack":
        return plain
    return msgspec.structs.replace(
        plain,
        addresses=tuple(a for a in plain.addresses if a.version == 4),
        dns=tuple(d for d in plain.dns if d.version == 4),
        mtu=1380,
    )


async def test_the_daemon_adopts_what_the_batch_made_and_undoes_it(
    lab: LabUnderTest, ns: str, ifname: str, server: Server
) -> None:
    settings = TunnelSettings(
        ifname=ifname, fwmark=FWMARK, route_table=TABLE, owned_targets=(ip_address("10.98.0.7"),)
    )
    with lab.lab.inside("client"), contextlib.ExitStack() as tunnel:
        assert current_lab_namespace() == ns
        tunnel.enter_context(wireguard_go(ns, ifname))
        families = routed_families(ifname)
        assert families == (4, 6)
        for batch in ip_batches(TunnelPlan.for_server(settings, server, families)):
            subprocess.run(["ip", "netns", "exec", ns, *batch.argv], input=batch.stdin, text=True, check=True)
        made = kernel_state(ns, ifname)
        assert made["link"]["mtu"] == (server.mtu or 1420) and "UP" in made["link"]["flags"]
        made_addresses = {f"{a['local']}/{a['prefixlen']}" for a in made["addresses"]}
        assert made_addresses == {str(a) for a in server.addresses}
        unreachable = [r for r in made["routes"][1] if r.get("type") == "unreachable"]
        assert len(unreachable) == (0 if server.families == {4, 6} else 1)

        routing = FullTunnelRouting.for_server(settings, families, server)
        admin = AdminReplyRouting(families)
        async with AsyncIPRoute() as ipr:
            # Adoption: everything is found, and completing it changes nothing.
            assert await admin.missing(ipr) == []
            assert await routing.missing(ipr) == []
            await configure_link(ipr, ifname, server.addresses, server.mtu)
            await admin.apply(ipr)
            await routing.apply(ipr)
            assert kernel_state(ns, ifname) == made

            # Undo: no rule of ours and no route in our table is left.
            await routing.remove(ipr)
            await admin.remove(ipr)
            assert our_rules(ns) == []
            assert kernel_state(ns, ifname)["routes"] == [[], []]

        # The daemon's own path, from nothing on a fresh interface, makes exactly what the
        # batches made.
        tunnel.close()
        tunnel.enter_context(wireguard_go(ns, ifname))
        async with AsyncIPRoute() as ipr:
            await configure_link(ipr, ifname, server.addresses, server.mtu)
            await admin.apply(ipr)
            await routing.apply(ipr)
        assert kernel_state(ns, ifname) == made
