"""Choosing the backend: ``tunnel.backend = auto | kernel | userspace``.

``auto`` keeps whatever already serves the interface (a restarted daemon must
adopt, not replace, a running tunnel), and otherwise prefers the kernel when it
has WireGuard: it is faster and has no process to die.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from supervisor.wireguard.backend import Report, WireGuardBackend, ignore_events
from supervisor.wireguard.uapi import UAPI_DIR
from supervisor.wireguard.userspace import link_exists, open_userspace_backend

if TYPE_CHECKING:  # namespace mode's placement, imported only where that mode is on
    from supervisor.net.netns import Placement

BackendKind = Literal["auto", "kernel", "userspace"]
_MODULE_DIR = Path("/sys/module/wireguard")


async def kernel_available(module_dir: Path = _MODULE_DIR) -> bool:
    """Whether this kernel speaks WireGuard: the module is loaded, or its netlink family answers.

    The family lookup also covers a built-in WireGuard and lets the kernel load the module on
    demand; no link is created to find out.
    """
    if await anyio.Path(module_dir).exists():
        return True
    # Imported here, like the kernel backend itself: a daemon on wireguard-go never needs the
    # generic netlink family's message classes.
    from pyroute2 import AsyncWireGuard
    from pyroute2.netlink.exceptions import NetlinkError

    wg = AsyncWireGuard()
    try:
        await wg.setup_endpoint()
    except NetlinkError as err:
        if err.code == errno.ENOENT:
            return False
        raise
    finally:
        wg.close()
    return True


def choose_backend(
    wanted: BackendKind, *, kernel: bool, uapi_served: bool, link_present: bool
) -> Literal["kernel", "userspace"]:
    """Pure choice: what ``wanted`` means given what the host has and what already runs.

    ``uapi_served``: a UAPI socket for our interface exists (wireguard-go served it);
    ``link_present``: a link with our interface's name exists.
    """
    if wanted != "auto":
        return wanted
    if uapi_served:
        return "userspace"  # a running wireguard-go: adopt it rather than replace it
    if link_present and kernel:
        return "kernel"
    return "kernel" if kernel else "userspace"


async def resolve_backend(wanted: BackendKind, ifname: str, uapi_dir: Path = UAPI_DIR) -> str:
    """The backend ``wanted`` means on this host for ``ifname`` right now."""
    kernel = await kernel_available() if wanted == "auto" else wanted == "kernel"
    return choose_backend(
        wanted,
        kernel=kernel,
        uapi_served=(uapi_dir / f"{ifname}.sock").exists(),
        link_present=link_exists(ifname),
    )


@contextlib.asynccontextmanager
async def open_backend(
    kind: str,
    ifname: str,
    report: Report = ignore_events,
    placement: Placement | None = None,
    **userspace: Any,
) -> AsyncIterator[WireGuardBackend]:
    """The backend of ``kind`` for the ``async with`` body; ``userspace`` options go to
    :func:`open_userspace_backend`. Leaving it leaves the interface as it is."""
    opened: contextlib.AbstractAsyncContextManager[WireGuardBackend]
    if kind == "kernel":
        from supervisor.wireguard.kernel import open_kernel_backend

        opened = open_kernel_backend(ifname, report=report, placement=placement)
    elif kind == "userspace":
        opened = open_userspace_backend(ifname, report=report, placement=placement, **userspace)
    else:
        raise ValueError(f"unknown backend {kind!r}: auto, kernel or userspace")
    async with opened as backend:
        yield backend
