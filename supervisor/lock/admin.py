"""The administrator's way in (``lock.admin_tcp``), and the lockout guard that decides, before the
lock changes, whether it would cut the SSH session a command runs in. Pure: data in, data out.

The path itself is rendered into the lock (``supervisor.lock.render``, the ``admin`` rule group)
and routed by one policy rule (``supervisor.net.admin_route``); both meet in ``ADMIN_MARK``:
the conntrack mark of a connection an administrator opened from outside to an admin port, copied
to the packet mark of its replies so that they follow the main table out of the physical
interface instead of the tunnel's routes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import ip_address

from msgspec import Struct

from supervisor.lock.onlink import onlink_lan
from supervisor.lock.policy import LockPolicy
from supervisor.net.routing_plan import ADMIN_MARK as ADMIN_MARK  # defined with its rule (see there)
from supervisor.servers import IPAddress

# What names the setting in every refusal (DESIGN.md: the guard names `lock.admin_tcp`).
ADMIN_SETTING = "lock.admin_tcp"


class SshSession(Struct, frozen=True):
    """The SSH connection a command runs in, as sshd describes it in ``SSH_CONNECTION``."""

    client: IPAddress
    client_port: int
    server: IPAddress
    server_port: int

    @classmethod
    def parse(cls, text: str | None) -> SshSession | None:
        """``client_ip client_port server_ip server_port``; None when unset or not that shape
        (a session the guard cannot read is one it cannot judge: see ``lockout``)."""
        if not text:
            return None
        parts = text.split()
        if len(parts) != 4:
            return None
        try:
            client, server = ip_address(parts[0].split("%")[0]), ip_address(parts[2].split("%")[0])
            client_port, server_port = int(parts[1]), int(parts[3])
        except ValueError:
            return None
        return cls(_unmapped(client), client_port, _unmapped(server), server_port)

    def __str__(self) -> str:
        return f"{self.client} port {self.client_port} to {self.server} port {self.server_port}"


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; the lock sees it as IPv4."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def admitted(policy: LockPolicy, session: SshSession) -> bool:
    """Whether ``policy`` lets ``session`` go on, judged as its rules do.

    ``policy.onlink`` must hold the host's on-link subnets (``read_onlink``): the LAN rules let
    in only what is on-link. A session over the tunnel is not judged here (the tunnel is not up
    when the lock is first applied); see ``lockout``.
    """
    if session.client.is_loopback or session.client == session.server:
        return True  # lo: always accepted
    if session.server_port in policy.admin_tcp and (
        not policy.admin_sources or any(session.client in net for net in policy.admin_sources)
    ):
        return True
    on_lan = any(session.client in net for net in onlink_lan(policy.lan_ranges, policy.onlink))
    return on_lan and (policy.allow_lan or session.server_port in policy.inbound_tcp)


def addresses_from_ip_json(links: Iterable[dict]) -> dict[IPAddress, str]:
    """Each local address and its interface, from ``ip -j addr show`` (pure: JSON in)."""
    out: dict[IPAddress, str] = {}
    for link in links:
        for info in link.get("addr_info", ()):
            try:
                out[ip_address(str(info.get("local", "")).split("%")[0])] = str(link.get("ifname", ""))
            except ValueError:
                continue
    return out


def lockout(
    policy: LockPolicy, ssh_connection: str | None, local_addresses: Mapping[IPAddress, str]
) -> str | None:
    """Why applying ``policy`` would cut the SSH session described by ``ssh_connection``
    (the environment's ``SSH_CONNECTION``), or None when it would not (or there is no session).

    ``local_addresses`` (address -> interface) are this network namespace's: a session whose
    server address is none of them does not pass this namespace's lock (a command run in a
    container or a lab namespace from an SSH session on the host). One that came in through the
    tunnel goes on when its port is one the tunnel accepts. A value that cannot be read is
    judged as cutting: the guard exists for the case where being wrong loses the host.
    """
    if ssh_connection is None or not ssh_connection.strip():
        return None
    session = SshSession.parse(ssh_connection)
    if session is None:
        return (
            f"SSH_CONNECTION={ssh_connection!r} cannot be read, so whether the lock keeps this "
            f"session cannot be told; allow its port with {ADMIN_SETTING}"
        )
    interface = local_addresses.get(session.server)
    if interface is None:
        return None
    if interface == policy.tunnel_interface:
        if ("tcp", session.server_port) in policy.tunnel_inbound:
            return None
    elif admitted(policy, session):
        return None
    ports = ", ".join(map(str, policy.admin_tcp)) or "none"
    sources = ", ".join(map(str, policy.admin_sources)) or "any"
    return (
        f"this SSH session ({session}) would be cut by the lock: {ADMIN_SETTING} is [{ports}] "
        f"from {sources}. Add {session.server_port} to {ADMIN_SETTING} (and its network to "
        "lock.admin_sources, if set) so the administrator keeps a way in, or pass --force if "
        "you have another way in (a console)"
    )
