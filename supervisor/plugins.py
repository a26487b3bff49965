"""Plugins: optional behaviour that follows the daemon's state (port forwarding, hooks, pushes).

A plugin is any object with ``async def run(self, ctx: PluginContext) -> None``, made by a factory
that the ``tunlock.plugins`` entry-point group names and ``[plugins] enabled`` turns on; its
options are the ``[plugins.<name>]`` table (see docs/plugins.md). A ``PluginSpec`` is such a
factory with its options declared as a msgspec Struct (``PluginOptions``): the host validates the
table against it and reports each wrong key at its line, like the rest of the configuration.
What a plugin sees is a ``View``: the tunnel (state, server, interface, addresses, gateway) and
the forwarded port(s). What it may ask for is what ``PluginContext``
offers, nothing more: wait for the next view, ask the lock to accept inbound ports on the tunnel
(``forward_ports``), and report fields for the status. The host writes nowhere else: the status
asks it for a ``PluginsReport`` when it is built (supervisor/status.py).

Why the host is shaped like this:

- The machine never waits for a plugin. The runtime's status publish is a synchronous call
  that only replaces the current view and wakes the plugins; a plugin reads the *latest* view
  when it is ready, so a slow plugin skips intermediate views instead of queueing them, and a
  plugin that floods requests only overwrites its own last request.
- The lock stays the daemon's. A port request is validated, coalesced, and applied by one host
  task as an nft element swap with a timeout; the view announces the forwarded port only once
  the lock accepts it, and only for the connection that asked for it (the view can change while
  the lock works: a rotation then must not inherit the ports of the connection it left).
- A plugin that raises is logged and started again after a doubling backoff; one that does not
  come back to ``ctx.next()`` within ``stall_timeout_s`` is hung: it is cancelled, logged and
  restarted the same way. (A plugin that blocks the event loop itself cannot be stopped from
  inside the process; the interface asks plugins to put blocking work in a thread.)
"""

from __future__ import annotations

import difflib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.abc
import msgspec

from supervisor.errors import ConfigError, Problem, describe
from supervisor.jsonvalue import JSON
from supervisor.log import get_logger
from supervisor.machine import events as ev
from supervisor.servers import IPAddress, IPInterface, Server
from supervisor.tables import Wrong, convert_table

log = get_logger(__name__)

ENTRY_POINT_GROUP = "tunlock.plugins"
PROTOCOLS = ("tcp", "udp")
MAX_FORWARDED_PORTS = 16
LOCK_TIMEOUT_S = 15.0
# At most this many lock changes a second for plugins: a plugin flooding requests costs the
# daemon a few nft calls, not a busy loop (a real forwarded port changes a few times a day).
LOCK_CHANGES_PER_S = 4
WATCHDOG_PERIOD_S = 0.5


# --- what a plugin sees -----------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelView:
    """The daemon's state as a plugin sees it.

    ``state`` is ``blocked``, ``connecting``, ``connected``, ``offline``, ``stopping`` (the
    daemon is about to tear the tunnel down: the last moment to give a mapping up) or
    ``stopped``. ``session`` grows by one at every entry into ``connected`` (connect, failover,
    rotation, reconnect): a plugin that holds per-connection state starts over when it changes.
    """

    state: str = "blocked"
    server: str | None = None
    interface: str = ""
    addresses: tuple[IPInterface, ...] = ()
    dns: tuple[IPAddress, ...] = ()
    gateway: IPv4Address | None = None
    session: int = 0

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    @property
    def address_v4(self) -> IPv4Address | None:
        """The tunnel's own IPv4 address (NAT-PMP sends from it)."""
        return next((a.ip for a in self.addresses if a.version == 4), None)


@dataclass(frozen=True)
class Forwarded:
    """Ports the provider forwards to this host, accepted by the lock on the tunnel."""

    ports: tuple[int, ...]
    server: str | None
    since: float  # wall clock, when these ports were first announced

    @property
    def port(self) -> int:
        return self.ports[0]


@dataclass(frozen=True)
class View:
    tunnel: TunnelView = field(default_factory=TunnelView)
    forwarded: Forwarded | None = None


@dataclass(frozen=True)
class PluginsReport:
    """What the host tells the status: the forwarded port(s) the lock accepted, and each
    plugin's fields (with ``restarts`` and ``last_error`` once it failed)."""

    forwarded: Forwarded | None
    plugins: Mapping[str, Mapping[str, JSON]]


class Published(Protocol):
    """The runtime's status publish, as far as the plugins see it."""

    @property
    def state(self) -> str: ...

    @property
    def server(self) -> str | None: ...


class Plugin(Protocol):
    async def run(self, ctx: PluginContext) -> None:
        """Follow ``await ctx.next()`` until cancelled; raise to be restarted (with backoff)."""


PluginFactory = Callable[[Mapping[str, Any]], Plugin]


class PluginOptionError(ValueError):
    """A plugin's options are wrong; the message says which and why. A factory that checks its
    table itself raises it with a message; a ``PluginSpec`` raises it with ``wrong``, each wrong
    key and what is wrong with it (the message lists them all)."""

    def __init__(self, message: str = "", wrong: Sequence[Wrong] = ()) -> None:
        self.wrong = tuple(wrong)
        said = "; ".join(f"{w.key}: {w.message}" if w.key else w.message for w in self.wrong)
        super().__init__(message or said)


class PluginOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The base of a plugin's options: ``[plugins.<name>]`` is validated against it.

    Unknown keys are errors, and values must be of the TOML type declared (strict: ``"60"`` is
    not a number, ``true`` is not 1), as the hand-written checks before them required. A
    subclass declares its keys as fields (bounds as ``Annotated[int, msgspec.Meta(ge=...)]``)
    and checks the rest in ``__post_init__``: ``supervisor.tables.FieldProblem`` for one key, a
    ``ValueError`` for the table as a whole."""


OptionsT = TypeVar("OptionsT", bound=PluginOptions)


@dataclass(frozen=True)
class PluginSpec(Generic[OptionsT]):
    """A plugin factory with declared options: what a ``tunlock.plugins`` entry point names.

    Called with the raw table it validates it (PluginOptionError with every wrong key, which
    ``load`` turns into ``file:line`` problems) and makes the plugin from the options."""

    options: type[OptionsT]
    make: Callable[[OptionsT], Plugin]

    def __call__(self, table: Mapping[str, Any]) -> Plugin:
        options, wrong = convert_table(dict(table), self.options, strict=True)
        if options is None:
            raise PluginOptionError(wrong=wrong)
        return self.make(options)


# --- what a plugin may ask --------------------------------------------------------------------


class PluginContext:
    """One plugin's handle on the daemon."""

    def __init__(self, host: PluginHost, name: str) -> None:
        self._host = host
        self.name = name
        self.log = get_logger(f"plugin.{name}")
        self._seen = -1
        self._waiting = True
        self._since = host.clock()
        self._wake = anyio.Event()

    @property
    def view(self) -> View:
        return self._host.view

    async def next(self, timeout: float | None = None) -> View | None:
        """The current view if this plugin has not seen it, else wait for the next change.
        ``None`` when ``timeout`` seconds pass without one (a plugin's own timers)."""
        self._waiting = True
        try:
            with anyio.move_on_after(math.inf if timeout is None else max(0.0, timeout)):
                while self._seen == self._host.version:
                    await self._wake.wait()
                    self._wake = anyio.Event()
            if self._seen == self._host.version:
                return None
            self._seen = self._host.version
            return self._host.view
        finally:
            self._waiting = False
            self._since = self._host.clock()

    async def forward_ports(self, ports: Sequence[int] | None, protocols: Sequence[str] = PROTOCOLS) -> None:
        """Ask that ``ports`` (``protocols`` each) be accepted inbound on the tunnel, replacing
        what this plugin asked before; ``None`` or ``()`` withdraws them. The view's
        ``forwarded`` follows once the lock does."""
        pairs = frozenset((proto, int(port)) for port in ports or () for proto in protocols)
        if len(pairs) > MAX_FORWARDED_PORTS or any(
            proto not in PROTOCOLS or not 1 <= port <= 65535 for proto, port in pairs
        ):
            raise ValueError(f"forward_ports: at most {MAX_FORWARDED_PORTS} tcp/udp ports in 1-65535")
        self._host.request_ports(self.name, pairs)

    async def wait_for_change(self) -> None:
        """Return at the next change of the view, without taking it (``next()`` still returns
        it): for cancelling work that a change makes moot, e.g. an exchange with a server that
        was just left."""
        await self._host._changed.wait()

    async def server_unfit(self, reason: str) -> None:
        """The connected server cannot give what this plugin requires (a forwarded port that the
        user made ``required``): the machine leaves it like a failed server, or stays on it, saying
        so, when no other server is left to try. Only about the connection in the current view."""
        tunnel = self.view.tunnel
        if tunnel.connected and tunnel.server is not None:
            server = tunnel.server
            await self._host.post_event(lambda now: ev.ServerUnfit(now, server, f"{self.name}: {reason}"))

    async def port_granted(self) -> None:
        """The connected server forwarded a port: rotation prefers it from now on."""
        tunnel = self.view.tunnel
        if tunnel.connected and tunnel.server is not None:
            server = tunnel.server
            await self._host.post_event(lambda now: ev.PortGranted(now, server))

    def report(self, **fields: JSON) -> None:
        """Fields shown under ``plugins.<name>`` in ``tunlock status --json`` and the metrics."""
        self._host.report_of(self.name).update(fields)

    def _notify(self) -> None:
        self._wake.set()


# --- the host ---------------------------------------------------------------------------------


class InboundLock(Protocol):
    async def set_tunnel_inbound(self, pairs: frozenset[tuple[str, int]]) -> None: ...


@dataclass
class _Slot:
    name: str
    plugin: Plugin
    ctx: PluginContext
    restarts: int = 0
    hung: bool = False


class PluginHost:
    """Runs the enabled plugins in the daemon's task group and feeds them views."""

    def __init__(
        self,
        plugins: Iterable[tuple[str, Plugin]],
        lock: InboundLock,
        *,
        interface: str,
        server_of: Callable[[str], Server | None],
        stall_timeout_s: float = 60.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        post: Callable[[Callable[[float], ev.Event]], Awaitable[None]] | None = None,
    ) -> None:
        """``post``: the runtime's inbox (``Runtime.post``), for what plugins tell the machine
        (``PluginContext.server_unfit``, ``port_granted``); None: nothing is told."""
        self.lock = lock
        self._post = post
        self.interface = interface
        self.server_of = server_of
        self.stall_timeout_s = stall_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.view = View(TunnelView(interface=interface))
        self.version = 0
        self._reports: dict[str, dict[str, JSON]] = {}
        self._slots = [_Slot(name, plugin, PluginContext(self, name)) for name, plugin in plugins]
        self._requested: dict[str, frozenset[tuple[str, int]]] = {}
        # What the lock holds for the plugins; None: not known (a change failed or timed out, and
        # may have been installed all the same), so the next request is applied whatever it is.
        self._applied: frozenset[tuple[str, int]] | None = frozenset()
        self._lock_wake = anyio.Event()
        self._changed = anyio.Event()

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self._slots]

    # --- views in ------------------------------------------------------------------------

    def publish(self, status: Published) -> None:
        """The runtime's status publish (synchronous, never waits): a new view for the plugins."""
        tunnel = self.view.tunnel
        server = self.server_of(status.server) if status.server else None
        session = tunnel.session
        if status.state == "connected" and (not tunnel.connected or status.server != tunnel.server):
            session += 1  # a new connection: connect, failover, rotation or reconnect
        self._set_tunnel(
            TunnelView(
                state=status.state,
                server=status.server,
                interface=self.interface,
                addresses=server.addresses if server else (),
                dns=server.dns if server else (),
                gateway=_gateway(server),
                session=session,
            )
        )

    def _set_tunnel(self, tunnel: TunnelView) -> None:
        old = self.view.tunnel
        forwarded = self.view.forwarded
        if tunnel.session != old.session or not tunnel.connected:
            # A forwarded port belongs to one connection: a new one starts without it.
            if any(self._requested.values()):
                self._requested.clear()
                self._lock_wake.set()
            forwarded = None
        self._change(View(tunnel, forwarded))

    def _change(self, view: View) -> None:
        if view == self.view:
            return
        self.view = view
        self.version += 1
        for slot in self._slots:
            slot.ctx._notify()
        self._changed.set()
        self._changed = anyio.Event()

    async def stopping(self, timeout: float) -> None:
        """Tell the plugins the tunnel is about to go and give them ``timeout`` seconds to act on
        it (give a mapping up, clear a port file) before the machine tears it down."""
        self._set_tunnel(replace(self.view.tunnel, state="stopping"))
        version = self.version
        # Polled: a plugin coming back to ``next()`` sets no event, and this runs only on stop.
        with anyio.move_on_after(timeout):
            while not all(s.ctx._seen >= version and s.ctx._waiting for s in self._slots if not s.hung):  # noqa: ASYNC110
                await anyio.sleep(0.02)

    # --- port requests -------------------------------------------------------------------

    def request_ports(self, name: str, pairs: frozenset[tuple[str, int]]) -> None:
        if self._requested.get(name, frozenset()) == pairs:
            return
        if not self.view.tunnel.connected and pairs:
            return  # a request from a connection that is gone
        self._requested[name] = pairs
        self._lock_wake.set()

    async def post_event(self, make: Callable[[float], ev.Event]) -> None:
        if self._post is not None:
            await self._post(make)

    def report_of(self, name: str) -> dict[str, JSON]:
        """``name``'s report, to update (the plugin's fields, the host's ``restarts``)."""
        return self._reports.setdefault(name, {})

    def report(self) -> PluginsReport:
        """A copy of what the status shows of the plugins, as it is now."""
        return PluginsReport(
            self.view.forwarded,
            MappingProxyType({name: MappingProxyType(dict(r)) for name, r in self._reports.items()}),
        )

    async def _apply_ports(self) -> None:
        """The one task that changes the lock for plugins: the latest request wins."""
        recent: deque[float] = deque(maxlen=LOCK_CHANGES_PER_S)
        while True:
            await self._lock_wake.wait()
            if len(recent) == recent.maxlen:
                await anyio.sleep(max(0.0, recent[0] + 1.0 - self.clock()))
            self._lock_wake = anyio.Event()
            wanted = frozenset().union(*self._requested.values())
            asked_for = self.view.tunnel
            if wanted != self._applied:
                try:
                    with anyio.fail_after(LOCK_TIMEOUT_S):
                        await self.lock.set_tunnel_inbound(wanted)
                except Exception as err:  # a later request retries, whatever it asks for
                    log.error("could not change the ports accepted on the tunnel", error=describe(err))
                    self._applied = None
                    continue
                self._applied = wanted
                recent.append(self.clock())
                log.info("inbound ports on the tunnel", ports=sorted(f"{p}/{proto}" for proto, p in wanted))
                now = self.view.tunnel
                if now.session != asked_for.session or not now.connected:
                    # The connection that asked for these ports ended while the lock took them:
                    # they are not the new one's to announce. Its end cleared the requests and
                    # woke this task, so the next round closes them or, if the new connection
                    # asked for the same ones, announces them for it.
                    continue
            ports = tuple(sorted({port for _, port in wanted}))
            old = self.view.forwarded
            if not ports:
                forwarded = None
            elif old is not None and old.ports == ports:
                forwarded = old
            else:
                forwarded = Forwarded(ports, self.view.tunnel.server, time.time())
            self._change(View(self.view.tunnel, forwarded))

    # --- running -------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every plugin (supervised) and the port applier until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._apply_ports)
            for slot in self._slots:
                self.report_of(slot.name)
                tg.start_soon(self._supervise, slot)
            task_status.started()

    async def _supervise(self, slot: _Slot) -> None:
        delay = self.backoff_initial_s
        while True:
            started = self.clock()
            slot.hung = False
            slot.ctx._seen = -1  # a (re)started plugin begins with the current view
            slot.ctx._waiting = True
            failure: str
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch, slot, tg.cancel_scope)
                    await slot.plugin.run(slot.ctx)
                    tg.cancel_scope.cancel()
                failure = "hung" if slot.hung else "returned"
            except Exception as err:
                failure = f"raised {type(_first(err)).__name__}: {describe(err)}"
            if slot.hung:
                failure = f"hung: did not come back within {self.stall_timeout_s:g} s"
            slot.restarts += 1
            self.report_of(slot.name).update(restarts=slot.restarts, last_error=failure)
            if self.clock() - started > self.backoff_max_s:
                delay = self.backoff_initial_s  # it ran well for a while: not a crash loop
            log.error("plugin failed; restarting", plugin=slot.name, error=failure, after_s=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)

    async def _watch(self, slot: _Slot, scope: anyio.CancelScope) -> None:
        ctx = slot.ctx
        while True:
            await anyio.sleep(WATCHDOG_PERIOD_S)
            if not ctx._waiting and self.clock() - ctx._since > self.stall_timeout_s:
                slot.hung = True
                scope.cancel()
                return


def _first(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: the one a reader needs."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _gateway(server: Server | None) -> IPv4Address | None:
    """Where a provider's port-forwarding service answers: its first IPv4 DNS address inside
    the tunnel (Proton's 10.2.0.1 is both); ``[plugins.natpmp] gateway`` overrides it."""
    if server is None:
        return None
    return next((a for a in server.dns if isinstance(a, IPv4Address)), None)


# --- loading ----------------------------------------------------------------------------------


def available() -> dict[str, Any]:
    """Installed plugins by name (entry points, not yet loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load(
    enabled: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    path: Path,
    lines: Mapping[tuple[str, ...], int],
) -> list[tuple[str, Plugin]]:
    """Make the enabled plugins (entry-point names, or ``module:factory`` import paths for a
    plugin that is not installed); ConfigError with every problem for an unknown name or bad
    options, each at its line in ``path`` (``lines``: ``supervisor.config.key_lines``)."""
    installed = available()
    made: list[tuple[str, Plugin]] = []
    problems: list[Problem] = []

    def at(*key: str) -> int:
        """The line of ``[plugins.<key...>]``'s longest part that the file has, else of enabled."""
        for n in range(len(key), 0, -1):
            line = lines.get(("plugins", *key[:n]))
            if line:
                return line
        return lines.get(("plugins", "enabled"), 0)

    for name in enabled:
        entry = installed.get(name)
        if entry is None and ":" in name:
            # "package.module:factory": a plugin that is not installed as a distribution.
            entry = EntryPoint(name=name, value=name, group=ENTRY_POINT_GROUP)
        if entry is None:
            known = ", ".join(sorted(installed)) or "none"
            problems.append(Problem(path, at(name), f"plugin {name!r} is not installed (installed: {known})"))
            continue
        try:
            factory: PluginFactory = entry.load()
            made.append((name, factory(dict(options.get(name, {})))))
        except ImportError as err:
            problems.append(Problem(path, at(name), f"plugin {name!r} cannot be imported: {err}"))
        except PluginOptionError as err:
            if not err.wrong:
                problems.append(Problem(path, at(name), f"[plugins.{name}]: {err}"))
                continue
            model = getattr(factory, "options", None)
            keys: list[str] = []
            if isinstance(model, type) and issubclass(model, msgspec.Struct):
                keys = list(model.__struct_fields__)
            problems.extend(
                Problem(path, at(name, key), message)
                for key, message in option_problems(name, err.wrong, keys)
            )
        except (ValueError, TypeError, AttributeError) as err:
            problems.append(Problem(path, at(name), f"[plugins.{name}]: {err}"))
    if problems:
        raise ConfigError(problems)
    return made


def option_problems(name: str, wrong: Sequence[Wrong], known: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(key, "[plugins.<name>] key: message")`` for each wrong key (``known``: the keys the
    options have, for a hint at the one meant); the key is ``""`` for a check of the table as a
    whole."""
    found: list[tuple[str, str]] = []
    for detail in wrong:
        key, message = detail.key, detail.message
        if detail.unknown:
            hint = difflib.get_close_matches(key, list(known), n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})"
            message = f"unknown key{more}"
        found.append((key, f"[plugins.{name}] {key}: {message}" if key else f"[plugins.{name}]: {message}"))
    return found


async def until(condition: Callable[[View], bool], ctx: PluginContext) -> View:
    """Wait for a view that satisfies ``condition`` (a helper for plugins)."""
    while True:
        view = await ctx.next()
        if view is not None and condition(view):
            return view


AsyncAction = Callable[[], Awaitable[None]]
