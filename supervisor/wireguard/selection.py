"""Choosing the backend: ``tunnel.backend = auto | kernel | userspace``.

``auto`` keeps whatever already serves the interface (a restarted daemon must
adopt, not replace, a running tunnel), and otherwise prefers the kernel when it
has WireGuard: it is faster and has no process to die.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from supervisor.wireguard.backend import Report, WireGuardBackend, ignore_events
from supervisor.wireguard.kernel_module import kernel_has_wireguard
from supervisor.wireguard.uapi import UAPI_DIR
from supervisor.wireguard.userspace import link_exists, open_userspace_backend

if TYPE_CHECKING:  # namespace mode's placement, imported only where that mode is on
    from supervisor.net.netns import Placement

BackendKind = Literal["auto", "kernel", "userspace"]


async def kernel_available() -> bool:
    """Whether this kernel speaks WireGuard (supervisor/wireguard/kernel_module.py), asked in a
    worker thread: the kernel may load a module meanwhile."""
    return await anyio.to_thread.run_sync(kernel_has_wireguard)


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
