"""The lab fixtures every lab test uses, and the check that nothing of ours survives.

Lab tests need root (namespaces, nftables); they are skipped with the reason
otherwise. One lab per test module keeps the suite fast; a test that changes
the lab (a fault, a lock) restores it, or its module asks for a lab per test.

A module says which lab its tests get with arguments to its ``lab`` marker, all optional::

    pytestmark = pytest.mark.lab(servers=1, per_test=True, daemon_env={"TUNLOCK_...": "2"})

``servers`` (3): the lab's VPN servers; ``per_test`` (False): a lab of each test's own instead
of one for the module, for tests that break it on purpose; ``daemon_env`` (none): the
environment overrides of the ``daemon`` fixture's ``tunlock run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from supervisor.lab.daemon import LabDaemon
from supervisor.lab.probes import Observer, Probes, describe
from supervisor.lab.topology import Lab, labs, sh, sweep_stale
from supervisor.safety import LAB_NETNS_PREFIX, NETNS_DIR

# Every wait of the lab's daemon and observer is multiplied by this: the VM tier (tests/vm/guest)
# sets 6, as under software emulation starting Python alone takes seconds.
TIME_SCALE = float(os.environ.get("TUNLOCK_TEST_TIME_SCALE", "1"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="lab tests need root (network namespaces, nftables)")
        for item in items:
            if "tests/lab/" in str(item.fspath):
                item.add_marker(skip)


class LabUnderTest:
    """A lab with its observer and probes, as tests use it."""

    def __init__(self, lab: Lab, time_scale: float = TIME_SCALE) -> None:
        self.lab = lab
        self.time_scale = time_scale
        self.observer = Observer.start(lab, time_scale=time_scale)
        self.probes = Probes(lab)

    def daemon(self, env: Mapping[str, str] | None = None, config: str | None = None) -> LabDaemon:
        """A ``tunlock run`` for this lab (not started yet), its waits scaled like the observer's."""
        return LabDaemon(self.lab, env=env, config=config, time_scale=self.time_scale)

    def assert_no_leaks(self, mark: int) -> None:
        """Nothing the ISP's observer saw since ``mark`` left outside the tunnel."""
        leaks = self.observer.leaks(since=mark)
        assert not leaks, f"the ISP saw {len(leaks)} packets outside the tunnel:\n{describe(leaks)}"


def lab_under_test(servers: int = 3) -> Iterator[LabUnderTest]:
    """A lab for the length of a fixture, removed also when the test fails."""
    built = Lab.up(servers=servers)
    try:
        yield LabUnderTest(built)
    finally:
        built.down()


@dataclass(frozen=True)
class LabSetup:
    """What a module's ``lab`` marker asks for (see the module docstring)."""

    servers: int = 3
    per_test: bool = False
    daemon_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, node: pytest.Item | pytest.Collector) -> LabSetup:
        """The closest ``lab`` marker's arguments: the test's own, else its module's."""
        marker = node.get_closest_marker("lab")
        if marker is None:
            return cls()
        if marker.args:
            raise pytest.UsageError(f"{node.nodeid}: the lab marker takes keyword arguments only")
        try:
            return cls(**marker.kwargs)
        except TypeError as e:
            raise pytest.UsageError(f"{node.nodeid}: lab marker: {e}") from None


@pytest.fixture(scope="module")
def module_lab(request: pytest.FixtureRequest) -> Iterator[LabUnderTest]:
    """The lab every test of a module shares (built on first use, removed after the module)."""
    yield from lab_under_test(LabSetup.of(request.node).servers)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[LabUnderTest]:
    """The test's lab: the module's shared one, or one of its own where the module says
    ``per_test=True``."""
    setup = LabSetup.of(request.node)
    if setup.per_test:
        yield from lab_under_test(setup.servers)
        return
    shared = LabSetup.of(request.node.getparent(pytest.Module) or request.node)
    if setup.servers != shared.servers:  # a test's own marker cannot resize the module's lab
        raise pytest.UsageError(f"{request.node.nodeid}: servers={setup.servers} needs per_test=True")
    yield request.getfixturevalue("module_lab")


@pytest.fixture
def daemon(request: pytest.FixtureRequest, lab: LabUnderTest) -> Iterator[LabDaemon]:
    """A ``tunlock run`` in the test's lab with the marker's ``daemon_env``: not started (the
    test starts it, and may wait for another state than ``connected``), stopped after the test."""
    running = lab.daemon(env=LabSetup.of(request.node).daemon_env)
    try:
        yield running
    finally:
        running.stop()


def tunlock_in_client(
    lab: LabUnderTest, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the tunlock CLI inside the lab's client namespace, as a user would."""
    settings = [f"{k}={v}" for k, v in (env or {}).items()]
    return subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.lab.ns("client"),
            "env",
            "TUNLOCK_LAB_ONLY=1",
            *settings,
            sys.executable,
            "-m",
            "supervisor.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def locked(lab: LabUnderTest) -> Iterator[LabUnderTest]:
    """The lock applied by `tunlock lock apply` in a separate process that has exited."""
    result = tunlock_in_client(lab, "lock", "apply", "--config", str(lab.lab.config_path))
    assert result.returncode == 0, result.stderr
    yield lab
    tunlock_in_client(lab, "lock", "remove", "--yes", "--config", str(lab.lab.config_path))


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0:
        sweep_stale()  # labs of earlier runs that crashed


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every lab this run built is gone at the end (module fixtures have been torn down by now);
    one that is not is removed and fails the run, so a missing clean-up cannot go unseen."""
    left = [s for s in labs() if s.owner_pid == os.getpid()]
    for state in left:
        Lab(state).down()
    namespaces = (
        sorted(
            n.name
            for n in NETNS_DIR.glob(f"{LAB_NETNS_PREFIX}*")
            if any(n.name.startswith(f"{LAB_NETNS_PREFIX}{lab_id}-") for lab_id in Lab.built_here)
        )
        if NETNS_DIR.is_dir()
        else []
    )
    if left or namespaces:
        print(f"\nlab tests left behind (removed now): labs {[s.id for s in left]}, namespaces {namespaces}")
        for name in namespaces:
            sh("ip", "netns", "del", name, check=False)
        session.exitstatus = 1
