"""The lock's pure parts (the policy and its renderer) import alone, without the configuration.

The renderer is the lock's most tested piece and the one other programs may want to reuse
(``tunlock lock export`` prints its output); importing it must not pull in the configuration
stack (msgspec and the config loader), which only the code that reads the configuration needs.
A fresh interpreter is the only place where "what else got imported" can be asked.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = (
    "import sys, supervisor.lock.render, supervisor.lock.policy\n"
    "print(' '.join(name for name in ('msgspec', 'pydantic', 'supervisor.config') if name in sys.modules))\n"
)


def test_the_policy_and_its_renderer_import_without_the_configuration_stack() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [], f"imported along with the lock's pure parts: {result.stdout}"
