"""Plugins that misbehave on purpose, for tests/lab/test_port_forwarding.py (named by import path)."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from supervisor.plugins import PluginContext


class Raises:
    async def run(self, ctx: PluginContext) -> None:
        await ctx.next()
        raise RuntimeError("this plugin always fails")


class Hangs:
    async def run(self, ctx: PluginContext) -> None:
        await ctx.next()
        await anyio.sleep_forever()  # never comes back to ctx.next()


class Floods:
    """Asks for a new port as fast as it can, and reports as fast as it can."""

    async def run(self, ctx: PluginContext) -> None:
        port = 1
        while True:
            view = await ctx.next(timeout=0)
            if view is not None or ctx.view.tunnel.connected:
                port = port % 60000 + 1
                await ctx.forward_ports([port, port + 1])
                ctx.report(asked=port)
            await anyio.lowlevel.checkpoint()


def raises(options) -> Raises:
    return Raises()


def hangs(options) -> Hangs:
    return Hangs()


def floods(options) -> Floods:
    return Floods()
