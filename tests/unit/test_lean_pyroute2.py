"""pyroute2's internal layout, as ``supervisor.lean_pyroute2`` and ``wireguard/kernel.py`` rely on it.

The light package saves about 5 MB of the idle daemon's RSS (46 against 51 MB, measured with
pyroute2 0.9.7; without it the 50 MB goal fails), by importing the submodules tunlock uses and
never pyroute2's own initialiser. It relies on where pyroute2 keeps those names, and kernel.py on
two internals of its netlink sockets; pyproject.toml pins the release range these tests passed
on. A new pyroute2 that moves them fails here, not in a running daemon.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

from supervisor import lean_pyroute2


@pytest.mark.parametrize(("name", "module"), sorted(lean_pyroute2._WHERE.items()))
def test_each_top_level_name_lives_in_the_submodule_the_light_package_names(name: str, module: str) -> None:
    assert inspect.isclass(getattr(importlib.import_module(module), name))


HEAVY = {"pyroute2.ndb", "pyroute2.ipdb", "pyroute2.conntrack", "pyroute2.nslink", "sqlite3"}


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter (this one may have imported pyroute2 whole already) holds
    after ``code``."""
    code += "\nimport sys; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(run.stdout.split())


def test_the_daemon_imports_no_part_of_pyroute2_it_does_not_use() -> None:
    loaded = _modules_after(
        "from supervisor import lean_pyroute2\n"
        "lean_pyroute2.install()\n"
        "import supervisor.daemon, supervisor.wireguard.kernel, supervisor.net.monitor\n"
        "from pyroute2 import AsyncIPRoute, AsyncWireGuard"
    )
    assert not HEAVY & loaded, f"pyroute2's initialiser ran: {sorted(HEAVY & loaded)}"
    assert "pyroute2.iproute.linux" in loaded


def test_tunlock_run_installs_the_light_package_before_it_imports_the_daemon() -> None:
    # A configuration that does not exist: `run` installs the light package first, then exits 2
    # on the config before it imports the tunnel or the daemon (supervisor/early_tunnel.py).
    loaded = _modules_after(
        "import sys\n"
        "from supervisor.cli import main\n"
        "sys.argv = ['tunlock', 'run', '--config', '/nonexistent/tunlock.toml']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "from pyroute2 import AsyncIPRoute, AsyncWireGuard"
    )
    assert "supervisor.daemon" not in loaded, "a bad configuration exits before the daemon loads"
    assert not HEAVY & loaded, f"pyroute2's initialiser ran: {sorted(HEAVY & loaded)}"


def test_importing_supervisor_leaves_pyroute2_alone() -> None:
    # Only the daemon wants the light package; a library user or another command gets pyroute2 whole.
    loaded = _modules_after("import supervisor, supervisor.config, supervisor.check")
    assert "pyroute2" not in loaded
    assert "supervisor.lean_pyroute2" not in loaded


def test_a_name_outside_the_light_set_still_works_through_the_real_initialiser() -> None:
    code = "import supervisor, pyroute2; print(pyroute2.NDB.__name__, pyroute2.config.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["NDB", "pyroute2.config"]


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
