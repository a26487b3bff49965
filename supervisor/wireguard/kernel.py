"""The kernel backend: Linux's own WireGuard, over generic netlink (pyroute2's AsyncWireGuard).

The interface is a ``wireguard`` link created over rtnetlink; keys, fwmark and
peers are set with ``WG_CMD_SET_DEVICE`` and read with ``WG_CMD_GET_DEVICE``.
pyroute2's ``AsyncWireGuard.set`` sets one peer at a time and has no way to
pass ``WGDEVICE_F_REPLACE_PEERS``, so the messages are built here (with
pyroute2's own ``wgmsg`` definition) and sent on its socket: a swap is then one
message that replaces all peers by the new one, exactly like the userspace
backend's single UAPI ``set``. Building and parsing are pure functions, tested
without the module; the rest runs where the module exists (the VM tier).

A kernel link cannot die on its own; it can only be deleted, which the
rtnetlink monitor reports (``supervisor.net.monitor``), so this backend reports
no events of its own.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator, Iterable
from ipaddress import ip_address
from socket import AF_INET, AF_INET6
from typing import TYPE_CHECKING, Any

from pyroute2 import AsyncIPRoute, AsyncWireGuard
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGDEVICE_F_REPLACE_PEERS,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from supervisor.log import get_logger
from supervisor.net.links import collect
from supervisor.servers import Endpoint
from supervisor.wireguard.backend import (
    BackendError,
    DeviceConfig,
    InterfaceTaken,
    Report,
    TunnelStats,
    handshake_age,
    ignore_events,
)

if TYPE_CHECKING:  # namespace mode's placement, imported only where that mode is on
    from supervisor.net.netns import Placement

log = get_logger(__name__)

LINK_KIND = "wireguard"


# --- messages (pure) ---------------------------------------------------------------------------


def _allowed_ip(network: Any) -> dict[str, list]:
    family = AF_INET if network.version == 4 else AF_INET6
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", network.network_address.packed],
            ["WGALLOWEDIP_A_CIDR_MASK", network.prefixlen],
        ]
    }


def set_device_message(ifname: str, config: DeviceConfig) -> wgmsg:
    """One ``WG_CMD_SET_DEVICE`` that makes ``config`` the device's whole configuration.

    ``WGDEVICE_F_REPLACE_PEERS`` with the single new peer: the kernel applies it under one lock,
    so no packet sees the device with no peer or with two.
    """
    peer = config.peer
    peer_attrs: list[list] = [
        ["WGPEER_A_PUBLIC_KEY", peer.public_key],
        ["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS],
        ["WGPEER_A_ENDPOINT", {"addr": str(peer.endpoint.host), "port": peer.endpoint.port}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.persistent_keepalive or 0],
        ["WGPEER_A_ALLOWEDIPS", [_allowed_ip(n) for n in peer.allowed_ips]],
    ]
    if peer.preshared_key is not None:
        peer_attrs.insert(1, ["WGPEER_A_PRESHARED_KEY", peer.preshared_key.reveal()])
    attrs: list[list] = [
        ["WGDEVICE_A_IFNAME", ifname],
        ["WGDEVICE_A_FLAGS", WGDEVICE_F_REPLACE_PEERS],
        ["WGDEVICE_A_PRIVATE_KEY", config.private_key.reveal()],
        ["WGDEVICE_A_FWMARK", config.fwmark],
    ]
    if config.listen_port is not None:
        attrs.append(["WGDEVICE_A_LISTEN_PORT", config.listen_port])
    attrs.append(["WGDEVICE_A_PEERS", [{"attrs": peer_attrs}]])
    return _message(WG_CMD_SET_DEVICE, attrs)


def remove_peers_message(ifname: str) -> wgmsg:
    """A ``WG_CMD_SET_DEVICE`` that removes every peer and keeps the device."""
    return _message(
        WG_CMD_SET_DEVICE, [["WGDEVICE_A_IFNAME", ifname], ["WGDEVICE_A_FLAGS", WGDEVICE_F_REPLACE_PEERS]]
    )


def get_device_message(ifname: str) -> wgmsg:
    return _message(WG_CMD_GET_DEVICE, [["WGDEVICE_A_IFNAME", ifname]])


def _message(cmd: int, attrs: list[list]) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = cmd
    msg["version"] = WG_GENL_VERSION
    msg["attrs"] = attrs
    return msg


def _key(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def stats_from_messages(messages: Iterable[Any], now: float | None = None) -> TunnelStats:
    """A ``WG_CMD_GET_DEVICE`` dump (one or more messages) as TunnelStats of its first peer."""
    listen_port = fwmark = None
    peers: list[Any] = []
    for msg in messages:
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT", listen_port)
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK", fwmark)
        peers.extend(msg.get_attr("WGDEVICE_A_PEERS") or [])
    if not peers:
        return TunnelStats.no_peer(listen_port, fwmark)
    peer = peers[0]
    endpoint = None
    raw_endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    if raw_endpoint and raw_endpoint.get("port"):
        host = ip_address(raw_endpoint["addr"])
        if not host.is_unspecified:
            endpoint = Endpoint(host, raw_endpoint["port"])
    last = None
    handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    if handshake and (handshake.get("tv_sec") or handshake.get("tv_nsec")):
        last = handshake["tv_sec"] + handshake["tv_nsec"] / 1e9
    return TunnelStats(
        public_key=_key(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
        endpoint=endpoint,
        last_handshake=last,
        handshake_age_s=handshake_age(last, now),
        rx_bytes=peer.get_attr("WGPEER_A_RX_BYTES") or 0,
        tx_bytes=peer.get_attr("WGPEER_A_TX_BYTES") or 0,
        listen_port=listen_port,
        fwmark=fwmark,
    )


# --- the backend ----------------------------------------------------------------------------


class KernelUnavailable(BackendError):
    """This kernel has no WireGuard (module missing or not loadable)."""


class KernelBackend:
    """Kernel WireGuard for one interface; :func:`open_kernel_backend` gives one with its socket.

    Without a generic netlink socket (``wg``) only the rtnetlink half works: adopt, create and
    delete the link, which needs no WireGuard module.
    """

    kind = "kernel"

    def __init__(
        self,
        ifname: str,
        *,
        report: Report = ignore_events,
        wg: AsyncWireGuard | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.ifname = ifname
        self._placement = placement
        self._report = report  # a kernel link does not die on its own: nothing to report
        self._wg = wg
        self._log = log.bind(ifname=ifname, backend=self.kind)

    @property
    def _socket(self) -> AsyncWireGuard:
        if self._wg is None:
            raise RuntimeError("KernelBackend is used without its netlink socket (open_kernel_backend)")
        return self._wg

    async def _link_kind(self) -> str | None:
        """The kind of our link (None when there is no such link)."""
        async with AsyncIPRoute() as ipr:
            try:
                links = await collect(await ipr.link("get", ifname=self.ifname))
            except NetlinkError as err:
                if err.code == errno.ENODEV:
                    return None
                raise
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            return (info.get_attr("IFLA_INFO_KIND") if info else None) or "unknown"
        return None

    async def adopt(self) -> bool:
        kind = await self._link_kind()
        if kind is None:
            return False
        if kind != LINK_KIND:
            raise InterfaceTaken(
                f"interface {self.ifname} exists and is a {kind!r} link, not WireGuard: pick another "
                "tunnel.interface or delete that link"
            )
        self._log.info("adopted the existing kernel WireGuard interface")
        return True

    async def ensure_interface(self) -> bool:
        if await self.adopt():
            return False
        # Namespace mode: asked from a host netlink socket and created straight in the app
        # namespace; the kernel keeps WireGuard's UDP socket in the namespace that asked.
        where = {} if self._placement is None else {"net_ns_fd": self._placement.app_fd}
        async with AsyncIPRoute() if self._placement is None else await self._placement.host_route() as ipr:
            try:
                await ipr.link("add", ifname=self.ifname, kind=LINK_KIND, **where)
            except NetlinkError as err:
                if err.code == errno.EOPNOTSUPP:
                    raise KernelUnavailable(
                        "this kernel cannot create wireguard links: load the module or use the "
                        "userspace backend"
                    ) from None
                raise BackendError(f"cannot create {self.ifname}: {err}") from None
        self._log.info("created the kernel WireGuard interface")
        return True

    async def _set(self, msg: wgmsg) -> None:
        sock = self._socket
        try:
            async for _ in await sock.nlm_request(
                msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK
            ):
                pass
        except NetlinkError as err:
            # err carries errno and strerror only: never the message, which holds the key.
            raise BackendError(
                f"the kernel refused the WireGuard settings for {self.ifname}: {err}"
            ) from None

    async def configure(self, config: DeviceConfig) -> None:
        await self._set(set_device_message(self.ifname, config))

    async def remove_peer(self) -> None:
        await self._set(remove_peers_message(self.ifname))

    async def stats(self) -> TunnelStats:
        sock = self._socket
        try:
            reply = await sock.nlm_request(get_device_message(self.ifname), msg_type=sock.prid)
            messages = [msg async for msg in reply]
        except NetlinkError as err:
            raise BackendError(f"cannot read WireGuard {self.ifname} from the kernel: {err}") from None
        return stats_from_messages(messages)

    async def close(self, keep_interface: bool) -> None:
        if keep_interface:
            return
        async with AsyncIPRoute() as ipr:
            try:
                await ipr.link("del", ifname=self.ifname)
            except NetlinkError as err:
                if err.code != errno.ENODEV:
                    raise BackendError(f"cannot delete {self.ifname}: {err}") from None
        self._log.info("deleted the interface")


@contextlib.asynccontextmanager
async def open_kernel_backend(
    ifname: str, *, report: Report = ignore_events, placement: Placement | None = None
) -> AsyncIterator[KernelBackend]:
    """The kernel backend for ``ifname`` with its generic netlink socket open for the body.

    Raises KernelUnavailable when this kernel has no WireGuard. Leaving it closes the socket and
    leaves the interface as it is.
    """
    wg = AsyncWireGuard()
    try:
        try:
            await wg.setup_endpoint()
        except NetlinkError as err:
            if err.code == errno.ENOENT:
                raise KernelUnavailable(
                    "this kernel has no WireGuard (generic netlink family 'wireguard' not found): "
                    'load the module (modprobe wireguard) or set tunnel.backend = "userspace"'
                ) from None
            raise BackendError(f"cannot open the kernel's WireGuard netlink: {err}") from None
        yield KernelBackend(ifname, report=report, wg=wg, placement=placement)
    finally:
        wg.close()
