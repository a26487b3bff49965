"""Keeping a torrent client on the forwarded port: qBittorrent (Web API v2), Transmission (RPC),
Deluge (its Web UI's JSON-RPC, ``deluge-web``, in front of ``deluged``).

Each pusher reads the client's port, sets it when it differs, and reads it back: a push counts
as done only when the client itself reports the forwarded port. It does so at every new port
and then every ``reassert_s`` seconds, which also covers a client that restarted (its session
and, for qBittorrent and Deluge, its login are gone: both are renewed on the way). A failure is
reported in the status and retried after ``retry_s``.

With ``bind_to_tunnel`` (the default) each push also binds the client to the tunnel, read back
the same way: qBittorrent's network interface (``current_network_interface``) and Deluge's
``listen_interface`` and ``outgoing_interface`` are the tunnel interface, Transmission's
``bind-address-ipv4`` the tunnel's address (where its RPC carries it: not in 3.00). A client
bound so sends nowhere else even without the lock (a lock removed by hand, a client started
before it); it follows the view, so a renamed interface or a new address is set at the next push.

The wire formats are pure functions (request bodies, reply parsing) under a thin httpx shell,
in the daemon's event loop.

A password (qBittorrent's login, Transmission's Basic credentials, a session cookie) goes only to
the program the user meant. When the API is on loopback, any local user could listen on its port
while the client is down (at boot, after a crash or restart) and would receive them at the next
try. So before every request to a loopback API the listener that would take the connection is
looked up in the kernel's socket table, and a listener owned by anyone but root, the daemon's
own user or ``api_user`` gets nothing: the push fails with the owner named, never the password.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import time
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
from msgspec import Meta

from plugins import sockets
from supervisor.errors import describe
from supervisor.jsonvalue import JSON
from supervisor.plugins import PluginContext, PluginOptions, PluginSpec, TunnelView
from supervisor.tables import FieldProblem


class PushError(Exception):
    """The client did not take the port; the message says what it answered."""


# --- the wire formats (pure) ------------------------------------------------------------------


def qbittorrent_set_body(port: int) -> dict[str, str]:
    return {"json": json.dumps({"listen_port": port})}


def qbittorrent_port(preferences: Mapping[str, Any]) -> int:
    port = preferences.get("listen_port")
    if not isinstance(port, int):
        raise PushError(f"app/preferences has no listen_port: {str(preferences)[:100]}")
    return port


def qbittorrent_interface_body(interface: str) -> dict[str, str]:
    return {"json": json.dumps({"current_network_interface": interface})}


def qbittorrent_interface(preferences: Mapping[str, Any]) -> str:
    interface = preferences.get("current_network_interface")
    if not isinstance(interface, str):
        raise PushError("app/preferences has no current_network_interface")
    return interface


def transmission_request(method: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    return {"method": method, "arguments": dict(arguments)}


def transmission_port(reply: Mapping[str, Any]) -> int:
    if reply.get("result") != "success":
        raise PushError(f"transmission answered {reply.get('result')!r}")
    port = reply.get("arguments", {}).get("peer-port")
    if not isinstance(port, int):
        raise PushError("session-get has no peer-port")
    return port


def transmission_bind_address(reply: Mapping[str, Any]) -> str | None:
    """``bind-address-ipv4`` from a session-get, or None when this Transmission does not report
    it (3.00 keeps it in settings.json only, out of the RPC's reach)."""
    if reply.get("result") != "success":
        raise PushError(f"transmission answered {reply.get('result')!r}")
    address = reply.get("arguments", {}).get("bind-address-ipv4")
    return address if isinstance(address, str) else None


def deluge_request(request_id: int, method: str, *params: Any) -> dict[str, Any]:
    return {"method": method, "params": list(params), "id": request_id}


class DelugeNotAuthenticated(PushError):
    """deluge-web forgot the session (it restarted): log in again."""


def deluge_result(reply: Mapping[str, Any], method: str) -> Any:
    """The ``result`` of a deluge-web JSON-RPC reply; PushError with its message on an error."""
    error = reply.get("error")
    if error:
        message = error.get("message", error) if isinstance(error, Mapping) else error
        if isinstance(error, Mapping) and error.get("code") == 1:
            raise DelugeNotAuthenticated(f"{method}: {message}")
        raise PushError(f"{method}: {message}")
    if "result" not in reply:
        raise PushError(f"{method}: no result in {str(reply)[:100]}")
    return reply["result"]


def deluge_set_config(port: int) -> dict[str, Any]:
    """One port (a range of one), never a random one at the next start."""
    return {"listen_ports": [port, port], "random_port": False}


def deluge_port(listen_ports: Any) -> int:
    """The port of ``listen_ports`` when it is a range of one; PushError otherwise."""
    if (
        isinstance(listen_ports, list)
        and len(listen_ports) == 2
        and all(isinstance(p, int) for p in listen_ports)
        and listen_ports[0] == listen_ports[1]
    ):
        return int(listen_ports[0])
    return 0  # a range, or a random port: not the forwarded one, whatever it is


def deluge_host_id(hosts: Any, daemon: str) -> str:
    """The id of ``daemon`` (``host:port``) in deluge-web's host list (``web.get_hosts``:
    ``[id, host, port, user]`` each)."""
    known = []
    for entry in hosts if isinstance(hosts, list) else []:
        if isinstance(entry, list) and len(entry) >= 3:
            known.append(f"{entry[1]}:{entry[2]}")
            if f"{entry[1]}:{entry[2]}" == daemon or (
                daemon.startswith("localhost:")
                and f"127.0.0.1:{entry[2]}" == daemon.replace("localhost", "127.0.0.1")
            ):
                return str(entry[0])
    raise PushError(f"deluge-web knows no daemon at {daemon} (its hosts: {', '.join(known) or 'none'})")


def listening_tcp_ports(proc_net_tcp: str) -> set[int]:
    """Ports in LISTEN state (``0A``) in a ``/proc/net/tcp`` or ``tcp6`` text."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _listens(port: int, tries: int = 10) -> bool:
    """Whether something in this namespace listens on TCP ``port`` (a client binds just after it
    answers, so a few looks over a second)."""
    for _ in range(tries):
        if port in await anyio.to_thread.run_sync(_listening_here):
            return True
        await anyio.sleep(0.1)
    return False


def _listening_here() -> set[int]:
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            ports |= listening_tcp_ports(Path(name).read_text())
    return ports


# --- who listens on the API --------------------------------------------------------------------

WILDCARDS = (IPv4Address("0.0.0.0"), IPv6Address("::"))


def api_listeners(
    table: Iterable[sockets.Socket], hosts: Iterable[IPv4Address | IPv6Address], port: int
) -> list[sockets.Socket]:
    """The TCP listeners that may take a connection to one of ``hosts`` on ``port``: bound to
    that address (or its IPv4-mapped form) or to a wildcard."""
    accepted = set(WILDCARDS)
    for host in hosts:
        accepted.add(host)
        if isinstance(host, IPv4Address):
            accepted.add(IPv6Address(f"::ffff:{host}"))
    return [s for s in table if s.protocol == "tcp" and s.port == port and s.address in accepted]


def api_owner_refusal(listeners: Iterable[sockets.Socket], trusted: frozenset[int], where: str) -> str | None:
    """Why no request may go to the API at ``where``, or None when every listener that could
    take it belongs to a ``trusted`` uid."""
    listeners = list(listeners)
    if not listeners:
        return f"nothing listens on {where} (the client is not up yet): nothing sent"
    for listener in listeners:
        if listener.uid not in trusted:
            return (
                f"{where} is held by uid {listener.uid}{_user_name(listener.uid)}, not by root or "
                "api_user: the credentials were not sent (set api_user if the client runs as that user)"
            )
    return None


def _user_name(uid: int) -> str:
    with contextlib.suppress(KeyError):
        return f" ({pwd.getpwuid(uid).pw_name})"
    return ""


def _uid_of(user: object) -> int:
    if isinstance(user, int) and not isinstance(user, bool) and 0 <= user < 2**32:
        return user
    if isinstance(user, str) and user:
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            raise ValueError(f"{user!r}: no such user") from None
    raise ValueError(f"{user!r}: the user (name or uid) the torrent client runs as")


class ApiGuard:
    """Checks, before each request, that a loopback API is served by a trusted user's program."""

    def __init__(self, url: str, api_uid: int | None) -> None:
        parsed = httpx.URL(url)
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.where = f"{parsed.host}:{self.port}"
        self.hosts = _loopback_hosts(parsed.host)
        trusted = {0, os.geteuid()}
        if api_uid is not None:
            trusted.add(api_uid)
        self.trusted = frozenset(trusted)

    async def check(self) -> None:
        """PushError unless the listener of a loopback API belongs to a trusted uid."""
        if not self.hosts:
            return  # not on loopback: another host's listener, which no table here shows
        table = await anyio.to_thread.run_sync(sockets.accepting_sockets, ("tcp",))
        refusal = api_owner_refusal(api_listeners(table, self.hosts, self.port), self.trusted, self.where)
        if refusal is not None:
            raise PushError(refusal)


def _loopback_hosts(host: str) -> tuple[IPv4Address | IPv6Address, ...]:
    if host == "localhost":
        return (IPv4Address("127.0.0.1"), IPv6Address("::1"))
    try:
        address = ip_address(host)
    except ValueError:
        return ()
    return (address,) if address.is_loopback else ()


# --- credentials ------------------------------------------------------------------------------


def read_secret(path: str | None, env: str | None) -> str | None:
    """The file's first line at ``path``, or the value of the variable named ``env``."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8").splitlines()[0] if Path(path).stat().st_size else ""
    if env is not None:
        if env not in os.environ:
            raise PushError(f"password_env: ${env} is not set")
        return os.environ[env]
    return None


# --- the clients (thin) -----------------------------------------------------------------------


class QBittorrent:
    """qBittorrent's Web API v2 with a login of its own (no reliance on the localhost bypass)."""

    name = "qbittorrent"

    def __init__(self, options: TorrentOptions) -> None:
        self.url = options.url.rstrip("/")
        self.options = options
        self.guard = ApiGuard(options.url, options.api_user)
        self._logged_in = False

    async def _login(self, http: httpx.AsyncClient) -> None:
        await self.guard.check()
        username = self.options.username or ""
        password = await anyio.to_thread.run_sync(
            read_secret, self.options.password_file, self.options.password_env
        )
        reply = await http.post(
            f"{self.url}/api/v2/auth/login", data={"username": username, "password": password or ""}
        )
        if reply.status_code != 200 or reply.text.strip() != "Ok.":
            raise PushError(f"login refused ({reply.status_code} {reply.text.strip()[:60]})")
        self._logged_in = True

    async def _call(self, http: httpx.AsyncClient, method: str, path: str, **kw: Any) -> httpx.Response:
        if not self._logged_in:
            await self._login(http)
        await self.guard.check()  # the session cookie is a credential too
        reply = await http.request(method, f"{self.url}/api/v2/{path}", **kw)
        if reply.status_code == 403:  # the session is gone (a restart): log in again once
            await self._login(http)
            reply = await http.request(method, f"{self.url}/api/v2/{path}", **kw)
        if reply.status_code != 200:
            raise PushError(f"{path}: HTTP {reply.status_code}")
        return reply

    async def port(self, http: httpx.AsyncClient) -> int:
        return qbittorrent_port((await self._call(http, "GET", "app/preferences")).json())

    async def set_port(self, http: httpx.AsyncClient, port: int) -> None:
        await self._call(http, "POST", "app/setPreferences", data=qbittorrent_set_body(port))

    async def bind(self, http: httpx.AsyncClient, tunnel: TunnelView) -> bool | None:
        """The network interface set to the tunnel's and read back; True when it was changed."""
        if not tunnel.interface:
            return False
        if (
            qbittorrent_interface((await self._call(http, "GET", "app/preferences")).json())
            == tunnel.interface
        ):
            return False
        await self._call(
            http, "POST", "app/setPreferences", data=qbittorrent_interface_body(tunnel.interface)
        )
        now = qbittorrent_interface((await self._call(http, "GET", "app/preferences")).json())
        if now != tunnel.interface:
            raise PushError(f"asked for network interface {tunnel.interface!r}, the client reports {now!r}")
        return True

    def binding(self, tunnel: TunnelView) -> str:
        return f"interface {tunnel.interface}"

    def forget(self) -> None:
        self._logged_in = False


class Transmission:
    """Transmission's RPC: session-get / session-set ``peer-port`` and the 409 session-id exchange."""

    name = "transmission"

    def __init__(self, options: TorrentOptions) -> None:
        self.url = options.url
        self.options = options
        self.guard = ApiGuard(options.url, options.api_user)
        self._session_id = ""

    async def _rpc(
        self, http: httpx.AsyncClient, method: str, arguments: Mapping[str, Any]
    ) -> dict[str, Any]:
        username = self.options.username
        auth = httpx.Auth()  # the base class sends a request as it is: no credentials
        if username is not None:
            password = await anyio.to_thread.run_sync(
                read_secret, self.options.password_file, self.options.password_env
            )
            auth = httpx.BasicAuth(username, password or "")
        body = transmission_request(method, arguments)
        for _ in range(2):
            await self.guard.check()  # Basic credentials ride on every request
            reply = await http.post(
                self.url, json=body, headers={"X-Transmission-Session-Id": self._session_id}, auth=auth
            )
            if reply.status_code == 409:  # a new (or restarted) daemon hands out a new id
                self._session_id = reply.headers.get("X-Transmission-Session-Id", "")
                continue
            if reply.status_code != 200:
                raise PushError(f"{method}: HTTP {reply.status_code}")
            return reply.json()
        raise PushError(f"{method}: the session id was refused twice")

    async def port(self, http: httpx.AsyncClient) -> int:
        return transmission_port(await self._rpc(http, "session-get", {"fields": ["peer-port"]}))

    async def set_port(self, http: httpx.AsyncClient, port: int) -> None:
        reply = await self._rpc(http, "session-set", {"peer-port": port, "peer-port-random-on-start": False})
        if reply.get("result") != "success":
            raise PushError(f"session-set: {reply.get('result')!r}")

    async def bind(self, http: httpx.AsyncClient, tunnel: TunnelView) -> bool | None:
        """``bind-address-ipv4`` set to the tunnel's address and read back; True when changed,
        None when this Transmission's RPC does not carry it (set it in settings.json then)."""
        address = tunnel.address_v4
        if address is None:
            return False
        fields = {"fields": ["bind-address-ipv4"]}
        now = transmission_bind_address(await self._rpc(http, "session-get", fields))
        if now is None:
            return None
        if now == str(address):
            return False
        await self._rpc(http, "session-set", {"bind-address-ipv4": str(address)})
        now = transmission_bind_address(await self._rpc(http, "session-get", fields))
        if now != str(address):
            raise PushError(f"asked for bind-address-ipv4 {address}, the client reports {now!r}")
        return True

    def binding(self, tunnel: TunnelView) -> str:
        return f"address {tunnel.address_v4}"

    def forget(self) -> None:
        self._session_id = ""


class Deluge:
    """Deluge through deluge-web's JSON-RPC: ``auth.login``, the Web UI connected to the daemon
    (``web.connect``), then ``core.get_config_value`` / ``core.set_config`` on the daemon. A
    restarted deluge-web forgets the login, a restarted deluged the connection: both renewed."""

    name = "deluge"

    def __init__(self, options: DelugeOptions) -> None:
        self.url = options.url
        self.daemon = options.daemon
        self.options = options
        self.guard = ApiGuard(options.url, options.api_user)
        self._logged_in = False
        self._ids = 0

    async def _call(self, http: httpx.AsyncClient, method: str, *params: Any) -> Any:
        self._ids += 1
        await self.guard.check()  # the password and the session cookie are credentials
        reply = await http.post(self.url, json=deluge_request(self._ids, method, *params))
        if reply.status_code != 200:
            raise PushError(f"{method}: HTTP {reply.status_code}")
        return deluge_result(reply.json(), method)

    async def _login(self, http: httpx.AsyncClient) -> None:
        password = await anyio.to_thread.run_sync(
            read_secret, self.options.password_file, self.options.password_env
        )
        if await self._call(http, "auth.login", password or "") is not True:
            raise PushError("deluge-web refused the password")
        self._logged_in = True

    async def _core(self, http: httpx.AsyncClient, method: str, *params: Any) -> Any:
        """A call to the daemon, logged in and connected first when needed."""
        for attempt in range(2):
            try:
                if not self._logged_in:
                    await self._login(http)
                if not await self._call(http, "web.connected"):
                    host = deluge_host_id(await self._call(http, "web.get_hosts"), self.daemon)
                    await self._call(http, "web.connect", host)
                    if not await self._call(http, "web.connected"):
                        raise PushError(f"deluge-web could not connect to deluged at {self.daemon}")
                return await self._call(http, method, *params)
            except DelugeNotAuthenticated:
                self._logged_in = False
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def port(self, http: httpx.AsyncClient) -> int:
        return deluge_port(await self._core(http, "core.get_config_value", "listen_ports"))

    async def set_port(self, http: httpx.AsyncClient, port: int) -> None:
        await self._core(http, "core.set_config", deluge_set_config(port))

    async def bind(self, http: httpx.AsyncClient, tunnel: TunnelView) -> bool | None:
        """``listen_interface`` and ``outgoing_interface`` set to the tunnel interface, read back."""
        if not tunnel.interface:
            return False
        keys = ["listen_interface", "outgoing_interface"]
        wanted = dict.fromkeys(keys, tunnel.interface)
        if await self._core(http, "core.get_config_values", keys) == wanted:
            return False
        await self._core(http, "core.set_config", wanted)
        now = await self._core(http, "core.get_config_values", keys)
        if now != wanted:
            raise PushError(f"asked for interface {tunnel.interface!r}, deluged reports {now!r}")
        return True

    def binding(self, tunnel: TunnelView) -> str:
        return f"interface {tunnel.interface}"

    def forget(self) -> None:
        self._logged_in = False


# --- the plugin -------------------------------------------------------------------------------


class PortPusher:
    def __init__(self, client: QBittorrent | Transmission | Deluge, options: TorrentOptions) -> None:
        self.client = client
        self.reassert_s = options.reassert_s
        self.retry_s = options.retry_s
        self.timeout_s = options.timeout_s
        self.bind_to_tunnel = options.bind_to_tunnel
        # The client shares this network namespace when its API is on loopback: then the kernel's
        # socket table says whether it really listens (a client that failed to bind still
        # reports the new port through its API).
        verify = options.verify_listening
        self.verify_listening = _is_loopback(client.url) if verify is None else verify

    async def bind(self, http: httpx.AsyncClient, tunnel: TunnelView) -> bool | None:
        """Bind the client to ``tunnel`` (when asked to): True when changed, None: unsupported."""
        if not self.bind_to_tunnel or not tunnel.connected:
            return False
        return await self.client.bind(http, tunnel)

    async def push(self, http: httpx.AsyncClient, port: int) -> bool:
        """Make the client listen on ``port``; True when it had to be changed."""
        changed = False
        if await self.client.port(http) != port:
            await self.client.set_port(http, port)
            now = await self.client.port(http)
            if now != port:
                raise PushError(f"asked for port {port}, the client reports {now}")
            changed = True
        if self.verify_listening and not await _listens(port):
            # The client took the port but did not bind it (it was busy at the time): setting the
            # same port again is a no-op for the clients, so step to a neighbour and back to make
            # them bind anew. The neighbour is not accepted through the tunnel: nothing is exposed.
            await self.client.set_port(http, port + 1 if port < 65535 else port - 1)
            await self.client.set_port(http, port)
            if not await _listens(port):
                raise PushError(f"the client reports port {port} but nothing listens on it")
            changed = True
        return changed

    async def run(self, ctx: PluginContext) -> None:
        port: int | None = None
        tunnel = ctx.view.tunnel
        due: float | None = None
        async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as http:
            while True:
                view = await ctx.next(None if due is None else due - time.monotonic())
                if view is not None:
                    new = view.forwarded.port if view.forwarded else None
                    same_tunnel = _binding(view.tunnel) == _binding(tunnel)
                    tunnel = view.tunnel
                    if new == port and same_tunnel and due is not None:
                        continue  # nothing new; keep the re-assert schedule
                    port = new
                if port is None and not (self.bind_to_tunnel and tunnel.connected):
                    due = None
                    continue
                try:
                    with anyio.fail_after(self.timeout_s * 3):
                        bound = await self.bind(http, tunnel)
                        changed = False if port is None else await self.push(http, port)
                except (httpx.HTTPError, PushError, OSError, ValueError, TimeoutError) as err:
                    self.client.forget()
                    error = describe(err)
                    ctx.log.warning("port push failed", client=self.client.name, port=port, error=error)
                    ctx.report(port=port, result="error", error=error, at=round(time.time(), 3))
                    due = time.monotonic() + self.retry_s
                    continue
                if changed:
                    ctx.log.info(
                        "client now listens on the forwarded port", client=self.client.name, port=port
                    )
                if bound:
                    ctx.log.info(
                        "client now bound to the tunnel",
                        client=self.client.name,
                        interface=tunnel.interface,
                        address=str(tunnel.address_v4),
                    )
                binding: JSON = None
                if self.bind_to_tunnel and tunnel.connected:
                    binding = "unsupported" if bound is None else self.client.binding(tunnel)
                ctx.report(
                    port=port,
                    result="ok",
                    changed=changed,
                    bound=binding,
                    at=round(time.time(), 3),
                    error=None,
                )
                due = time.monotonic() + self.reassert_s


def _binding(tunnel: TunnelView) -> tuple[bool, str, IPv4Address | None]:
    """What a client's binding depends on."""
    return tunnel.connected, tunnel.interface, tunnel.address_v4


def _is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


class Uid(int):
    """A user id; TOML gives it as the number or as the user's name, looked up when read."""

    @classmethod
    def parse_toml(cls, user: object) -> Uid:
        return cls(_uid_of(user))


class TorrentOptions(PluginOptions, frozen=True):
    """What both torrent-client plugins take."""

    url: str
    username: str | None = None
    password_file: str | None = None  # its first line
    password_env: str | None = None  # a variable of the daemon's environment
    reassert_s: Annotated[float, Meta(ge=0.2, le=86400)] = 15
    retry_s: Annotated[float, Meta(ge=0.1, le=3600)] = 2
    timeout_s: Annotated[float, Meta(ge=0.5, le=120)] = 10
    verify_listening: bool | None = None  # default: true for a loopback url
    bind_to_tunnel: bool = True  # the client's own binding: the tunnel interface (or its address)
    # The user (name or uid) the client runs as; held as its uid.
    api_user: Uid | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise FieldProblem("url", f"{self.url!r}: an http:// or https:// address")


class QBittorrentOptions(TorrentOptions, frozen=True):
    url: str = "http://127.0.0.1:8080"
    username: str | None = "admin"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.password_file is None and self.password_env is None:
            raise ValueError("set password_file or password_env (the localhost bypass is off by default)")


class TransmissionOptions(TorrentOptions, frozen=True):
    url: str = "http://127.0.0.1:9091/transmission/rpc"


class DelugeOptions(TorrentOptions, frozen=True):
    url: str = "http://127.0.0.1:8112/json"  # deluge-web's JSON-RPC
    daemon: str = "127.0.0.1:58846"  # deluged, as deluge-web's host list names it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.password_file is None and self.password_env is None:
            raise ValueError("set password_file or password_env (deluge-web's password)")


qbittorrent = PluginSpec(QBittorrentOptions, lambda options: PortPusher(QBittorrent(options), options))
transmission = PluginSpec(TransmissionOptions, lambda options: PortPusher(Transmission(options), options))
deluge = PluginSpec(DelugeOptions, lambda options: PortPusher(Deluge(options), options))
