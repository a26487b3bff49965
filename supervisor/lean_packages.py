"""Importing pyroute2 and prometheus_client without the cost of their package initialisers.

A package's ``__init__`` runs whenever any of its submodules is imported, and two of the daemon's
libraries import everything they have there:

- ``pyroute2/__init__.py`` imports every protocol the library speaks (NDB with sqlite3, IPDB,
  conntrack, nl80211, devlink, plan9...): about 5 MB of a daemon that must stay under 50 MB and
  uses three of them (idle connected daemon in the lab, pyroute2 0.9.7: 46 MB RSS with this, 51
  without).
- ``prometheus_client/__init__.py`` imports its HTTP server, its push gateway client and its
  process collectors, and ``prometheus_client.exposition`` (where the classic text format's
  ``generate_latest`` lives) imports http.server, wsgiref, urllib.request, http.client and email
  at module level. Imported after the daemon's modules, the whole package adds 3.16 MB RSS; what
  the metrics endpoint needs to answer a Prometheus scrape (``registry``, ``metrics_core``,
  ``openmetrics.exposition``) adds 0.11 MB, and ``exposition`` 2.8 MB more. An idle connected
  daemon measured 39.0 MB with the default configuration and 42.7 MB with ``[metrics] listen``,
  against the 40 MB of issue #27. With this, and supervisor/metrics.py importing ``exposition``
  only for a client that prefers the classic format, 39.5-39.9 MB with metrics on (42.5-42.6 MB
  before, alternating; bench/bench_daemon.py --idle-only).

Neither library has an option to skip its initialiser, so before anything imports them we
register a light package module with the same search path: submodules import as usual
(``pyroute2.iproute.linux``, ``prometheus_client.registry``), the few names we take from the top
level load on first use (PEP 562), and any other top-level name runs the real initialiser into
the module first, so nothing that expects the full package breaks; it only pays the cost it asked
for.

Only the daemon needs it: ``tunlock run`` installs both (``install_all``) before it imports
supervisor.daemon; importing ``supervisor`` changes nothing, so the other commands and the tests
import the libraries as they are.

It depends on where the libraries keep those names: pyproject.toml pins the pyroute2 releases
tested, and tests/unit/test_lean_packages.py fails when a release moves them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping

# For each package, the top-level names tunlock uses and the submodule each lives in.
LIGHT: Mapping[str, Mapping[str, str]] = {
    "pyroute2": {
        "AsyncIPRoute": "pyroute2.iproute.linux",
        "IPRoute": "pyroute2.iproute.linux",
        "AsyncWireGuard": "pyroute2.netlink.generic.wireguard",
        "WireGuard": "pyroute2.netlink.generic.wireguard",
    },
    # None: supervisor/metrics.py imports the submodules by name.
    "prometheus_client": {},
}


def install(name: str, where: Mapping[str, str]) -> None:
    """Register a light package ``name`` unless it was imported already. ``where``: each
    top-level name served without the initialiser, and the submodule it lives in."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the real import will say so where it is needed
    package = types.ModuleType(name)
    package.__spec__ = spec
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    complete = False

    def __getattr__(attribute: str) -> object:
        nonlocal complete
        if attribute in where:
            value = getattr(importlib.import_module(where[attribute]), attribute)
            setattr(package, attribute, value)
            return value
        if importlib.util.find_spec(f"{name}.{attribute}") is not None:  # `from pyroute2 import config`
            return importlib.import_module(f"{name}.{attribute}")
        if not complete and not attribute.startswith("__"):
            complete = True
            assert spec.loader is not None
            spec.loader.exec_module(package)  # the real initialiser, into this same module
            return getattr(package, attribute)
        raise AttributeError(f"module {name!r} has no attribute {attribute!r}")

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = package


def install_all() -> None:
    """The light packages of every library in ``LIGHT`` (what ``tunlock run`` does first)."""
    for name, where in LIGHT.items():
        install(name, where)
