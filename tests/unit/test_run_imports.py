"""``tunlock run`` imports only what the daemon's path needs (issue #27, items 3 and 4).

Every module imported at start costs the daemon memory for its whole life and delays the first
packet through the tunnel, so the run path must not pull in the lab, the leak test, the other
commands, the metrics stack (imported when ``[metrics] listen`` is set), the plugin host and any
plugin (loaded when one is enabled), namespace mode's code (when ``tunnel.namespace`` is set) or
the kernel backend on a host that runs wireguard-go. A fresh interpreter is the only place where
"what else got imported" can be asked: each probe does what ``tunlock run`` does before its event
loop (the light pyroute2 and prometheus_client packages, the imports, the configuration read and
the parts built from it). bench/bench_imports.py prints the time and memory this path costs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

NEVER_ON_THE_RUN_PATH = (
    "supervisor.lab",
    "supervisor.leaktest",
    "supervisor.check",
    "supervisor.metrics",
    "supervisor.control.cli",
    "supervisor.systemd.units",
    "supervisor.lock.lockout",
    "plugins",
    "prometheus_client",
    "h11",
    "hypothesis",
    "matplotlib",
    "pydantic",
)

# Only when the configuration asks for them (the configuration of these probes asks for none).
ONLY_WHEN_CONFIGURED = (
    "supervisor.plugins",  # [plugins] enabled
    "supervisor.net.netns",  # tunnel.namespace
    "supervisor.net.ui_link",  # namespace.ui_tcp
    "supervisor.wireguard.kernel",  # tunnel.backend = kernel (or auto on a kernel with WireGuard)
    "supervisor.control.client",  # under systemd: READY=1 once the control socket answers
)

RUN_PATH = """\
import sys
from supervisor import lean_packages
lean_packages.install_all()
import supervisor.cli, supervisor.daemon, supervisor.log
from supervisor import daemon
from supervisor.config import load_config
from supervisor.lock.state import LockState
from supervisor.runtime import Status
from supervisor.status import StatusReport
from supervisor.wireguard.tunnel import TunnelSettings

config = load_config(__import__("pathlib").Path(sys.argv[1]), {})
assert daemon._plugin_host(config, None, None) is None
TunnelSettings.from_config(config.settings)
daemon.machine_settings(config)
StatusReport.build(Status(), LockState(), None).as_json()
# What the daemon loads once it runs: anyio's socket API (the UAPI client, the control socket,
# the waits on wireguard-go's pidfd) and its asyncio backend.
import anyio
anyio.wait_readable, anyio.connect_unix, anyio.create_unix_listener, anyio.notify_closing
anyio.run(anyio.sleep, 0, backend="asyncio")
"""
PROBE = RUN_PATH + 'print(" ".join(sorted(sys.modules)))\n'


def _run_path_modules(config: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def _under(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in names))


def test_the_run_path_imports_none_of_the_other_commands_plugins_or_metrics(write_config) -> None:
    loaded = _run_path_modules(write_config('[tunnel]\nbackend = "userspace"\n'))
    # The light package (supervisor/lean_packages.py) is an empty module: its submodules would cost.
    assert _under(loaded - {"prometheus_client"}, NEVER_ON_THE_RUN_PATH) == []


# The classes of tunlock's own on the run path are msgspec Structs: the dataclass decorator writes
# and compiles their methods when the module loads (~0.35 ms a class on Python 3.11, 19 ms for the
# fifty-odd that were on this path), msgspec makes them in C (issue #27). The ones that must stay
# dataclasses, and why:
STAYS_A_DATACLASS: dict[str, str] = {}

DATACLASS_PROBE = (
    RUN_PATH
    + """\
import dataclasses, inspect
print(" ".join(sorted(
    f"{name}.{cls.__qualname__}"
    for name, module in list(sys.modules.items())
    if name.partition(".")[0] in ("supervisor", "plugins")
    for cls in vars(module).values()
    if inspect.isclass(cls) and cls.__module__ == name and dataclasses.is_dataclass(cls)
)))
"""
)


def test_the_run_path_defines_its_records_as_structs_not_dataclasses(write_config) -> None:
    config = write_config('[tunnel]\nbackend = "userspace"\n')
    result = subprocess.run(
        [sys.executable, "-c", DATACLASS_PROBE, str(config)], capture_output=True, text=True, check=True
    )
    assert sorted(result.stdout.split()) == sorted(STAYS_A_DATACLASS)


def test_the_run_path_imports_what_a_setting_turns_on_only_when_it_is_set(write_config) -> None:
    loaded = _run_path_modules(write_config('[tunnel]\nbackend = "userspace"\n'))
    assert _under(loaded, ONLY_WHEN_CONFIGURED) == []
    assert "supervisor.daemon" in loaded


# With ``[metrics] listen``: the daemon imports supervisor.metrics (daemon._serve_metrics), then
# answers a Prometheus scrape (OpenMetrics) and, here, a client that asks for text/plain alone.
METRICS_PROBE = """\
import sys
from supervisor import lean_packages
lean_packages.install_all()
import supervisor.cli, supervisor.daemon, supervisor.log
from supervisor.config import load_config

config = load_config(__import__("pathlib").Path(sys.argv[1]), {})
assert config.settings.metrics.address is not None
from supervisor import metrics
import anyio
from tests.metrics_exchange import exchange  # the test module's own client, without pytest

STATUS = {"state": "connected", "lock": {"installed": True}}
SNAPSHOT = metrics.Snapshot(status=STATUS, version="0", servers=1)


async def source():
    return SNAPSHOT


async def scrape(accept):
    request = b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nAccept: " + accept + b"\\r\\n\\r\\n"
    response = await exchange(request, source)
    assert response.startswith(b"HTTP/1.1 200 "), response


async def main():
    await scrape(b"application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")
    print(" ".join(sorted(sys.modules)))
    await scrape(b"text/plain;version=0.0.4")
    print(" ".join(sorted(sys.modules)))

anyio.run(main, backend="asyncio")
"""

REPOSITORY = Path(__file__).resolve().parents[2]

# What prometheus_client's initialiser and its classic text format import: an HTTP server and
# client (~3 MB RSS) the metrics endpoint does not use to answer Prometheus.
CLASSIC_FORMAT_ONLY = (
    "prometheus_client.exposition",
    "prometheus_client.process_collector",
    "http.server",
    "wsgiref",
    "urllib.request",
)


def test_the_metrics_endpoint_loads_the_classic_format_only_when_a_client_asks_for_it(write_config) -> None:
    config = write_config('[tunnel]\nbackend = "userspace"\n\n[metrics]\nlisten = "127.0.0.1:9586"\n')
    result = subprocess.run(
        [sys.executable, "-c", METRICS_PROBE, str(config)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPOSITORY,  # where `tests.metrics_exchange` imports from
    )
    after_prometheus, after_text_client = (set(line.split()) for line in result.stdout.splitlines())
    assert _under(after_prometheus, CLASSIC_FORMAT_ONLY) == []
    assert "prometheus_client.openmetrics.exposition" in after_prometheus
    assert "prometheus_client.exposition" in after_text_client
