"""The forwarded port in a file, for programs that read it (``[plugins.portfile] path``).

The file holds the port and a newline while a port is forwarded, and is removed as soon as none
is (a new connection, offline, stop): a reader never sees a port that no longer reaches it.
Every write is atomic (a temporary file in the same directory, then a rename), and file I/O
runs in a thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio

from supervisor.plugins import PluginContext, PluginOptions, PluginSpec
from supervisor.tables import FieldProblem


def write_port_file(path: Path, ports: Sequence[int] | None, mode: int = 0o644) -> None:
    """Write ``ports`` (first one on the first line, one per line) atomically; None removes it."""
    if not ports:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write("".join(f"{port}\n" for port in ports))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


class PortFileOptions(PluginOptions, frozen=True):
    path: Path

    def __post_init__(self) -> None:
        if not self.path.is_absolute():
            raise FieldProblem("path", "an absolute file path, such as /run/tunlock/forwarded_port")


class PortFilePlugin:
    def __init__(self, options: PortFileOptions) -> None:
        self.path = options.path

    async def run(self, ctx: PluginContext) -> None:
        written: tuple[int, ...] | None = ()
        while True:
            view = await ctx.next()
            assert view is not None
            stopping = view.tunnel.state in ("stopping", "stopped")
            ports = view.forwarded.ports if view.forwarded and not stopping else None
            if ports == written:
                continue
            await anyio.to_thread.run_sync(write_port_file, self.path, ports)
            written = ports
            ctx.report(path=str(self.path), port=ports[0] if ports else None)


factory = PluginSpec(PortFileOptions, PortFilePlugin)
