"""The owning context's refusals, and the daemon's fallback where the owner flag is missing.

No nft command runs here (unit tests run outside any lab namespace). The kernel's behaviour
is tested for real in tests/lab/test_lock_owner.py and tests/lab/test_daemon_flush.py; a
kernel without the owner flag (Linux < 5.12) cannot be booted here, so the fallback is driven
by a stand-in for the probe's refusal.
"""

from __future__ import annotations

import anyio
import anyio.abc
import pytest
import structlog

from supervisor import daemon
from supervisor.errors import SafetyError
from supervisor.lock.owner import Libnftables, OwnerUnavailable, OwningContext
from supervisor.lock.policy import LockPolicy

POLICY = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C)


def test_a_missing_library_is_reported_as_owner_unavailable():
    with pytest.raises(OwnerUnavailable, match=r"libnftables-absent\.so\.9 cannot be loaded"):
        Libnftables("libnftables-absent.so.9")


def test_opening_outside_a_lab_namespace_is_refused_in_lab_only_mode():
    with pytest.raises(SafetyError, match="refusing to install a lock here"):
        OwningContext.open("tunlock")


class GuardAlone:
    """Stands in for LockGuard: records what it was asked to apply (no nft here)."""

    def __init__(self) -> None:
        self.owner = None
        self.applied: list[LockPolicy] = []

    async def apply(self, policy: LockPolicy) -> None:
        self.applied.append(policy)

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep_forever()


def test_without_the_owner_flag_the_daemon_says_so_once_and_keeps_the_guard_alone(monkeypatch):
    def no_owner(table: str) -> OwningContext:
        raise OwnerUnavailable("nft: Error: Could not process rule: Operation not supported")

    monkeypatch.setattr(daemon.OwningContext, "open", staticmethod(no_owner))

    async def scenario() -> list[dict]:
        async with anyio.create_task_group() as tg:
            lock = daemon.GuardedLock(POLICY, tg, runtime_post=None)
            lock.guard = GuardAlone()  # type: ignore[assignment]
            with structlog.testing.capture_logs() as logs:
                await lock.apply(())
                await lock.apply(())  # a second apply does not ask (or say it) again
            assert lock.guard.owner is None and len(lock.guard.applied) == 2
            await lock.close()  # nothing owned, nothing to free
            tg.cancel_scope.cancel()
        return logs

    logs = anyio.run(scenario)
    said = [entry for entry in logs if "owner flag" in entry["event"]]
    assert len(said) == 1 and said[0]["log_level"] == "warning"
    assert "guard alone" in said[0]["event"] and "Operation not supported" in said[0]["reason"]
