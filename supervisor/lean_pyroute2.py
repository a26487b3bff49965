"""Importing pyroute2 without the cost of its package initialiser.

``pyroute2/__init__.py`` imports every protocol the library speaks (NDB with sqlite3, IPDB,
conntrack, nl80211, devlink, plan9...): about 5 MB of a daemon that must stay under 50 MB and
uses three of them (idle connected daemon in the lab, pyroute2 0.9.7: 46 MB RSS with this, 51
without). No option of pyroute2's skips that, so before anything imports it we register a light
package module with the same search path: submodules import as usual
(``pyroute2.iproute.linux``), the few names we take from the top level load on first use
(PEP 562), and any other top-level name runs the real initialiser into the module first, so
nothing that expects the full package breaks; it only pays the cost it asked for.

Only the daemon needs it: ``tunlock run`` installs it before it imports supervisor.daemon;
importing ``supervisor`` changes nothing, so the other commands and the tests import pyroute2 as
it is.

It depends on where pyroute2 keeps those names: pyproject.toml pins the tested releases, and
tests/unit/test_lean_pyroute2.py fails when a release moves them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# The top-level names tunlock uses, and the submodule each lives in.
_WHERE = {
    "AsyncIPRoute": "pyroute2.iproute.linux",
    "IPRoute": "pyroute2.iproute.linux",
    "AsyncWireGuard": "pyroute2.netlink.generic.wireguard",
    "WireGuard": "pyroute2.netlink.generic.wireguard",
}


def install() -> None:
    """Register the light ``pyroute2`` package unless pyroute2 was imported already."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the real import will say so where it is needed
    package = types.ModuleType("pyroute2")
    package.__spec__ = spec
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    complete = False

    def __getattr__(name: str) -> object:
        nonlocal complete
        if name in _WHERE:
            value = getattr(importlib.import_module(_WHERE[name]), name)
            setattr(package, name, value)
            return value
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")  # a submodule (`from pyroute2 import config`)
        if not complete and not name.startswith("__"):
            complete = True
            assert spec.loader is not None
            spec.loader.exec_module(package)  # the real initialiser, into this same module
            return getattr(package, name)
        raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package
