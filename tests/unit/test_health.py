"""The prober's socket handling, with a fake socket (a raw ICMP socket needs CAP_NET_RAW and a
tunnel to send into; the lab's failover tests send real probes through wireguard-go)."""

from __future__ import annotations

import socket
from ipaddress import ip_address

import pytest

from supervisor import health
from supervisor.net import probe


class FakeSocket:
    made: list[FakeSocket] = []

    def __init__(self, family: int, kind: int, proto: int) -> None:
        self.family, self.kind, self.proto = family, kind, proto
        self.options: dict[tuple[int, int], bytes] = {}
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False
        self.fail: OSError | None = None
        FakeSocket.made.append(self)

    def setblocking(self, flag: bool) -> None:
        assert flag is False, "a probe must never block the event loop"

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.options[(level, option)] = value

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        if self.fail is not None:
            raise self.fail
        self.sent.append((data, address))
        return len(data)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def prober(monkeypatch: pytest.MonkeyPatch) -> health.IcmpProber:
    FakeSocket.made = []
    monkeypatch.setattr(health.socket, "socket", FakeSocket)
    return health.IcmpProber()


def test_probes_share_one_socket_per_family_bound_to_the_tunnel_and_deaf(prober) -> None:
    for _ in range(30):
        prober.send(ip_address("10.64.0.1"), "tl0")
    prober.send(ip_address("fd00::1"), "tl0")
    v4, v6 = FakeSocket.made
    assert (v4.family, v4.kind, v4.proto) == (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    assert v6.family == socket.AF_INET6 and v6.proto == socket.IPPROTO_ICMPV6
    assert len(v4.sent) == 30 and len(v6.sent) == 1
    assert v4.options[(socket.SOL_SOCKET, probe._SO_BINDTODEVICE)] == b"tl0"
    assert v4.options[(probe._SOL_RAW, probe._ICMP_FILTER)] == b"\xff\xff\xff\xff", "receives nothing"
    assert v6.options[(socket.IPPROTO_ICMPV6, probe._ICMP6_FILTER)] == b"\xff" * 32
    data, address = v4.sent[0]
    assert address == ("10.64.0.1", 0) and data[0] == 8 and len(data) == 16  # echo request, small
    assert len({d[6:8] for d, _ in v4.sent}) == 30, "each probe its own sequence number"


def test_a_send_that_fails_reopens_the_socket_next_time(prober) -> None:
    prober.send(ip_address("10.64.0.1"), "tl0")
    first = FakeSocket.made[0]
    first.fail = OSError(19, "No such device")  # the interface was deleted and made again
    with pytest.raises(OSError):
        prober.send(ip_address("10.64.0.1"), "tl0")
    assert first.closed
    prober.send(ip_address("10.64.0.1"), "tl0")
    assert len(FakeSocket.made) == 2 and len(FakeSocket.made[1].sent) == 1


def test_a_full_send_buffer_loses_the_probe_quietly_and_keeps_the_socket(prober) -> None:
    prober.send(ip_address("10.64.0.1"), "tl0")
    FakeSocket.made[0].fail = BlockingIOError()
    prober.send(ip_address("10.64.0.1"), "tl0")
    assert not FakeSocket.made[0].closed and len(FakeSocket.made) == 1


def test_close_closes_every_socket(prober) -> None:
    prober.send(ip_address("10.64.0.1"), "tl0")
    prober.send(ip_address("fd00::1"), "tl0")
    prober.close()
    assert all(s.closed for s in FakeSocket.made)


def test_without_cap_net_raw_the_probes_are_dns_queries_over_udp(monkeypatch) -> None:
    """podman grants no NET_RAW by default: the prober must still probe, not give up."""
    FakeSocket.made = []

    def no_raw(family: int, kind: int, proto: int) -> FakeSocket:
        if kind == socket.SOCK_RAW:
            raise PermissionError(1, "Operation not permitted")
        return FakeSocket(family, kind, proto)

    monkeypatch.setattr(health.socket, "socket", no_raw)
    prober = health.IcmpProber()
    for _ in range(3):
        prober.send(ip_address("10.64.0.1"), "tl0")
    (udp,) = FakeSocket.made
    assert (udp.kind, udp.proto) == (socket.SOCK_DGRAM, socket.IPPROTO_UDP) and not prober.raw
    assert udp.options[(socket.SOL_SOCKET, probe._SO_BINDTODEVICE)] == b"tl0", "into the tunnel"
    data, address = udp.sent[0]
    assert address == ("10.64.0.1", 53) and len(udp.sent) == 3
    assert data[2:6] == b"\x01\x00\x00\x01" and data[-5:] == b"\x00\x00\x02\x00\x01"  # RD, one question: . NS
