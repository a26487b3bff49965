"""Required port forwarding in the lab (issue #26): a server that forwards no port is left, the
port held before is asked for again.

Three servers, each with the lab's NAT-PMP gateway (supervisor/lab/natpmp.py); the second's
refuses. With ``[plugins.natpmp] required = true`` the daemon, after the first server dies, tries
the second, leaves it with the reason shown and ends on the third with a port that the internet
reaches and a real qBittorrent listens on; the ISP's observer counts every packet outside the
tunnel.
"""

from __future__ import annotations

import os
import sys

import pytest

from supervisor.lab import faults
from tests.lab.conftest import LabUnderTest
from tests.lab.seedbox import (
    QUICK,
    connect,
    gateway_state,
    listen,
    set_gateway,
    start_gateways,
    wait_until,
    write_config,
)
from tests.lab.torrent_clients import (
    QBT_PASSWORD,
    QBT_USER,
    QBT_WEBUI_PORT,
    listening_ports,
    start_qbittorrent,
    write_secret,
)

pytestmark = pytest.mark.lab(servers=3, per_test=True)

PYTHON = os.path.basename(os.path.realpath(sys.executable))


def natpmp_config(lab: LabUnderTest, required: bool, qbittorrent: bool = False) -> str:
    client = ""
    if qbittorrent:
        secret = write_secret(lab.lab, "qbt-password", QBT_PASSWORD)
        client = f"""
        [plugins.qbittorrent]
        url = "http://127.0.0.1:{QBT_WEBUI_PORT}"
        username = "{QBT_USER}"
        password_file = "{secret}"
        reassert_s = 1
        """
    return write_config(
        lab.lab,
        f"""
        [plugins]
        enabled = ["natpmp"{', "qbittorrent"' if qbittorrent else ""}]

        [plugins.natpmp]
        lifetime_s = 4
        tries = 2
        required = {"true" if required else "false"}
        listeners = ["{PYTHON}"]
        """
        + client,
    )


def test_with_required_forwarding_a_server_without_a_port_is_left_for_one_with_a_port(
    lab: LabUnderTest,
) -> None:
    start_gateways(lab.lab, {1: 40001, 2: 40002, 3: 40003})
    set_gateway(lab.lab, 2, "refuse", 40002)
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=natpmp_config(lab, required=True, qbittorrent=True)) as daemon:
        daemon.start()
        qbittorrent = start_qbittorrent(lab.lab)  # after the lock, as at boot
        on = lambda port: listening_ports(lab.lab, qbittorrent.pid, QBT_WEBUI_PORT) == {port}  # noqa: E731
        wait_until(lambda: on(40001), "qBittorrent on vpn1's port", 30)
        faults.kill_server(lab.lab, "1")
        status = daemon.wait_for(
            lambda s: s["server"] == "vpn3" and s["forwarded_port"] == 40003, 40, "vpn3 with its port"
        )
        assert gateway_state(lab.lab, 2)["requests"] > 0, "vpn2 was tried"
        unfit = status["plugins"]["natpmp"]["unfit"]
        assert unfit["server"] == "vpn2" and "refused" in unfit["reason"], unfit
        assert any("vpn2 is unfit" in line and "not authorized" in line for line in daemon.log_events()), (
            "the reason is in the log"
        )
        vpn3 = lab.lab.servers[2].endpoint_v4
        wait_until(lambda: on(40003), "qBittorrent on vpn3's port", 30)
        assert status["forwarded_inbound_packets"] == 0, "nobody has reached the new port yet"
        assert connect(lab.lab, "inet", vpn3, 40003) == "connected", "a peer reaches qBittorrent"
        # The lock counted the connection it let in (tunlock_forwarded_port_inbound_packets).
        status = daemon.wait_for(lambda s: s["forwarded_inbound_packets"] == 1, 10, "the count")
        assert status["lock"]["inbound"] == {"40003/tcp": 1, "40003/udp": 0}
        assert daemon.stop() == 0
    leaks = lab.observer.leaks(since=mark)
    assert not leaks, f"the ISP saw {len(leaks)} packets outside the tunnel"


def test_when_no_server_forwards_a_port_the_tunnel_stays_up_and_the_status_says_so(
    lab: LabUnderTest,
) -> None:
    start_gateways(lab.lab, {})
    for index in (1, 2, 3):
        set_gateway(lab.lab, index, "refuse", 40000 + index)
    mark = lab.observer.mark()
    with lab.daemon(env=QUICK, config=natpmp_config(lab, required=True)) as daemon:
        daemon.start()
        status = daemon.wait_for(
            lambda s: "no server forwards a port" in (s["reason"] or ""), 40, "the status saying so"
        )
        assert status["state"] == "connected" and status["server"] == "vpn3"
        assert all(gateway_state(lab.lab, i)["requests"] > 0 for i in (1, 2, 3)), "each was tried"
        assert daemon.stop() == 0
    leaks = lab.observer.leaks(since=mark)
    assert not leaks, f"the ISP saw {len(leaks)} packets outside the tunnel"


def test_a_reconnect_keeps_the_port_where_the_gateway_allows_it(lab: LabUnderTest) -> None:
    start_gateways(lab.lab, {1: 40001})
    listen(lab.lab, 40001)
    with lab.daemon(env=QUICK, config=natpmp_config(lab, required=False)) as daemon:
        daemon.start()
        daemon.wait_for(lambda s: s["forwarded_port"] == 40001, what="the first port")
        # From now on the gateway would hand out 40009, unless asked for a port it can give.
        set_gateway(lab.lab, 1, "ok", 40009, suggested=True)
        before = daemon.status()
        assert before is not None
        asked = len(gateway_state(lab.lab, 1)["maps"])
        daemon.ask("reconnect")
        status = daemon.wait_for(
            lambda s: s["state"] == "connected" and s["since"] > before["since"] and s["forwarded_port"],
            30,
            "the reconnect's port",
        )
        assert status["forwarded_port"] == 40001, "the port held before, asked for and given back"
        assert status["plugins"]["natpmp"]["port_changed"] is False
        assert status["plugins"]["natpmp"]["previous_port"] == 40001
        new_asks = [m["suggested"] for m in gateway_state(lab.lab, 1)["maps"][asked:] if m["op"] == 1]
        assert new_asks and set(new_asks) == {40001}, new_asks
        vpn1 = lab.lab.servers[0].endpoint_v4
        assert connect(lab.lab, "inet", vpn1, 40001) == "seedbox 40001"
        assert daemon.stop() == 0
