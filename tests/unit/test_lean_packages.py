"""The light packages of ``supervisor.lean_packages``, and pyroute2's internal layout as they and
``wireguard/kernel.py`` rely on it.

The light pyroute2 package saves about 5 MB of the idle daemon's RSS (46 against 51 MB, measured
with pyroute2 0.9.7; without it the 50 MB goal fails), by importing the submodules tunlock uses and
never pyroute2's own initialiser; the light prometheus_client package keeps the metrics endpoint
from loading an HTTP server and client it does not use (~3 MB). They rely on where the libraries
keep those names, and kernel.py on two internals of pyroute2's netlink sockets; pyproject.toml pins
the pyroute2 release range these tests passed on. A new release that moves them fails here, not in
a running daemon.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

from supervisor import lean_packages

TOP_LEVEL_NAMES = sorted(
    (name, module) for where in lean_packages.LIGHT.values() for name, module in where.items()
)


@pytest.mark.parametrize(("name", "module"), TOP_LEVEL_NAMES)
def test_each_top_level_name_lives_in_the_submodule_the_light_package_names(name: str, module: str) -> None:
    assert inspect.isclass(getattr(importlib.import_module(module), name))


HEAVY = {"pyroute2.ndb", "pyroute2.ipdb", "pyroute2.conntrack", "pyroute2.nslink", "sqlite3"}
# What prometheus_client's initialiser and its classic text format bring, which the metrics
# endpoint does not use for an OpenMetrics scrape.
HEAVY_METRICS = {
    "prometheus_client.exposition",
    "prometheus_client.process_collector",
    "prometheus_client.gc_collector",
    "http.server",
    "wsgiref",
    "urllib.request",
}


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter (this one may have imported the libraries whole already)
    holds after ``code``."""
    code += "\nimport sys; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(run.stdout.split())


def test_the_daemon_imports_no_part_of_the_libraries_it_does_not_use() -> None:
    loaded = _modules_after(
        "from supervisor import lean_packages\n"
        "lean_packages.install_all()\n"
        "import supervisor.daemon, supervisor.wireguard.kernel, supervisor.net.monitor, supervisor.metrics\n"
        "from pyroute2 import AsyncIPRoute, AsyncWireGuard"
    )
    assert not HEAVY & loaded, f"pyroute2's initialiser ran: {sorted(HEAVY & loaded)}"
    assert "pyroute2.iproute.linux" in loaded
    assert not HEAVY_METRICS & loaded, (
        f"prometheus_client's initialiser ran: {sorted(HEAVY_METRICS & loaded)}"
    )
    assert "prometheus_client.openmetrics.exposition" in loaded


def test_tunlock_run_installs_the_light_packages_before_it_imports_the_daemon() -> None:
    # A configuration that does not exist: `run` installs the light packages first, then exits 2
    # on the config before it imports the tunnel or the daemon (supervisor/early_tunnel.py).
    loaded = _modules_after(
        "import sys\n"
        "from supervisor.cli import main\n"
        "sys.argv = ['tunlock', 'run', '--config', '/nonexistent/tunlock.toml']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "from pyroute2 import AsyncIPRoute, AsyncWireGuard\n"
        "import supervisor.metrics"
    )
    assert "supervisor.daemon" not in loaded, "a bad configuration exits before the daemon loads"
    assert not HEAVY & loaded, f"pyroute2's initialiser ran: {sorted(HEAVY & loaded)}"
    assert not HEAVY_METRICS & loaded, (
        f"prometheus_client's initialiser ran: {sorted(HEAVY_METRICS & loaded)}"
    )


def test_importing_supervisor_leaves_the_libraries_alone() -> None:
    # Only the daemon wants the light packages; a library user or another command gets them whole.
    loaded = _modules_after("import supervisor, supervisor.config, supervisor.check")
    assert "pyroute2" not in loaded and "prometheus_client" not in loaded
    assert "supervisor.lean_packages" not in loaded


@pytest.mark.parametrize(
    ("package", "names", "expected"),
    [
        ("pyroute2", "NDB config", "NDB pyroute2.config"),
        ("prometheus_client", "Counter parser", "Counter prometheus_client.parser"),
    ],
)
def test_a_name_outside_the_light_set_still_works_through_the_real_initialiser(
    package: str, names: str, expected: str
) -> None:
    code = (
        "from supervisor import lean_packages\n"
        "lean_packages.install_all()\n"
        f"import {package}\n"
        f"print(*(getattr({package}, name).__name__ for name in {names.split()!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == expected.split()


def test_the_netlink_internals_kernel_py_uses_are_there() -> None:
    from pyroute2 import AsyncWireGuard
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.generic import wireguard

    assert callable(AsyncWireGuard.nlm_request)
    # ``prid`` (the generic family's id) is set on the socket by setup_endpoint: look in its source.
    assert "self.prid" in inspect.getsource(inspect.getmro(AsyncWireGuard)[1])
    assert isinstance(NLM_F_ACK, int) and isinstance(NLM_F_REQUEST, int)
    for name in ("WG_CMD_GET_DEVICE", "WG_CMD_SET_DEVICE", "WG_GENL_VERSION", "WGDEVICE_F_REPLACE_PEERS"):
        assert isinstance(getattr(wireguard, name), int)
    assert inspect.isclass(wireguard.wgmsg)
