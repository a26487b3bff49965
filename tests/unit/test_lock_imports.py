"""The lock's pure parts (the policy and its renderer) import alone, without the configuration.

The renderer is the lock's most tested piece and the one other programs may want to reuse
(``tunlock lock export`` prints its output); importing it must not pull in the configuration
stack (the config loader, its tables and the server-file reader), which only the code that reads
the configuration needs. msgspec comes along: the policy and the servers it names are msgspec
Structs (cheaper to define at start than dataclasses, issue #27). A fresh interpreter is the only
place where "what else got imported" can be asked.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = (
    "import sys, supervisor.lock.render, supervisor.lock.policy\n"
    "stack = ('pydantic', 'supervisor.config', 'supervisor.tables', 'supervisor.wgquick', 'tomllib')\n"
    "print(' '.join(name for name in stack if name in sys.modules))\n"
)


def test_the_policy_and_its_renderer_import_without_the_configuration_stack() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [], f"imported along with the lock's pure parts: {result.stdout}"
