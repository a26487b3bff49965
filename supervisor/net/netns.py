"""Namespace mode: the tunnel in a network namespace whose only way out is the tunnel.

With ``[tunnel] namespace = "NAME"`` the daemon splits in two places:

- **the host** (the namespace the daemon was started in) keeps only the tunnel's own UDP: the
  WireGuard socket stays where the interface was created (the kernel's link is created from a
  host netlink socket straight into the app namespace; wireguard-go runs in the host and its TUN
  device is moved in), and the path monitor looks up the endpoints' routes there. Nothing else of
  the host is touched: no lock, no routes, no resolver changes.
- **the app namespace** ``/run/netns/NAME`` holds the tunnel interface, loopback, the lock, the
  tunnel's routes and its resolvers (``/etc/netns/NAME/resolv.conf``, which ``ip netns exec``,
  ``tunlock exec`` and the ``tunlock systemd join`` drop-in put over ``/etc/resolv.conf``).

The daemon's main thread enters the app namespace before anything else runs (:func:`enter`), so
every socket, thread and libnftables context made afterwards belongs there by default: the lock,
the routes, the prober, the plugins (the NAT-PMP gateway is reached through the tunnel, the
torrent client's web API on the namespace's loopback) need no change. The few things that belong
to the host are made explicitly through :class:`Placement`: each runs in a fresh thread that
enters the host namespace and ends with its job, so no thread ever goes back and forth (a thread
left in the wrong namespace by a failed switch back could apply the lock on the host).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
from pyroute2 import AsyncIPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from supervisor.errors import SafetyError, TunlockError
from supervisor.log import get_logger
from supervisor.safety import LAB_NETNS_PREFIX, current_lab_namespace, lab_only

log = get_logger(__name__)

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
_T = TypeVar("_T")


class NamespaceError(TunlockError):
    """The app namespace cannot be created, entered or used; the message says why."""


def namespace_path(name: str) -> Path:
    """Where the namespace is pinned, for ``ip netns``, systemd and podman."""
    return NETNS_RUN_DIR / name


def resolv_conf_path(name: str) -> Path:
    """The namespace's own resolv.conf (``ip netns exec`` binds it over ``/etc/resolv.conf``)."""
    return NETNS_ETC_DIR / name / "resolv.conf"


def managed_resolv_conf(configured: Path, namespace: str | None) -> Path:
    """The resolver file tunlock keeps pointed at the tunnel: the configured one for the whole
    host, the namespace's own in namespace mode (the host's is left alone there)."""
    return resolv_conf_path(namespace) if namespace else configured


def netns_id(path: str | Path) -> tuple[int, int]:
    """Identity of the network namespace at ``path`` (an nsfs file or a /proc link)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_namespace(path: Path) -> bool:
    """Whether ``path`` is a pinned network namespace (an nsfs bind mount), not a plain file."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def check_lab_name(name: str) -> None:
    """With ``TUNLOCK_LAB_ONLY`` set, refuse a namespace the lab did not name, or a host that is
    not a lab namespace: nothing outside the lab's namespaces may be created or touched."""
    if not lab_only():
        return
    if not name.startswith(LAB_NETNS_PREFIX):
        raise SafetyError(
            f"TUNLOCK_LAB_ONLY is set and namespace {name!r} is not a lab namespace "
            f"({LAB_NETNS_PREFIX}<id>-...): refusing to create or enter it"
        )
    if current_lab_namespace() is None:
        raise SafetyError(
            "TUNLOCK_LAB_ONLY is set and this process is not in a lab network namespace: "
            "namespace mode's host side must be a lab namespace too"
        )


def ensure_namespace(name: str) -> bool:
    """Create ``/run/netns/NAME`` and ``/etc/netns/NAME/resolv.conf`` unless they exist; True
    when the namespace was created now.

    ``ip netns add`` does the pinning as every other tool expects it (a shared ``/run/netns``
    mount). It runs in PID 1's mount namespace when ours is another one (a service with private
    mounts, ``ip netns exec``): a pin made in a private mount namespace would be seen by nobody.
    """
    check_lab_name(name)
    created = False
    path = namespace_path(name)
    if not _is_namespace(path):
        command = ["ip", "netns", "add", name]
        try:
            if netns_id("/proc/self/ns/mnt") != netns_id("/proc/1/ns/mnt"):
                command = ["nsenter", "--mount=/proc/1/ns/mnt", "--", *command]
        except OSError:
            pass  # PID 1's namespaces hidden (a sandbox): ours is the one to use
        _run(command)
        created = True
        log.info("created the network namespace", namespace=name, path=str(path))
        if _pins_stay_private():
            log.warning(
                "the namespace was pinned in a private mount namespace: programs outside this one "
                "will not find it; create it beforehand (ip netns add NAME) or run tunlock without "
                "private mounts",
                namespace=name,
            )
    resolv = resolv_conf_path(name)
    resolv.parent.mkdir(parents=True, exist_ok=True)
    # Present from the start: `ip netns exec` binds it only if it exists (programs would read the
    # host's resolvers otherwise, which the namespace cannot reach anyway).
    if not resolv.exists():
        resolv.write_text("")
    return created


def _pins_stay_private() -> bool:
    """Whether a mount made under /run/netns here stays in this mount namespace: /run/netns is a
    slave (``ip netns exec``, a service with private mounts) that does not propagate back."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" - ")[0].split()
        if len(fields) > 4 and fields[4] == str(NETNS_RUN_DIR):
            tags = fields[6:]
            return not any(tag.startswith("shared:") for tag in tags)
    return False


def _run(command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        raise NamespaceError(f"{command[0]} is not installed; namespace mode needs iproute2 and util-linux")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()
        raise NamespaceError(f"{' '.join(command)} failed: {said}")


@dataclass(frozen=True)
class Placement:
    """The two namespaces of namespace mode, as open descriptors (see the module docstring)."""

    name: str
    host_fd: int
    app_fd: int

    @property
    def host_id(self) -> tuple[int, int]:
        return netns_id(f"/proc/self/fd/{self.host_fd}")

    @property
    def app_id(self) -> tuple[int, int]:
        return netns_id(f"/proc/self/fd/{self.app_fd}")

    def run_in_host(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in a fresh thread inside the host namespace (blocking until it ends).

        Sockets and child processes it makes belong to the host; the thread ends with it.
        """
        outcome: list[_T] = []
        failure: list[BaseException] = []

        def body() -> None:
            try:
                pyroute2_netns.setns(self.host_fd, flags=0)
                outcome.append(fn(*args))
            except BaseException as err:  # handed to the caller below
                failure.append(err)

        thread = threading.Thread(target=body, name="tunlock-host-netns", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    async def in_host(self, fn: Callable[..., _T], *args: object) -> _T:
        """:meth:`run_in_host` off the event loop."""
        return await anyio.to_thread.run_sync(lambda: self.run_in_host(fn, *args))

    async def host_route(self) -> AsyncIPRoute:
        """An rtnetlink socket of the host namespace (``async with`` it)."""
        sock = await self.in_host(socket.socket, socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
        return AsyncIPRoute(fileno=sock.detach())

    async def move_in(self, ifname: str) -> bool:
        """Move the host's link ``ifname`` into the app namespace; False when the host has none."""
        async with await self.host_route() as ipr:
            found = await ipr.link_lookup(ifname=ifname)
            if not found:
                return False
            try:
                await ipr.link("set", index=found[0], net_ns_fd=self.app_fd)
            except NetlinkError as err:
                raise NamespaceError(f"cannot move {ifname} into namespace {self.name}: {err}") from None
        log.info("moved the tunnel interface into the namespace", ifname=ifname, namespace=self.name)
        return True


def enter(name: str) -> Placement:
    """Create the namespace if needed and move the calling thread into it.

    Call it from the main thread before any other thread exists (before the event loop): threads
    inherit the namespace of the thread that starts them.
    """
    if threading.active_count() != 1:
        # One of them could go on in the host namespace and do there what belongs inside.
        raise NamespaceError("the namespace must be entered before any other thread starts")
    ensure_namespace(name)
    host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        app_fd = os.open(namespace_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        os.close(host_fd)
        raise NamespaceError(f"cannot open {namespace_path(name)}: {err.strerror}") from None
    if netns_id(f"/proc/self/fd/{host_fd}") == netns_id(f"/proc/self/fd/{app_fd}"):
        os.close(host_fd)
        os.close(app_fd)
        raise NamespaceError(f"the daemon already runs inside namespace {name}: start it on the host")
    pyroute2_netns.setns(app_fd, flags=0)
    return Placement(name, host_fd, app_fd)


async def loopback_up() -> None:
    """Loopback up in the namespace this thread is in: a program inside talks to itself over it
    (a torrent client's web UI, tunlock's pushers), and a new namespace has it down."""
    async with AsyncIPRoute() as ipr:
        found = await ipr.link_lookup(ifname="lo")
        if found:
            await ipr.link("set", index=found[0], state="up")
