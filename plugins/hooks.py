"""Commands run on changes: ``on_port`` (every new forwarded port, not only the first),
``on_connected`` (every new connection) and ``on_disconnected`` (leaving ``connected``).

Arguments may hold ``{port}``, ``{ports}`` (comma-separated), ``{interface}`` and ``{server}``;
they are substituted per argument and the command runs without a shell. A command that names a
shell itself (``["sh", "-c", "... {server} ..."]``) has the value pasted into shell code, which is
why every value is of a restricted alphabet: digits and commas, an interface name, a server name
(letters, digits, ``.``, ``_``, ``-``; supervisor.wgquick refuses any other file name). The same
values are also in the command's environment (``TUNLOCK_PORT``, ``TUNLOCK_PORTS``,
``TUNLOCK_INTERFACE``, ``TUNLOCK_SERVER``), the way a shell script should read them (quoted).
Each command is a child process awaited asynchronously (never blocking the event loop) and
killed when it outlives ``timeout_s``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from typing import Annotated

import anyio
from msgspec import Meta

from supervisor.errors import describe
from supervisor.plugins import PluginContext, PluginOptions, PluginSpec, View

HOOKS = ("on_port", "on_connected", "on_disconnected")


def placeholders(view: View) -> dict[str, str]:
    ports = view.forwarded.ports if view.forwarded else ()
    return {
        "port": str(ports[0]) if ports else "",
        "ports": ",".join(map(str, ports)),
        "interface": view.tunnel.interface,
        "server": view.tunnel.server or "",
    }


def expand(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Each argument with the placeholders filled in (``{{`` for a literal brace)."""
    return [arg.format_map(values) for arg in argv]


def environment(values: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment plus each placeholder's value as ``TUNLOCK_<NAME>``."""
    return {**os.environ, **{f"TUNLOCK_{name.upper()}": value for name, value in values.items()}}


async def run_hook(
    argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """(exit status or None when killed at the timeout, the output's tail)."""
    async with await anyio.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
    ) as process:
        output = b""
        with anyio.move_on_after(timeout) as scope:
            assert process.stdout is not None
            async for chunk in process.stdout:
                output = (output + chunk)[-2000:]
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
            return None, output.decode(errors="replace")
        return process.returncode, output.decode(errors="replace")


class Command(tuple[str, ...]):
    """A command as its arguments: TOML gives a list of them, or a string split like a shell
    would (no shell runs it)."""

    __slots__ = ()

    @classmethod
    def parse_toml(cls, value: object) -> Command:
        if isinstance(value, str):
            value = shlex.split(value)  # its ValueError ("No closing quotation") says what is wrong
        if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
            raise ValueError("a command, as a string or a list of arguments")
        try:
            expand(value, dict.fromkeys(("port", "ports", "interface", "server"), ""))
        except (KeyError, ValueError, IndexError) as err:
            raise ValueError(f"{' '.join(value)}: unknown placeholder {err}") from None
        return cls(value)


class HooksOptions(PluginOptions, frozen=True):
    on_port: Command | None = None
    on_connected: Command | None = None
    on_disconnected: Command | None = None
    timeout_s: Annotated[float, Meta(ge=0.1, le=3600)] = 10

    def __post_init__(self) -> None:
        if not any(getattr(self, hook) for hook in HOOKS):
            raise ValueError(f"set at least one of {', '.join(HOOKS)}")


class HooksPlugin:
    def __init__(self, options: HooksOptions) -> None:
        self.commands: dict[str, Command | None] = {hook: getattr(options, hook) for hook in HOOKS}
        self.timeout_s = options.timeout_s

    async def _fire(self, ctx: PluginContext, hook: str, view: View) -> None:
        argv = self.commands[hook]
        if argv is None:
            return
        values = placeholders(view)
        command = expand(argv, values)
        try:
            status, output = await run_hook(command, self.timeout_s, environment(values))
        except OSError as err:
            status, output = -1, describe(err)
        if status is None:
            ctx.log.error("hook killed at its timeout", hook=hook, timeout_s=self.timeout_s)
        elif status != 0:
            ctx.log.warning("hook failed", hook=hook, status=status, output=output[-500:])
        else:
            ctx.log.info("hook ran", hook=hook)
        ctx.report(**{hook: {"status": status, "killed": status is None}})

    async def run(self, ctx: PluginContext) -> None:
        session, ports, connected = 0, None, False
        while True:
            view = await ctx.next()
            assert view is not None
            tunnel = view.tunnel
            if tunnel.connected and tunnel.session != session:
                session, connected = tunnel.session, True
                await self._fire(ctx, "on_connected", view)
            elif not tunnel.connected and connected:
                connected = False
                await self._fire(ctx, "on_disconnected", view)
            new_ports = view.forwarded.ports if view.forwarded else None
            if new_ports and new_ports != ports:
                await self._fire(ctx, "on_port", view)
            ports = new_ports


factory = PluginSpec(HooksOptions, HooksPlugin)
