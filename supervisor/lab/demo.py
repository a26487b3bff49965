"""``tunlock demo``: the lab, the lock and the observer, with a timeline and the leak count.

Until the supervisor daemon lands, the demo shows the lock on its own: what the ISP sees of
the client without it, with it, with it and a tunnel, while the endpoint is swapped, and while
another program flushes the ruleset under the guard. Everything runs in lab namespaces that
the demo builds and removes; the machine's own namespace is never touched.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import anyio

from supervisor.config import load_config
from supervisor.lab.probes import ContinuousPing, Observer, Probes
from supervisor.lab.topology import INTERNET_V4, Lab, sh
from supervisor.lab.tunnel import hand_tunnel
from supervisor.lock import nft
from supervisor.lock.guard import LockGuard
from supervisor.lock.policy import policy_from_config
from supervisor.safety import LAB_ONLY_ENV


def run_demo(echo: Callable[[str], None] = print) -> int:
    """Run the demo; return the total leak count with the lock in place (0 is the promise)."""
    os.environ[LAB_ONLY_ENV] = "1"
    start = time.monotonic()

    def say(text: str) -> None:
        echo(f"[{time.monotonic() - start:6.2f} s] {text}")

    with Lab.up(servers=3) as lab:
        say(f"lab {lab.id} up: client, isp (observer), internet, 3 WireGuard servers")
        observer, probes = Observer.start(lab), Probes(lab)
        config = load_config(lab.config_path, {})
        policy = policy_from_config(config)

        mark = observer.mark()
        answered = sum(probes.every_kind().values())
        open_leaks = len(observer.leaks(since=mark))
        say(f"no lock: {answered} of 11 probe kinds answered; the ISP saw {open_leaks} leaked packets")

        with lab.inside("client"):
            nft.apply(policy)
        mark = observer.mark()
        answered = sum(v for k, v in probes.every_kind().items() if k != "udp-to-endpoint")
        locked_leaks = len(observer.leaks(since=mark))
        say(f"lock applied: {answered} probes answered; the ISP saw {locked_leaks} leaked packets")

        with hand_tunnel(lab, server=1):
            mark = observer.mark()
            ok = probes.ping(INTERNET_V4) and probes.tcp(INTERNET_V4) and probes.dns_udp("10.99.0.1")
            isp_dns = probes.dns_udp("192.0.2.1")
            tunnel_leaks = len(observer.leaks(since=mark))
            say(
                f"lock + tunnel to vpn1: internet {'works' if ok else 'FAILS'}, ISP resolver "
                f"{'ANSWERS' if isp_dns else 'blocked'}; leaked packets: {tunnel_leaks}"
            )

            mark = observer.mark()
            pinger = ContinuousPing(lab)
            with lab.inside("client"):
                current = policy.endpoints
                for server in (config.servers[1], config.servers[0]):
                    nft.swap_endpoints(policy, current, frozenset({server.endpoint}))
                    current = frozenset({server.endpoint})
            record = pinger.stop()
            swap_leaks = len(observer.leaks(since=mark))
            say(
                f"lock's endpoint swapped to vpn2 and back under a 10 ms ping: longest outage "
                f"{record.longest_outage_s * 1000:.0f} ms, leaked packets: {swap_leaks}"
            )

            mark = observer.mark()
            restored = _flush_under_guard(lab, policy)
            flush_leaks = len(observer.leaks(since=mark))
            say(
                f"another program ran 'nft flush ruleset': the guard restored the lock in "
                f"{restored * 1000:.0f} ms; leaked packets: {flush_leaks}"
            )

        total = locked_leaks + tunnel_leaks + swap_leaks + flush_leaks
        with lab.inside("client"):
            nft.remove(policy.table)
    say(f"lab removed. Leaked packets with the lock in place: {total}")
    return total


def _flush_under_guard(lab: Lab, policy) -> float:
    took: list[float] = []

    async def scenario() -> None:
        restored = anyio.Event()

        async def on_tamper(_reason: str) -> None:
            restored.set()

        guard = LockGuard(policy, on_tamper)
        async with anyio.create_task_group() as tg:
            await guard.apply()
            await tg.start(guard.run)
            begin = time.perf_counter()
            await anyio.to_thread.run_sync(
                lambda: sh("ip", "netns", "exec", lab.ns("client"), "nft", "flush", "ruleset")
            )
            with anyio.fail_after(5):
                await restored.wait()
            took.append(time.perf_counter() - begin)
            tg.cancel_scope.cancel()

    def in_client() -> None:
        with lab.inside("client"):
            anyio.run(scenario)

    worker = threading.Thread(target=in_client)
    worker.start()
    worker.join(30)
    return took[0] if took else float("nan")
