"""``[health] probe_target`` is validated with the rest of the file (issue #11, item 3b).

It once passed ``tunlock check`` and then killed ``run`` (and a running daemon on SIGHUP) with a
traceback; now it is a ``file:line`` error like any other key, also through the environment.
"""

from __future__ import annotations

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigError


@pytest.mark.parametrize("target", ["not-an-ip", "10.0.0.300", "", "10.64.0.1/32", " 10.64.0.1"])
def test_a_probe_target_that_is_not_an_address_is_a_file_and_line_error(write_config, target: str) -> None:
    path = write_config(f'[tunnel]\n\n[health]\nprobe_target = "{target}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == (path, 4)
    assert problem.message.startswith(f"health.probe_target: {target!r} is not an IP address")


def test_the_environment_override_is_checked_too(write_config) -> None:
    path = write_config("")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"TUNLOCK_HEALTH_PROBE_TARGET": "gateway"})
    assert str(caught.value.problems[0]).startswith("env TUNLOCK_HEALTH_PROBE_TARGET: health.probe_target")


@pytest.mark.parametrize("target", ["10.64.0.1", "fd00:99::1"])
def test_an_address_is_accepted(write_config, target: str) -> None:
    path = write_config(f'[health]\nprobe_target = "{target}"\n')
    assert load_config(path, {}).settings.health.probe_target == target


def test_a_scoped_address_is_refused(write_config) -> None:
    path = write_config('[health]\nprobe_target = "fe80::1%eth0"\n')
    with pytest.raises(ConfigError, match="without a scope"):
        load_config(path, {})
