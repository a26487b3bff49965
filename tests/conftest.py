"""Test-wide safety: every test and every process it starts is in lab-only mode.

With TUNLOCK_LAB_ONLY=1 the lock and the daemon refuse to act outside a lab
network namespace, so no test can ever lock this machine out of its network.
"""

import os

os.environ["TUNLOCK_LAB_ONLY"] = "1"
