"""Prometheus metrics at ``[metrics] listen``: the daemon's state, the tunnel and the lock.

The exposition is built per scrape from a ``Snapshot`` of the live daemon (the same answer
``tunlock status --json`` gives, plus counts), so the metrics hold no copy of the state that
could drift from it. ``exposition`` is pure: snapshot in, text out, in the OpenMetrics format
(what Prometheus asks for first) or, for a client that asks only for ``text/plain``, the classic
Prometheus text format. The classic format's module (``prometheus_client.exposition``) imports an
HTTP server and client (http.server, wsgiref, urllib.request: 2.8 MB RSS) that tunlock does not
use, so it is imported only when such a client first scrapes (with the light package of
supervisor/lean_packages.py, nothing else of prometheus_client's initialiser loads either).

The HTTP side runs in the daemon's own task group (no thread, unlike prometheus_client's
built-in server, which would outlive a cancelled daemon and read the state from another
thread): an anyio TCP listener, h11 for HTTP/1.1, one request per connection. The lock is
not opened for it: loopback always reaches it, the LAN only through ``lock.inbound_tcp``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import socket
import sys
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import h11
import mimeparse
from anyio.streams.stapled import MultiListener
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector, CollectorRegistry

from supervisor.connections import Slot, Slots, accept_forever
from supervisor.errors import TunlockError
from supervisor.log import get_logger

log = get_logger(__name__)

STATES = ("blocked", "connecting", "connected", "offline", "stopped")
REQUEST_TIMEOUT_S = 5.0
# Connections open at once (a scraper or two, a curl); a crowd cycles through them (``connections``).
MAX_CLIENTS = 32
MAX_REQUEST_HEAD_BYTES = 8192
SNAPSHOT_TIMEOUT_S = 3.0  # inside REQUEST_TIMEOUT_S, so a stuck read still gets a 503


class MetricsUnavailable(TunlockError):
    """The metrics endpoint cannot listen where the configuration says."""


@dataclass(frozen=True)
class Snapshot:
    """What one scrape shows."""

    status: Mapping[str, Any]  # the `tunlock status --json` answer
    version: str
    servers: int  # configured
    entered: Mapping[str, int] = field(default_factory=dict)  # times each state was entered
    failures: Mapping[str, int] = field(default_factory=dict)  # failures declared, per server
    lock_counters: Mapping[str, int] = field(default_factory=dict)  # packets the lock refused
    lock_restores: int = 0  # times the guard put a tampered lock back
    inbound_packets: Mapping[str, int] = field(default_factory=dict)  # per "port/protocol" (LockState)


def _families(snap: Snapshot) -> Iterator[Metric]:
    status = snap.status
    lock = status.get("lock", {})
    info = GaugeMetricFamily(
        "tunlock_info", "tunlock's version and tunnel backend.", labels=["version", "backend"]
    )
    info.add_metric([snap.version, status.get("backend") or ""], 1)
    yield info

    state = GaugeMetricFamily("tunlock_state", "1 for the daemon's current state.", labels=["state"])
    for name in STATES:
        state.add_metric([name], 1.0 if status.get("state") == name else 0.0)
    yield state
    yield GaugeMetricFamily(
        "tunlock_connected",
        "1 when traffic flows through a working tunnel.",
        value=status.get("state") == "connected",
    )
    yield GaugeMetricFamily(
        "tunlock_state_since_seconds", "Unix time the current state began.", value=status.get("since") or 0
    )
    entered = CounterMetricFamily("tunlock_state_entered", "Times each state was entered.", labels=["state"])
    for name in STATES:
        entered.add_metric([name], snap.entered.get(name, 0))
    yield entered

    yield GaugeMetricFamily("tunlock_servers", "Servers in the configuration.", value=snap.servers)
    failures = CounterMetricFamily(
        "tunlock_server_failures", "Servers declared dead or unreachable, per server.", labels=["server"]
    )
    for server, count in sorted(snap.failures.items()):
        failures.add_metric([server], count)
    yield failures

    if status.get("server"):
        current = GaugeMetricFamily(
            "tunlock_server_info", "The server in use.", labels=["server", "endpoint"]
        )
        current.add_metric([status["server"], status.get("endpoint") or ""], 1)
        yield current
    # The tunnel's counters restart with each peer: Prometheus' rate() takes that as a reset.
    if status.get("rx_bytes") is not None:
        yield CounterMetricFamily(
            "tunlock_tunnel_receive_bytes",
            "Bytes received through the tunnel from the current peer.",
            value=status["rx_bytes"],
        )
        yield CounterMetricFamily(
            "tunlock_tunnel_transmit_bytes",
            "Bytes sent through the tunnel to the current peer.",
            value=status["tx_bytes"] or 0,
        )
    if status.get("handshake_age_s") is not None:
        yield GaugeMetricFamily(
            "tunlock_handshake_age_seconds",
            "Seconds since the last WireGuard handshake.",
            value=status["handshake_age_s"],
        )

    yield GaugeMetricFamily(
        "tunlock_lock_installed", "1 when the lock table is in place.", value=bool(lock.get("installed"))
    )
    yield GaugeMetricFamily(
        "tunlock_lock_matching",
        "1 when the lock table is exactly what tunlock installed.",
        value=bool(lock.get("matching")),
    )
    yield GaugeMetricFamily(
        "tunlock_lock_owned",
        "1 while the daemon holds the owned twin table that no other program can flush.",
        value=bool(lock.get("owned")),
    )
    yield GaugeMetricFamily(
        "tunlock_lock_egress_uplinks",
        "Physical uplinks whose every leaving frame the lock's egress chain filters.",
        value=len(lock.get("egress") or []),
    )
    bypass = GaugeMetricFamily(
        "tunlock_bypass_workloads",
        "Workloads whose frames skip the host's netfilter (macvlan child, bridged uplink); held=1 "
        "when the egress chain covers them.",
        labels=["kind", "interface", "held"],
    )
    held = "1" if lock.get("egress") else "0"
    for workload in lock.get("bypass") or []:
        bypass.add_metric([str(workload.get("kind")), str(workload.get("interface")), held], 1)
    yield bypass
    blocked = CounterMetricFamily(
        "tunlock_lock_blocked_packets",
        "Packets the lock refused, by where they were going.",
        labels=["where"],
    )
    for counter, packets in sorted(snap.lock_counters.items()):
        blocked.add_metric([counter.removeprefix("blocked_")], packets)
    yield blocked
    yield CounterMetricFamily(
        "tunlock_lock_restores",
        "Times the lock was changed or deleted by someone else and put back.",
        value=snap.lock_restores,
    )
    yield from _port_forwarding_families(status, snap.inbound_packets)


def _port_forwarding_families(status: Mapping[str, Any], inbound: Mapping[str, int]) -> Iterator[Metric]:
    """The forwarded port, its age, the connections it got, per plugin its last push result and
    restarts."""
    yield GaugeMetricFamily(
        "tunlock_forwarded_port",
        "The port the provider forwards through the tunnel (0 when none).",
        value=status.get("forwarded_port") or 0,
    )
    reached = CounterMetricFamily(
        "tunlock_forwarded_port_inbound_packets",
        "Packets that opened a connection to a forwarded port through the tunnel, as the lock "
        "counted them since the port was accepted; a port nobody reaches stops growing.",
        labels=["port", "protocol"],
    )
    for key, packets in sorted(inbound.items()):
        port, _, protocol = key.partition("/")
        reached.add_metric([port, protocol], packets)
    yield reached
    if status.get("forwarded_age_s") is not None:
        yield GaugeMetricFamily(
            "tunlock_forwarded_port_age_seconds",
            "Seconds since the forwarded port was first handed out.",
            value=status["forwarded_age_s"],
        )
    plugins: Mapping[str, Mapping[str, Any]] = status.get("plugins") or {}
    pushed = GaugeMetricFamily(
        "tunlock_port_push_ok", "1 when the last port push to the client succeeded.", labels=["plugin"]
    )
    pushed_at = GaugeMetricFamily(
        "tunlock_port_push_timestamp_seconds", "Unix time of the last port push.", labels=["plugin"]
    )
    restarts = CounterMetricFamily(
        "tunlock_plugin_restarts", "Times a plugin was restarted.", labels=["plugin"]
    )
    for name, report in sorted(plugins.items()):
        if "result" in report:
            pushed.add_metric([name], 1.0 if report["result"] == "ok" else 0.0)
            pushed_at.add_metric([name], report.get("at") or 0)
        restarts.add_metric([name], report.get("restarts", 0))
    yield pushed
    yield pushed_at
    yield restarts


class _Once(Collector):
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        return _families(self.snap)


OPENMETRICS = "application/openmetrics-text"
CLASSIC = "text/plain"
CLASSIC_MODULE = "prometheus_client.exposition"


def negotiate(accept: str | None) -> str:
    """The format to answer an ``Accept`` header with: ``CLASSIC`` when the client prefers
    ``text/plain`` (old Prometheus, some scrapers), else ``OPENMETRICS``.

    Each format takes the quality of the most specific media range that matches it; the higher
    quality wins, then the more specific match (``text/plain, */*`` asks for text), and a tie goes
    to OpenMetrics: so does no header, ``*/*`` (curl), a header naming neither format and one that
    does not parse (HTTP lets a server ignore an Accept it cannot satisfy). Prometheus asks for
    OpenMetrics first, then text/plain at a lower quality. (prometheus_client's own server answers
    OpenMetrics only to a client that names it, and curl would load the classic format's module.)
    The media ranges' ``version`` and ``escaping`` parameters need no negotiating: every name
    tunlock exposes is a classic Prometheus name, written the same in every version of either
    format."""
    if not accept:
        return OPENMETRICS
    try:
        # Ties go to the last of the list.
        return mimeparse.best_match([CLASSIC, OPENMETRICS], accept.lower()) or OPENMETRICS
    except ValueError:  # a media range without a type/subtype (MimeTypeParseException)
        return OPENMETRICS


def exposition(snap: Snapshot, media_type: str = OPENMETRICS) -> tuple[str, bytes]:
    """The content type and the text of one snapshot, in ``media_type``'s format (``negotiate``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once(snap))
    if media_type == CLASSIC:
        classic = importlib.import_module(CLASSIC_MODULE)
        # The text of version 0.0.4, which every classic scraper reads (tunlock's names need none
        # of 1.0.0's escaping): the name newer prometheus_client releases give it, the latest
        # content type of older ones.
        content_type = getattr(classic, "CONTENT_TYPE_PLAIN_0_0_4", classic.CONTENT_TYPE_LATEST)
        return content_type, classic.generate_latest(registry)
    return openmetrics.CONTENT_TYPE_LATEST, openmetrics.generate_latest(registry)


# --- serving ------------------------------------------------------------------------------------

SnapshotSource = Callable[[], Awaitable[Snapshot]]


async def serve(
    host: str,
    port: int,
    source: SnapshotSource,
    *,
    bind: Callable[[str, int], Awaitable[socket.socket]] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` on ``host:port`` until cancelled.

    Any local user can connect to the port: ``MAX_CLIENTS`` connections at once, the idle ones
    giving way to newcomers, and no error of ``accept()`` ends the daemon (``connections``).
    ``bind``: makes the listening socket elsewhere (namespace mode: in the host's namespace, where
    the scraper is), instead of here."""
    try:
        if bind is None:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        else:
            bound = await anyio.abc.SocketListener.from_socket(await bind(host, port))
            listener = MultiListener([bound])
    except OSError as err:  # a port taken, an address not on this host: say so, not a traceback
        raise MetricsUnavailable(
            f"metrics.listen {host}:{port}: cannot listen: {err.strerror or err}"
        ) from None
    slots = Slots(MAX_CLIENTS)

    async def handle(stream: anyio.abc.ByteStream, slot: Slot) -> None:
        await answer(stream, source, slot)

    async with listener, anyio.create_task_group() as tg:
        log.info("metrics listening", listen=f"{host}:{port}")
        for one in listener.listeners:  # one per address family of the host name
            # (typed as bare Listeners, they are the SocketListeners that accept one at a time)
            one = typing.cast(anyio.abc.SocketListener, one)
            tg.start_soon(functools.partial(accept_forever, one, handle, slots, what="metrics"))
        task_status.started()


async def answer(stream: anyio.abc.ByteStream, source: SnapshotSource, slot: Slot | None = None) -> None:
    """One HTTP request on ``stream``, one response, then close. ``slot``: the connection's
    place among the listener's, marked busy once the request is in."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    request: h11.Request | None = None
    async with stream:
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                request = await _read_request(conn, stream)
                if request is None:
                    return
                if slot is not None:
                    slot.busy()
                status, headers, body = await _respond(request, source)
        except h11.RemoteProtocolError as err:
            status, headers, body = err.error_status_hint, [], f"bad request: {err}\n".encode()
        except TimeoutError:
            return  # a client that sends nothing gets nothing
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            *headers,
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        phrase = HTTPStatus(status).phrase.encode()
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=phrase))
        if request is not None and request.method == b"HEAD":
            body = b""
        out += conn.send(h11.Data(data=body)) if body else b""
        out += conn.send(h11.EndOfMessage())
        with (
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
            anyio.move_on_after(REQUEST_TIMEOUT_S),  # a client that reads nothing keeps no slot
        ):
            await stream.send(out)


async def _read_request(conn: h11.Connection, stream: anyio.abc.ByteStream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive(4096))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                conn.receive_data(b"")
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _respond(
    request: h11.Request, source: SnapshotSource
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    text = [(b"content-type", b"text/plain; charset=utf-8")]
    if request.method not in (b"GET", b"HEAD"):
        return 405, [*text, (b"allow", b"GET, HEAD")], b"only GET and HEAD\n"
    path = request.target.split(b"?", 1)[0]
    if path != b"/metrics":
        return 404, text, b"tunlock serves its metrics at /metrics\n"
    accept = b", ".join(value for name, value in request.headers if name == b"accept")
    media_type = negotiate(accept.decode("latin-1"))
    if media_type == CLASSIC and CLASSIC_MODULE not in sys.modules:
        # In a thread, once per daemon: the import reads a dozen modules from disk.
        await anyio.to_thread.run_sync(importlib.import_module, CLASSIC_MODULE)
    try:
        with anyio.fail_after(SNAPSHOT_TIMEOUT_S):
            snap = await source()
    except Exception as err:  # the scrape fails, the daemon goes on
        log.warning("metrics unavailable", error=str(err) or type(err).__name__)
        return 503, text, b"metrics unavailable for now\n"
    content_type, body = exposition(snap, media_type)
    # Vary: a cache between scraper and daemon keys the answer on the Accept it answered.
    return 200, [(b"content-type", content_type.encode()), (b"vary", b"accept")], body
