"""Fixtures of the systemd tier: the cached Debian root, a lab per test, a system booted in it.

Needs root, mmdebstrap and systemd-nspawn (scripts/bootstrap installs both); skipped otherwise,
with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.lab.topology import LAB_ROOT, Lab, sweep_stale
from tests.lab.conftest import LabUnderTest, lab_under_test
from tests.systemd.machine import PYTHON, BootedSystem, debian_root

# Short limits, as the lab's daemon tests use, and a 3 s watchdog: the drop-in a test adds, the
# way an administrator would (the installed unit keeps its own values).
TEST_DROP_IN = """\
[Service]
WatchdogSec=3
Environment=TUNLOCK_HEALTH_CONNECT_TIMEOUTS_S=2,4
Environment=TUNLOCK_ROTATION_BACKOFF_INITIAL_S=1
Environment=TUNLOCK_ROTATION_BACKOFF_MAX_S=4
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [tool for tool in ("mmdebstrap", "systemd-nspawn", "nsenter") if shutil.which(tool) is None]
    reason = (
        "the systemd tier needs root (namespaces, a booted container)"
        if os.geteuid() != 0
        else f"the systemd tier needs {', '.join(missing)} (scripts/bootstrap installs them)"
        if missing
        else None
    )
    if reason:
        for item in items:
            if "tests/systemd/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


WORKDIR_PREFIX = "tunlock-systemd-"


def sweep_stale_systems() -> None:
    """Overlays of earlier runs that were killed before their clean-up: once their lab is gone
    (sweep_stale ends the processes in a dead run's namespaces, the booted system's included),
    unmount and remove them."""
    sweep_stale()
    for workdir in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        lab_id = workdir.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if (LAB_ROOT / lab_id).exists():
            continue  # a live lab: another run's system
        merged = workdir / "merged"
        if merged.is_mount():
            subprocess.run(["umount", "--lazy", str(merged)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def root() -> Path:
    sweep_stale_systems()
    return debian_root()


@pytest.fixture
def lab() -> Iterator[LabUnderTest]:
    yield from lab_under_test(servers=2)


def lab_config(lab: Lab) -> str:
    """The lab's configuration as this host's /etc/tunlock/tunlock.toml: its own control socket
    and resolv.conf (the defaults), the rest as the lab wrote it."""
    keep = []
    for line in lab.config_path.read_text().splitlines():
        if line.startswith(("socket =", "resolv_conf =", "[control]", "[dns]")):
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


@pytest.fixture
def system(root: Path, lab: LabUnderTest) -> Iterator[BootedSystem]:
    """The root with tunlock installed by `tunlock systemd install`, ready to boot (not booted)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{lab.lab.id}-"))
    booted = BootedSystem(root, lab.lab, workdir)
    try:
        booted.mount()
        booted.write("/etc/resolv.conf", "nameserver 192.0.2.1\n")  # the ISP's, as DHCP would set
        booted.write("/etc/tunlock/tunlock.toml", lab_config(lab.lab), 0o600)
        for server in sorted((lab.lab.dir / "servers").glob("*.conf")):
            booted.write(f"/etc/tunlock/servers/{server.name}", server.read_text(), 0o600)
        installed = booted.offline(PYTHON, "-m", "supervisor.cli", "systemd", "install")
        assert installed.returncode == 0, f"tunlock systemd install failed:\n{installed.stderr}"
        print(installed.stdout)
        booted.write("/etc/systemd/system/tunlock.service.d/test.conf", TEST_DROP_IN)
        yield booted
    finally:
        booted.close()
