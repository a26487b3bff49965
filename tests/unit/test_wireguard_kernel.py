"""The kernel backend's netlink messages, built and parsed without the WireGuard module.

Each message is encoded to the bytes the kernel would receive and decoded back with pyroute2's
own WireGuard message class, so a wrong attribute name, type or nesting fails here rather than
only inside the VM tier.
"""

from __future__ import annotations

import base64
from ipaddress import ip_network
from socket import AF_INET, AF_INET6

import pytest
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGDEVICE_F_REPLACE_PEERS,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from supervisor.addresses import parse_endpoint
from supervisor.redact import Secret
from supervisor.servers import Peer
from supervisor.wireguard.backend import DeviceConfig
from supervisor.wireguard.kernel import (
    get_device_message,
    remove_peers_message,
    set_device_message,
    stats_from_messages,
)

PRIVATE = base64.b64encode(bytes(range(32))).decode()
PUBLIC = base64.b64encode(b"\x22" * 32).decode()
PSK = base64.b64encode(b"\x33" * 32).decode()


def round_trip(msg: wgmsg) -> wgmsg:
    msg["header"]["type"] = 0x20  # any family id: the kernel assigns it at run time
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def config(
    endpoint: str = "198.51.100.11:51820", psk: str | None = PSK, port: int | None = 51000
) -> DeviceConfig:
    return DeviceConfig(
        private_key=Secret(PRIVATE),
        fwmark=0xCA6C,
        listen_port=port,
        peer=Peer(
            public_key=PUBLIC,
            endpoint=parse_endpoint(endpoint),
            allowed_ips=(ip_network("0.0.0.0/0"), ip_network("::/0"), ip_network("10.64.0.0/10")),
            preshared_key=Secret(psk) if psk else None,
            persistent_keepalive=25,
        ),
    )


def test_set_device_replaces_all_peers_with_the_new_one_in_one_message() -> None:
    msg = round_trip(set_device_message("tl0", config()))
    assert msg["cmd"] == WG_CMD_SET_DEVICE
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "tl0"
    assert msg.get_attr("WGDEVICE_A_FLAGS") == WGDEVICE_F_REPLACE_PEERS
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY") == PRIVATE.encode()
    assert msg.get_attr("WGDEVICE_A_FWMARK") == 0xCA6C
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") == 51000
    (peer,) = msg.get_attr("WGDEVICE_A_PEERS")
    assert peer.get_attr("WGPEER_A_PUBLIC_KEY") == PUBLIC.encode()
    assert peer.get_attr("WGPEER_A_PRESHARED_KEY") == PSK.encode()
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["family"], endpoint["addr"], endpoint["port"]) == (AF_INET, "198.51.100.11", 51820)
    allowed = peer.get_attr("WGPEER_A_ALLOWEDIPS")
    assert [a["addr"] for a in allowed] == ["0.0.0.0/0", "::/0", "10.64.0.0/10"]
    assert [a.get_attr("WGALLOWEDIP_A_FAMILY") for a in allowed] == [AF_INET, AF_INET6, AF_INET]


def test_set_device_with_ipv6_endpoint_without_psk_or_port() -> None:
    msg = round_trip(set_device_message("tl0", config("[2001:db8::11]:51820", psk=None, port=None)))
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") is None  # none asked: the kernel keeps its port
    (peer,) = msg.get_attr("WGDEVICE_A_PEERS")
    assert peer.get_attr("WGPEER_A_PRESHARED_KEY") is None
    endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["family"], endpoint["addr"], endpoint["port"]) == (AF_INET6, "2001:db8::11", 51820)


def test_remove_peers_keeps_the_device() -> None:
    msg = round_trip(remove_peers_message("tl0"))
    assert msg.get_attr("WGDEVICE_A_FLAGS") == WGDEVICE_F_REPLACE_PEERS
    assert msg.get_attr("WGDEVICE_A_PEERS") is None
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is None


def test_get_device_names_the_interface() -> None:
    msg = round_trip(get_device_message("tl0"))
    assert msg["cmd"] == WG_CMD_GET_DEVICE and msg.get_attr("WGDEVICE_A_IFNAME") == "tl0"


def kernel_reply(handshake: tuple[int, int] = (1764028800, 250_000_000), peers: bool = True) -> wgmsg:
    """A WG_CMD_GET_DEVICE reply as the kernel sends it, through the same encoder and decoder."""
    last_handshake = {"tv_sec": handshake[0], "tv_nsec": handshake[1]}
    attrs: list[list] = [
        ["WGDEVICE_A_IFINDEX", 7],
        ["WGDEVICE_A_IFNAME", "tl0"],
        ["WGDEVICE_A_LISTEN_PORT", 51000],
        ["WGDEVICE_A_FWMARK", 0xCA6C],
    ]
    if peers:
        attrs.append(
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", PUBLIC],
                            ["WGPEER_A_ENDPOINT", {"addr": "198.51.100.11", "port": 51820}],
                            ["WGPEER_A_LAST_HANDSHAKE_TIME", last_handshake],
                            ["WGPEER_A_RX_BYTES", 92],
                            ["WGPEER_A_TX_BYTES", 1240],
                        ]
                    }
                ],
            ]
        )
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = 1
    msg["attrs"] = attrs
    return round_trip(msg)


def test_stats_from_a_kernel_dump() -> None:
    stats = stats_from_messages([kernel_reply()], now=1764028810.25)
    assert stats.public_key == PUBLIC
    assert str(stats.endpoint) == "198.51.100.11:51820"
    assert stats.last_handshake == pytest.approx(1764028800.25)
    assert stats.handshake_age_s == pytest.approx(10.0)
    assert (stats.rx_bytes, stats.tx_bytes) == (92, 1240)
    assert (stats.listen_port, stats.fwmark) == (51000, 0xCA6C)


def test_stats_without_handshake_or_peer() -> None:
    assert stats_from_messages([kernel_reply(handshake=(0, 0))]).handshake_age_s is None
    empty = stats_from_messages([kernel_reply(peers=False)])
    assert empty.public_key is None and empty.rx_bytes == 0 and empty.listen_port == 51000
