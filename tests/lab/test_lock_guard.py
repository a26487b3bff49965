"""Tampering with the lock while the guard runs: restored, and nothing leaks meanwhile."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest

from supervisor.config import load_config
from supervisor.lab.probes import describe
from supervisor.lab.topology import INTERNET_V4, sh
from supervisor.lock import nft
from supervisor.lock.configured import policy_from_config
from supervisor.lock.guard import LockGuard

pytestmark = pytest.mark.lab

TAMPERING = {
    "flush ruleset": ["nft", "flush", "ruleset"],
    "delete table": ["nft", "delete", "table", "inet", "tunlock"],
    "flush output chain": ["nft", "flush", "chain", "inet", "tunlock", "output"],
    "accept-all rule on top": ["nft", "insert", "rule", "inet", "tunlock", "output", "accept"],
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_guard_restores_the_lock_and_reports_it(lab, name):
    policy = policy_from_config(load_config(Path(lab.lab.config_path), {}))
    reports: list[str] = []
    restored_after: list[float] = []

    async def scenario() -> None:
        async def on_tamper(reason: str) -> None:
            reports.append(reason)

        guard = LockGuard(policy, on_tamper)
        async with anyio.create_task_group() as tg:
            await guard.apply()
            await tg.start(guard.run)
            mark = lab.observer.mark()
            pinger = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    lab.lab.ns("client"),
                    "ping",
                    "-n",
                    "-q",
                    "-i",
                    "0.002",
                    "-w",
                    "1",
                    INTERNET_V4,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await anyio.sleep(0.1)
            start = time.perf_counter()
            await anyio.to_thread.run_sync(
                lambda: sh("ip", "netns", "exec", lab.lab.ns("client"), *TAMPERING[name])
            )
            with anyio.fail_after(5):
                while not reports:
                    await anyio.sleep(0.001)
            restored_after.append(time.perf_counter() - start)
            await anyio.to_thread.run_sync(pinger.wait)
            leaks = lab.observer.leaks(since=mark)
            assert leaks == [], f"leaked while the lock was tampered with:\n{describe(leaks)}"
            tg.cancel_scope.cancel()

    def in_client() -> None:
        with lab.lab.inside("client"):
            anyio.run(scenario)

    worker = threading.Thread(target=in_client)
    worker.start()
    worker.join(30)
    try:
        assert reports and reports[0].startswith("the lock table was")
        with lab.lab.inside("client"):
            assert nft.status(policy.table).matches(policy)
        print(f"\n{name}: restored in {restored_after[0] * 1000:.0f} ms")
    finally:
        sh(
            "ip",
            "netns",
            "exec",
            lab.lab.ns("client"),
            "nft",
            "delete",
            "table",
            "inet",
            "tunlock",
            check=False,
        )
