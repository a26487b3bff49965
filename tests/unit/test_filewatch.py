"""Waking up on a file's changes: written in place, replaced by a rename, other files ignored."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from supervisor.net.filewatch import file_changes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _next_change(changes) -> None:
    with anyio.fail_after(5):  # a guard against hanging, not a measured limit
        await anext(changes)


async def test_a_write_in_place_and_a_replacing_rename_are_both_seen(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.1\n")
    async with file_changes(path) as changes:
        waiting = anyio.Event()

        async def watch(seen: list[str]) -> None:
            it = aiter(changes)
            for kind in ("in place", "renamed over", "in place again"):
                waiting.set()
                await _next_change(it)
                seen.append(kind)

        seen: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, seen)
            await waiting.wait()
            (tmp_path / "other").write_text("unrelated\n")  # another file of the directory
            path.write_text("nameserver 192.0.2.53\n")
            await _wait_for(seen, 1)
            new = tmp_path / "resolv.conf.new"
            new.write_text("nameserver 192.0.2.54\n")
            os.replace(new, path)
            await _wait_for(seen, 2)
            path.write_text("nameserver 192.0.2.55\n")  # the replacing file is watched in turn
            await _wait_for(seen, 3)
    assert seen == ["in place", "renamed over", "in place again"]


async def _wait_for(seen: list[str], count: int) -> None:
    with anyio.fail_after(5):
        while len(seen) < count:
            await anyio.sleep(0.01)
