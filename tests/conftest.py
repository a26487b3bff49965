"""Test-wide safety: every test and every process it starts is in lab-only mode.

With TUNLOCK_LAB_ONLY=1 the lock and the daemon refuse to act outside a lab
network namespace, so no test can ever lock this machine out of its network.
"""

import os

import pytest

os.environ["TUNLOCK_LAB_ONLY"] = "1"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """The daemon runs on asyncio (pyroute2 needs it), and so do the tests. anyio's own default
    would run each async test once per installed backend; trio is installed for the modules that
    pick its virtual clock themselves (the port-forwarding driver's tests)."""
    return "asyncio"
