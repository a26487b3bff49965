"""Applying the lock with the links read now, and without the egress chain where the kernel
refuses it (Linux < 5.16, or < 6.16 for an absent uplink)."""

from __future__ import annotations

import pytest

from supervisor.lock import links as links_module
from supervisor.lock.links import AppliedLinks, apply_read, egress_in_force
from supervisor.lock.nft import LockError
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import render
from supervisor.net.bypass import BypassWorkload

POLICY = LockPolicy(table="tunlock", tunnel_interface="tl0", fwmark=0xCA6C)
CHILD = BypassWorkload("macvlan", "mv1", "macvlan child of uplink eth0")
READ = AppliedLinks(egress_devices=("eth0",), bridges=("docker0",), bypass=(CHILD,))


@pytest.fixture(autouse=True)
def links_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(links_module, "read_links", lambda policy: READ)


def test_the_lock_goes_in_with_the_links_read_now() -> None:
    scripts: list[str] = []
    applied = apply_read(POLICY, lambda policy: scripts.append(render(policy)))
    assert applied == READ and egress_in_force(applied)
    assert 'hook egress devices = { "eth0" }' in scripts[0]
    assert '"docker0" . "docker0"' in scripts[0]


def test_a_kernel_without_the_egress_hook_gets_the_lock_without_it_and_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    scripts: list[str] = []

    def install(policy: LockPolicy) -> None:
        script = render(policy)
        if "hook egress" in script:
            raise LockError("nft: Error: Could not process rule: Operation not supported")
        scripts.append(script)

    applied = apply_read(POLICY, install)
    assert applied.egress_refused and not egress_in_force(applied)
    assert len(scripts) == 1 and "hook egress" not in scripts[0]
    assert "delete table netdev tunlock" in scripts[0]  # no stale egress table either
    assert '"docker0" . "docker0"' in scripts[0]
    captured = capsys.readouterr()
    assert "refused the lock's egress chain" in captured.out + captured.err


def test_a_lock_refused_with_and_without_the_chain_is_an_error() -> None:
    calls: list[LockPolicy] = []

    def install(policy: LockPolicy) -> None:
        calls.append(policy)
        raise LockError("nft: syntax error")

    with pytest.raises(LockError):
        apply_read(POLICY, install)
    assert len(calls) == 2  # with the chain, then without: both refused, the old table stands
