"""The owned twin of the lock, against the real kernel: what another program can and cannot do.

Each test holds an OwningContext (one libnftables context in a thread of its own) inside the
lab's client namespace, and plays "another tool" with the ``nft`` command run there. The
observer at the ISP counts what leaves.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from supervisor.config import load_config
from supervisor.lab import faults
from supervisor.lab.probes import describe
from supervisor.lock import nft
from supervisor.lock.configured import policy_from_config
from supervisor.lock.guard import LockGuard
from supervisor.lock.owner import OwningContext
from supervisor.lock.policy import LockPolicy
from supervisor.lock.render import owned_table
from tests.lab.conftest import LabUnderTest

pytestmark = pytest.mark.lab

T = TypeVar("T")
OWNED = owned_table("tunlock")


def in_client(lab: LabUnderTest, work: Callable[[], T]) -> T:
    """``work`` in a thread of its own inside the client namespace (threads it starts stay there)."""
    result: list = []

    def run() -> None:
        try:
            with lab.lab.inside("client"):
                result.append(work())
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert result, "the work in the client namespace did not finish"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def other_nft(lab: LabUnderTest, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nft`` as another program on the client runs it."""
    return subprocess.run(
        ["ip", "netns", "exec", lab.lab.ns("client"), "nft", *args],
        input=script,
        capture_output=True,
        text=True,
        timeout=20,
    )


def tables(lab: LabUnderTest) -> str:
    return other_nft(lab, "list", "tables").stdout


@pytest.fixture
def policy(lab: LabUnderTest) -> Iterator[LockPolicy]:
    yield policy_from_config(load_config(Path(lab.lab.config_path), {}))
    other_nft(lab, "delete", "table", "inet", "tunlock")  # the ordinary table stays otherwise


@pytest.fixture
def owner(lab: LabUnderTest, policy: LockPolicy) -> Iterator[OwningContext]:
    held = in_client(lab, lambda: OwningContext.open(policy.table))
    try:
        yield held
    finally:
        held.close()


def test_owned_table_survives_a_flush_refuses_others_and_goes_with_its_owner(lab, policy, owner):
    owner.apply(policy)
    assert f"table inet {OWNED}" in tables(lab) and "table inet tunlock\n" in tables(lab)

    flush = other_nft(lab, "flush", "ruleset")
    assert flush.returncode == 0, flush.stderr  # the other tool sees success...
    assert f"table inet {OWNED}" in tables(lab), "...but the owned table is still there"
    assert "table inet tunlock\n" not in tables(lab), "the ordinary one is gone until restored"

    for attempt in (
        ["delete", "table", "inet", OWNED],
        ["add", "rule", "inet", OWNED, "output", "accept"],
        ["flush", "chain", "inet", OWNED, "output"],
    ):
        done = other_nft(lab, *attempt)
        assert done.returncode != 0 and "Operation not permitted" in done.stderr, (attempt, done.stderr)
    replaced = other_nft(lab, "-f", "-", script=f"add table inet {OWNED}\ndelete table inet {OWNED}\n")
    assert replaced.returncode != 0 and "Operation not permitted" in replaced.stderr

    # The owner changes both tables at once: the ordinary one is back, the swap is in both.
    owner.apply(policy)
    assert in_client(lab, lambda: nft.status(policy.table).matches(policy))
    assert owner.owns(policy.table)

    owner.close()
    assert f"table inet {OWNED}" not in tables(lab), "the kernel frees it with the owner's socket"
    assert "table inet tunlock\n" in tables(lab), "the ordinary table outlives its writer"


def test_owned_table_goes_when_its_process_is_killed(lab, policy):
    """SIGKILL: no clean-up runs in the process, the kernel frees the table with the socket."""
    holder = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.lab.ns("client"),
            sys.executable,
            "-c",
            "import sys\n"
            "from supervisor.lock.owner import OwningContext\n"
            "from supervisor.lock.policy import LockPolicy\n"
            "owner = OwningContext.open('tunlock')\n"
            "owner.apply(LockPolicy(table='tunlock', tunnel_interface='tl0', fwmark=1))\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"TUNLOCK_LAB_ONLY": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        cwd=Path(__file__).parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert f"table inet {OWNED}" in tables(lab)
        holder.kill()
        holder.wait(10)
        assert f"table inet {OWNED}" not in tables(lab)
        assert "table inet tunlock\n" in tables(lab)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_an_accept_in_another_table_does_not_bypass_the_owned_drop(lab, policy, owner):
    """Netfilter runs every base chain at a hook; a drop in one is final whatever another says."""
    owner.apply(policy)
    assert other_nft(lab, "delete", "table", "inet", "tunlock").returncode == 0
    wide_open = (
        "table inet wideopen {\n"
        "\tchain output { type filter hook output priority -400; policy accept; accept; }\n"
        "\tchain input { type filter hook input priority -400; policy accept; accept; }\n"
        "}\n"
    )
    assert other_nft(lab, "-f", "-", script=wide_open).returncode == 0
    try:
        mark = lab.observer.mark()
        answered = {kind for kind, ok in lab.probes.every_kind().items() if ok and kind != "udp-to-endpoint"}
        leaks = lab.observer.leaks(since=mark)
    finally:
        other_nft(lab, "delete", "table", "inet", "wideopen")
    assert answered == set(), f"answered despite the owned table: {answered}"
    assert leaks == [], f"leaked past the owned table:\n{describe(leaks)}"


ROUNDS = 5


def test_flush_followed_at_once_by_probes_leaks_nothing_with_the_owned_twin(lab, policy, owner):
    """The guard restores the ordinary table after each flush; the twin holds meanwhile."""
    restores: list[str] = []

    async def scenario() -> None:
        async def on_tamper(reason: str) -> None:
            restores.append(reason)

        guard = LockGuard(policy, on_tamper, owner=owner)
        async with anyio.create_task_group() as tg:
            await guard.apply()
            await tg.start(guard.run)
            for round_ in range(ROUNDS):
                await anyio.to_thread.run_sync(faults.flush_client_ruleset, lab.lab)
                await anyio.to_thread.run_sync(lab.probes.every_kind)
                with anyio.fail_after(10):  # restored before the next flush: each round is one flush
                    while len(restores) <= round_:
                        await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    mark = lab.observer.mark()
    in_client(lab, lambda: anyio.run(scenario))
    leaks = lab.observer.leaks(since=mark)
    assert leaks == [], f"{len(leaks)} packets leaked after {ROUNDS} flushes:\n{describe(leaks)}"
    assert len(restores) == ROUNDS, "each flush removed the ordinary table and the guard put it back"
    assert "table inet tunlock\n" in tables(lab) and f"table inet {OWNED}" in tables(lab)


def test_the_owner_reads_the_ordinary_table_as_the_nft_tool_lists_it(lab, policy, owner):
    """The guard reads through the owner while it has one (a status request, each nftables event)
    and compares with what it read after applying: both readings must be the nft tool's."""
    owner.apply(policy)
    listed, counters = owner.reading(policy.table)
    tool_listed, tool_counters = in_client(lab, lambda: nft.reading(policy.table))
    assert listed == tool_listed
    assert counters.keys() == tool_counters.keys() and counters  # the counters move; their names do not
    other_nft(lab, "delete", "table", "inet", policy.table)
    with pytest.raises(nft.LockError, match="No such file or directory"):
        owner.reading(policy.table)
