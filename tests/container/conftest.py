"""Fixtures of the container tier (helpers in tier.py): the image, a lab per test, and the
removal of every container, pod and secret a test made, also when it fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from supervisor.lab.topology import process_alive
from tests.container.tier import FIGURES, OWNER_LABEL, Created, SkipTier, build_image, podman_rc
from tests.lab.conftest import LabUnderTest, lab_under_test


@pytest.fixture(scope="session")
def image() -> str:
    """The tunlock image built from the Containerfile (layers cached between runs); first, what
    a crashed earlier run left behind is removed."""
    try:
        if os.geteuid() == 0 and shutil.which("podman"):
            _sweep_stale()
        return build_image()
    except SkipTier as reason:
        pytest.skip(str(reason))


@pytest.fixture
def lab() -> Iterator[LabUnderTest]:
    """A lab of two servers for each test."""
    yield from lab_under_test(servers=2)


@pytest.fixture
def created(lab: LabUnderTest) -> Iterator[Created]:
    """What the test makes with podman; it depends on the lab so that it goes before the lab."""
    made = Created()
    try:
        yield made
    finally:
        made.remove()


def _sweep_stale() -> None:
    """Containers and pods of earlier runs whose process is gone (a crash): removed by name."""
    for kind in ("pod", "container"):
        # `pod ps` lists every pod and names one .Name; `ps` needs --all and says .Names.
        every, name = (["--all"], "{{.Names}}") if kind == "container" else ([], "{{.Name}}")
        owner = f'{{{{index .Labels "{OWNER_LABEL}"}}}}'
        rc, out, _ = podman_rc(
            kind, "ps", *every, "--filter", f"label={OWNER_LABEL}", "--format", f"{name} {owner}"
        )
        for line in out.splitlines() if rc == 0 else ():
            name, _, pid = line.partition(" ")
            if pid.strip().isdigit() and not process_alive(int(pid)):
                podman_rc(kind, "rm", "--force", "--time", "0", name)


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("container tier figures (a shared 2-vCPU machine: indicative only)")
        for line in FIGURES:
            terminalreporter.write_line(line)
