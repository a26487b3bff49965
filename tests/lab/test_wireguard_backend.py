"""The WireGuard backends against real WireGuard servers in a lab.

Every test runs for each backend in $TUNLOCK_TEST_BACKENDS (default: userspace, and kernel where
the kernel has WireGuard; elsewhere the kernel cases skip with the reason). The VM tier runs this
same module with TUNLOCK_TEST_BACKENDS=kernel. What is asserted is what a user would see: pings
answered through the tunnel, the server's own counters, the process and interface that keep (or
do not keep) running.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.lab.probes import describe
from supervisor.lock import nft as lock
from supervisor.lock.policy import LockPolicy
from supervisor.wireguard.backend import BackendDied, BackendRestarted, InterfaceTaken
from supervisor.wireguard.kernel import KernelBackend, KernelUnavailable, open_kernel_backend
from supervisor.wireguard.selection import kernel_available
from supervisor.wireguard.tunnel import TunnelSettings, open_tunnel
from supervisor.wireguard.uapi import UapiClient, UapiErrno
from supervisor.wireguard.userspace import open_userspace_backend

from .wg_agent import server_spec
from .wg_lab import (  # noqa: F401  (two of these are fixtures, registered by import)
    FWMARK,
    TABLE,
    TUNNEL_SERVER_V4,
    TUNNEL_SERVER_V6,
    EventLog,
    PingLog,
    WgLab,
    backend_params,
    ifindex,
    lab_skip_reason,
    logs_to_the_current_stdout,  # a fixture
    ping,
    ping_continuously,
    tunnel_settings,
    uapi_pid,
    wg_lab_fixture,  # the `lab` fixture, seen through WgLab
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.anyio,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=backend_params())
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(lab: WgLab, backend_kind: str) -> Iterator[TunnelSettings]:
    yield from tunnel_settings(lab, backend_kind, FWMARK, TABLE)


async def test_tunnel_carries_traffic_and_stats_move(lab: WgLab, settings: TunnelSettings) -> None:
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(lab.server(1))
        server_rx_before = lab.vpn[0].rx_bytes()
        assert ping(TUNNEL_SERVER_V4) == 3
        assert ping(TUNNEL_SERVER_V6) == 3
        first = await tunnel.stats()
        assert ping(TUNNEL_SERVER_V4, count=5) == 5
        second = await tunnel.stats()

        assert lab.vpn[0].rx_bytes() > server_rx_before  # the server itself received our traffic
        assert first.public_key == lab.vpn[0].public_key
        assert first.endpoint == lab.vpn[0].endpoint
        assert first.fwmark == FWMARK
        assert first.handshake_age_s is not None and first.handshake_age_s < 60
        assert second.rx_bytes > first.rx_bytes and second.tx_bytes > first.tx_bytes
        await tunnel.close()
    with pytest.raises(OSError):
        ifindex(settings.ifname)  # closed without keep_interface: the interface is gone


async def test_peer_swap_under_continuous_ping(lab: WgLab, settings: TunnelSettings) -> None:
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(lab.server(1))
        index = ifindex(settings.ifname)
        log = PingLog()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ping_continuously, str(TUNNEL_SERVER_V4), settings.ifname, 0.01, log)
            with anyio.fail_after(5):
                while not log.answered:
                    await anyio.sleep(0.01)
            vpn2_rx = lab.vpn[1].rx_bytes()
            swap_started = time.monotonic()
            await tunnel.connect(lab.server(2))
            swapped = time.monotonic()
            # A ping sent before the new peer was set may still be answered through server 1:
            # wait for one sent after it, which only server 2 can answer.
            with anyio.fail_after(5):
                while log.first_answer_sent_after(swapped) is None:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        outage = log.first_answer_sent_after(swap_started)
        assert outage is not None
        kind = tunnel.backend.kind
        print(f"peer swap ({kind}): first answer {outage * 1000:.0f} ms after the swap started")

        stats = await tunnel.stats()
        assert stats.public_key == lab.vpn[1].public_key and stats.endpoint == lab.vpn[1].endpoint
        assert lab.vpn[1].rx_bytes() > vpn2_rx  # the answers came through server 2
        assert ifindex(settings.ifname) == index  # the interface stayed; only the peer changed
        assert log.answered_between(swap_started, time.monotonic()) > 0
        await tunnel.close()


async def test_peer_swap_with_the_lock_in_place_leaks_nothing(lab: WgLab, settings: TunnelSettings) -> None:
    """The swap as the supervisor does it: lock endpoint swapped, then the peer; 0 leaks at the ISP."""
    observer = lab.observer
    assert observer is not None
    mark = observer.mark()
    assert ping("192.0.2.1", count=1) == 1  # no lock yet: the ISP sees it, the instrument works
    assert observer.leaks(since=mark), "the observer saw nothing without a lock"
    policy = LockPolicy(table="tunlock", tunnel_interface=settings.ifname, fwmark=FWMARK)
    policy = policy.with_servers([lab.server(1)])
    lock.apply(policy)
    try:
        mark = observer.mark()
        assert ping("192.0.2.1", count=1, wait=0.3) == 0  # locked: the ISP's router is out of reach
        async with open_tunnel(settings) as tunnel:
            await tunnel.connect(lab.server(1))
            log = PingLog()
            async with anyio.create_task_group() as tg:
                tg.start_soon(ping_continuously, str(TUNNEL_SERVER_V4), settings.ifname, 0.01, log)
                with anyio.fail_after(5):
                    while not log.answered:
                        await anyio.sleep(0.01)
                swap_started = time.monotonic()
                lock.swap_endpoints(policy, policy.endpoints, frozenset({lab.vpn[1].endpoint}))
                await tunnel.connect(lab.server(2))
                with anyio.fail_after(5):
                    while log.first_answer_sent_after(swap_started) is None:
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            outage = log.first_answer_sent_after(swap_started) or 0.0
            kind = tunnel.backend.kind
            print(f"peer swap with the lock ({kind}): first answer after {outage * 1000:.0f} ms")
            assert (await tunnel.stats()).endpoint == lab.vpn[1].endpoint
            await tunnel.close()
        leaks = observer.leaks(since=mark)
        assert leaks == [], f"leaked during the swap:\n{describe(leaks)}"
    finally:
        lock.remove("tunlock")


async def test_killed_wireguard_go_is_noticed_and_restarted(
    lab: WgLab, settings: TunnelSettings, backend_kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend_kind != "userspace":
        pytest.skip("only wireguard-go is a process that can die")
    events = EventLog()
    async with open_tunnel(settings, report=events) as tunnel:
        await tunnel.connect(lab.server(1))
        first_pid = uapi_pid(settings.ifname)
        assert first_pid is not None and ping(TUNNEL_SERVER_V4) == 3

        os.kill(first_pid, signal.SIGKILL)
        died = await events.wait_for(BackendDied)
        await events.wait_for(BackendRestarted)

        assert "SIGKILL" in died.reason  # type: ignore[attr-defined]
        new_pid = uapi_pid(settings.ifname)
        assert new_pid not in (None, first_pid)
        # The new interface got its peer, addresses and routes back: traffic flows again.
        assert ping(TUNNEL_SERVER_V4) == 3
        assert (await tunnel.stats()).public_key == lab.vpn[0].public_key
        await tunnel.close()
    assert uapi_pid(settings.ifname) is None
    # Start, death, restart and re-configuration were all logged, and no log line holds the key.
    output = "".join(capsys.readouterr())
    assert "wireguard-go died" in output and "wireguard-go restarted" in output
    key = lab.client_private
    assert key not in output and base64.b64decode(key).hex() not in output


async def test_a_deleted_interface_comes_back_on_reconnect(
    lab: WgLab, settings: TunnelSettings, backend_kind: str
) -> None:
    events = EventLog()
    async with open_tunnel(settings, report=events) as tunnel:
        await tunnel.connect(lab.server(1))
        subprocess.run(["ip", "link", "del", settings.ifname], check=True)
        # What the runtime does when the monitor reports the link gone; for wireguard-go this
        # races with the backend's own restart, and both must end in one working tunnel.
        await tunnel.connect(lab.server(1))
        # Once connect returned the race is decided: either the backend saw wireguard-go die
        # first (BackendDied reported, BackendRestarted follows once connect let go of the
        # tunnel), or the reconnect replaced the dying process first, and there is no death left
        # to report. Asserting the first outcome alone failed whenever the reconnect won.
        restarted_itself = bool(events.events)
        assert ping(TUNNEL_SERVER_V4) == 3
        assert await tunnel.routing_missing() == []
        if backend_kind == "userspace" and restarted_itself:
            await events.wait_for(BackendRestarted)
            assert [type(e).__name__ for e in events.events] == ["BackendDied", "BackendRestarted"]
            assert ping(TUNNEL_SERVER_V4) == 3
        else:
            assert events.events == [], "nothing died that the reconnect did not replace"
        await tunnel.close()


async def test_adoption_after_sigkill_does_not_interrupt_traffic(
    lab: WgLab, settings: TunnelSettings
) -> None:
    spec = {
        "ifname": settings.ifname,
        "fwmark": settings.fwmark,
        "route_table": settings.route_table,
        "backend": settings.backend,
        "resolv_conf": str(settings.resolv_conf),
        "state_dir": str(settings.state_dir),
        "server": server_spec(lab.server(1)),
    }
    # The stand-in daemon runs in our namespace (it inherits this thread's), in our session.
    agent = subprocess.Popen(
        [sys.executable, "-m", "tests.lab.wg_agent"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        agent.stdin.write(json.dumps(spec))  # type: ignore[union-attr]
        agent.stdin.close()  # type: ignore[union-attr]
        assert agent.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        wg_pid = uapi_pid(settings.ifname)
        index = ifindex(settings.ifname)
        log = PingLog()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ping_continuously, str(TUNNEL_SERVER_V4), settings.ifname, 0.02, log)
            with anyio.fail_after(5):
                while not log.answered:  # the tunnel carries the ping before the kill
                    await anyio.sleep(0.01)
            killed_at = time.monotonic()
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=10)
            async with open_tunnel(settings) as tunnel:
                adopted = await tunnel.adopt([lab.server(2), lab.server(1)])
                adopted_at = time.monotonic()
                await anyio.sleep(0.5)  # the window in which no ping may be lost, not a wait
                end = time.monotonic()
                tg.cancel_scope.cancel()
                assert adopted is not None and adopted.name == "vpn1"
                assert await tunnel.routing_missing() == []
                assert (uapi_pid(settings.ifname), ifindex(settings.ifname)) == (wg_pid, index)
                await tunnel.close()
        sent_in_window = [seq for seq, at in log.sent.items() if killed_at <= at <= end - 0.2]
        lost = [seq for seq in sent_in_window if seq not in log.answered]
        print(f"adoption: {(adopted_at - killed_at) * 1000:.0f} ms from SIGKILL to adopted, lost {len(lost)}")
        assert sent_in_window and lost == []  # not one ping lost: the tunnel never went down
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)


async def test_adoption_keeps_the_same_process_and_interface(
    lab: WgLab, settings: TunnelSettings, backend_kind: str
) -> None:
    async with open_tunnel(settings) as tunnel:
        await tunnel.connect(lab.server(1))
        pid, index = uapi_pid(settings.ifname), ifindex(settings.ifname)
        before = await tunnel.stats()
    # Left without close(): as after a crash. A new tunnel object adopts it unchanged.
    async with open_tunnel(settings) as tunnel:
        assert await tunnel.adopt([lab.server(1)]) == lab.server(1)
        after = await tunnel.stats()
        assert (uapi_pid(settings.ifname), ifindex(settings.ifname)) == (pid, index)
        assert after.listen_port == before.listen_port and after.rx_bytes >= before.rx_bytes
        assert ping(TUNNEL_SERVER_V4) == 3
        await tunnel.close()


async def test_uapi_round_trip_against_wireguard_go(
    lab: WgLab, settings: TunnelSettings, backend_kind: str
) -> None:
    if backend_kind != "userspace":
        pytest.skip("the UAPI is wireguard-go's")
    async with open_tunnel(settings) as tunnel:
        server = lab.server(1, keepalive=25)
        await tunnel.connect(server)
        client = UapiClient(settings.ifname)
        device = await client.get()
        assert device.private_key == server.private_key
        assert device.fwmark == FWMARK
        (peer,) = device.peers
        assert peer.public_key == server.peer.public_key and peer.endpoint == server.endpoint
        assert set(peer.allowed_ips) == set(server.peer.allowed_ips)
        assert peer.persistent_keepalive == 25

        await client.set(b"set=1\nlisten_port=40123\n\n")
        assert (await client.get()).listen_port == 40123
        with pytest.raises(UapiErrno) as refused:
            await client.set(b"set=1\nlisten_port=not-a-port\n\n")
        assert refused.value.code == 22  # EINVAL, as wireguard-go answers errno=-22
        await client.remove_peers()
        assert (await client.get()).peers == ()
        await tunnel.close()


async def test_interface_name_served_from_another_namespace_is_not_adopted(
    lab: WgLab, settings: TunnelSettings, backend_kind: str
) -> None:
    if backend_kind != "userspace":
        pytest.skip("the shared UAPI socket directory is wireguard-go's")
    taken = lab.vpn[0].ifname  # served by the server's wireguard-go, in the server's namespace
    async with open_userspace_backend(taken) as backend:
        with pytest.raises(InterfaceTaken, match="another network namespace"):
            await backend.ensure_interface()
    assert lab.vpn[0].pid is not None  # and it was left alone


async def test_kernel_backend_link_handling_works_without_the_module(
    lab: WgLab, settings: TunnelSettings
) -> None:
    """The rtnetlink half of the kernel backend, which needs no WireGuard module to run."""
    backend = KernelBackend(settings.ifname)  # no netlink socket: that needs the module
    assert await backend.adopt() is False  # no link of that name
    subprocess.run(["ip", "link", "add", settings.ifname, "type", "bridge"], check=True)
    with pytest.raises(InterfaceTaken, match="is a 'bridge' link, not WireGuard"):
        await backend.adopt()
    await backend.close(keep_interface=False)  # deletes the link by name
    with pytest.raises(OSError):
        ifindex(settings.ifname)
    if not await kernel_available():
        with pytest.raises(KernelUnavailable, match="cannot create wireguard links"):
            await backend.ensure_interface()
        with pytest.raises(KernelUnavailable, match="modprobe wireguard"):
            async with open_kernel_backend(settings.ifname):
                pass
