"""The metrics: the exposition a scraper reads, and the HTTP answers it gets.

The exposition is pure (a snapshot in, OpenMetrics or Prometheus text out); the HTTP side is
driven over a unix socket pair, a real socket with no network in it. The lab test in
test_daemon.py scrapes a running daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_classic

from supervisor.metrics import MetricsUnavailable, Snapshot, exposition, serve
from tests import metrics_exchange

CONNECTED = {
    "state": "connected",
    "server": "se-sto-1",
    "handshake_age_s": 12.5,
    "lock": {"installed": True, "matching": True, "owned": True},
    "since": 1764000000.0,
    "endpoint": "198.51.100.11:51820",
    "rx_bytes": 4096,
    "tx_bytes": 1024,
    "backend": "userspace",
}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: bytes, parse: Callable[[str], Iterable[Any]] = parse_openmetrics) -> Samples:
    """Every sample as {(name, sorted labels): value}, as a scraper parses it (by default in the
    OpenMetrics format, which its parser checks strictly: a missing ``# EOF`` fails)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse(text.decode())
        for s in family.samples
    }


def exposed(snap: Snapshot) -> Samples:
    """What a Prometheus scrape (OpenMetrics) of ``snap`` shows."""
    return samples(exposition(snap)[1])


def test_a_connected_daemon_exposes_state_server_traffic_and_lock():
    snap = Snapshot(
        status=CONNECTED,
        version="0.1.0",
        servers=3,
        entered={"blocked": 1, "connecting": 2, "connected": 2},
        failures={"se-sto-2": 1},
        lock_counters={"blocked_out": 7, "blocked_in": 3, "blocked_dns": 2, "blocked_forward": 0},
        lock_restores=1,
    )
    got = exposed(snap)
    assert got[("tunlock_state", (("state", "connected"),))] == 1
    assert got[("tunlock_state", (("state", "blocked"),))] == 0
    assert got[("tunlock_connected", ())] == 1
    assert got[("tunlock_state_entered_total", (("state", "connecting"),))] == 2
    assert got[("tunlock_state_entered_total", (("state", "offline"),))] == 0
    assert got[("tunlock_server_info", (("endpoint", "198.51.100.11:51820"), ("server", "se-sto-1")))] == 1
    assert got[("tunlock_server_failures_total", (("server", "se-sto-2"),))] == 1
    assert got[("tunlock_servers", ())] == 3
    assert got[("tunlock_tunnel_receive_bytes_total", ())] == 4096
    assert got[("tunlock_tunnel_transmit_bytes_total", ())] == 1024
    assert got[("tunlock_handshake_age_seconds", ())] == 12.5
    assert got[("tunlock_lock_installed", ())] == 1 and got[("tunlock_lock_matching", ())] == 1
    assert got[("tunlock_lock_owned", ())] == 1
    assert got[("tunlock_lock_blocked_packets_total", (("where", "out"),))] == 7
    assert got[("tunlock_lock_blocked_packets_total", (("where", "dns"),))] == 2
    assert got[("tunlock_lock_restores_total", ())] == 1
    assert got[("tunlock_info", (("backend", "userspace"), ("version", "0.1.0")))] == 1


def test_a_blocked_daemon_has_no_server_and_no_traffic():
    status = {"state": "blocked", "server": None, "handshake_age_s": None, "lock": {"installed": True}}
    got = exposed(Snapshot(status=status, version="0.1.0", servers=0))
    assert got[("tunlock_connected", ())] == 0
    assert got[("tunlock_state", (("state", "blocked"),))] == 1
    assert got[("tunlock_lock_matching", ())] == 0
    assert got[("tunlock_lock_owned", ())] == 0, "no owned twin reported when the status has none"
    names = {name for name, _ in got}
    assert not names & {
        "tunlock_server_info",
        "tunlock_tunnel_receive_bytes_total",
        "tunlock_handshake_age_seconds",
    }


async def exchange(request: bytes, snapshot=None) -> bytes:
    """Send ``request`` to ``answer`` over a unix socket pair and read the whole response."""

    async def source() -> Snapshot:
        if snapshot is None:
            raise RuntimeError("nft is not answering")
        return snapshot

    return await metrics_exchange.exchange(request, source)


SNAPSHOT = Snapshot(status=CONNECTED, version="0.1.0", servers=1)


# The Accept headers scrapers send. Prometheus since 2.49 (scrape_protocols, its default; 3.x adds
# text/plain;version=1.0.0 and escaping), Prometheus 2 before that (this one from 2.5 to at least
# 2.33), and one configured with `scrape_protocols: [PrometheusText0.0.4]`.
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_2_49 = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_2 = "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
PROMETHEUS_TEXT_ONLY = "text/plain;version=0.0.4;q=0.6,*/*;q=0.5"
OPENMETRICS_TYPE = b"application/openmetrics-text; version=1.0.0; charset=utf-8"


async def scrape(accept: bytes | None) -> tuple[dict[bytes, bytes], bytes]:
    """GET /metrics with that Accept header (None: none): the response's headers and body."""
    header = b"" if accept is None else b"Accept: " + accept + b"\r\n"
    response = await exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n", SNAPSHOT)
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    assert status.startswith(b"HTTP/1.1 200 ")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    return headers, body


@pytest.mark.anyio
@pytest.mark.parametrize(
    "accept",
    [
        PROMETHEUS_3,
        PROMETHEUS_2_49,
        PROMETHEUS_2,
        None,
        "*/*",
        "application/json",
        "text/plain;q=0",
        "garbage, text/plain",
    ],
    ids=[
        "prometheus-3",
        "prometheus-2.49",
        "prometheus-2",
        "no-accept",
        "any",
        "neither",
        "text-refused",
        "unparsable",  # HTTP lets a server ignore an Accept header
    ],
)
async def test_prometheus_and_a_client_that_names_no_format_get_openmetrics(accept):
    headers, body = await scrape(None if accept is None else accept.encode())
    assert headers[b"content-type"] == OPENMETRICS_TYPE
    assert headers[b"vary"] == b"accept"
    assert body.endswith(b"\n# EOF\n")
    got = samples(body)
    assert got[("tunlock_connected", ())] == 1
    assert got[("tunlock_tunnel_receive_bytes_total", ())] == 4096, "counters keep their _total samples"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "accept",
    ["text/plain;version=0.0.4", "text/plain", PROMETHEUS_TEXT_ONLY, "TEXT/PLAIN, */*"],
    ids=["text-0.0.4", "text", "prometheus-text-only", "text-then-any"],
)
async def test_a_client_that_prefers_text_plain_gets_the_classic_format_with_the_same_samples(accept):
    headers, body = await scrape(accept.encode())
    assert headers[b"content-type"] == b"text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in body
    # The same names and values the OpenMetrics scrape shows: what a user queries does not change.
    assert samples(body, parse_classic) == exposed(SNAPSHOT)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200", b""),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"404", b"at /metrics"),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405", b"only GET and HEAD"),
        (b"BLAH\r\n\r\n", b"400", b"bad request"),
    ],
)
async def test_other_requests_get_plain_answers(request_bytes, status, says):
    response = await exchange(request_bytes, SNAPSHOT)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split()[1] == status
    assert says in body
    if request_bytes.startswith(b"HEAD"):
        assert body == b"" and b"content-length: " in head.lower()


@pytest.mark.anyio
async def test_a_snapshot_that_fails_is_a_503_not_a_dead_server():
    response = await exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", None)
    assert response.split()[1] == b"503"


@pytest.mark.anyio
async def test_an_address_it_cannot_listen_on_is_a_clear_error():
    # 192.0.2.1 (documentation range) is on no interface here: the bind fails before any traffic.
    with pytest.raises(MetricsUnavailable, match=r"metrics.listen 192.0.2.1:9586: cannot listen: "):
        await serve("192.0.2.1", 9586, None)  # type: ignore[arg-type]


def test_forwarded_port_its_age_and_each_clients_last_push():
    status = {
        **CONNECTED,
        "forwarded_port": 40001,
        "forwarded_age_s": 93.5,
        "plugins": {
            "natpmp": {"port": 40001, "restarts": 1},
            "qbittorrent": {"port": 40001, "result": "ok", "at": 1764000100.0},
            "transmission": {"port": 40001, "result": "error", "at": 1764000101.0, "error": "HTTP 401"},
        },
    }
    got = exposed(Snapshot(status=status, version="0.1.0", servers=2))
    assert got[("tunlock_forwarded_port", ())] == 40001
    assert got[("tunlock_forwarded_port_age_seconds", ())] == 93.5
    assert got[("tunlock_port_push_ok", (("plugin", "qbittorrent"),))] == 1
    assert got[("tunlock_port_push_ok", (("plugin", "transmission"),))] == 0
    assert ("tunlock_port_push_ok", (("plugin", "natpmp"),)) not in got
    assert got[("tunlock_port_push_timestamp_seconds", (("plugin", "transmission"),))] == 1764000101.0
    assert got[("tunlock_plugin_restarts_total", (("plugin", "natpmp"),))] == 1


def test_the_packets_reaching_each_forwarded_port_through_the_lock_are_a_counter():
    status = {**CONNECTED, "forwarded_port": 40001}
    inbound = {"40001/tcp": 7, "40001/udp": 0}
    got = exposed(Snapshot(status=status, version="0.1.0", servers=1, inbound_packets=inbound))
    name = "tunlock_forwarded_port_inbound_packets_total"
    assert got[(name, (("port", "40001"), ("protocol", "tcp")))] == 7
    assert got[(name, (("port", "40001"), ("protocol", "udp")))] == 0
    empty = exposed(Snapshot(status=CONNECTED, version="0.1.0", servers=1))
    assert not any(key[0] == name for key in empty), "no forwarded port: no series"


def test_no_forwarded_port_is_zero_and_no_age():
    got = exposed(Snapshot(status=CONNECTED, version="0.1.0", servers=2))
    assert got[("tunlock_forwarded_port", ())] == 0
    assert ("tunlock_forwarded_port_age_seconds", ()) not in got


def test_bypass_workloads_and_the_egress_chain_are_exposed():
    workload = {"kind": "macvlan", "interface": "mv1", "detail": "macvlan child of uplink eth0"}
    status = {**CONNECTED, "lock": {"installed": True, "egress": ["eth0"], "bypass": [workload]}}
    got = exposed(Snapshot(status=status, version="0.1.0", servers=1))
    assert got[("tunlock_lock_egress_uplinks", ())] == 1
    assert got[("tunlock_bypass_workloads", (("held", "1"), ("interface", "mv1"), ("kind", "macvlan")))] == 1
    status = {**CONNECTED, "lock": {"installed": True, "egress": [], "bypass": [workload]}}
    got = exposed(Snapshot(status=status, version="0.1.0", servers=1))
    assert got[("tunlock_lock_egress_uplinks", ())] == 0
    assert got[("tunlock_bypass_workloads", (("held", "0"), ("interface", "mv1"), ("kind", "macvlan")))] == 1
