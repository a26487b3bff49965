"""Which configurations and hosts get the tunnel before the daemon (supervisor/early_tunnel.py).

Pure: the facts the host would give (the lock's table present, WireGuard in the kernel, a tunnel
interface already there) are passed in; the lab tests run the bring-up itself.
"""

from __future__ import annotations

import random

import pytest

from supervisor.config import load_config
from supervisor.early_tunnel import first_server, refusal

HOST = {"lock_present": True, "kernel": False, "link_present": False, "uapi_served": False}


@pytest.fixture
def config_of(write_config):
    def make(text: str = "", servers: int = 1):
        return load_config(write_config(text, servers=servers), {})

    return make


@pytest.mark.parametrize("backend", ["userspace", "auto"])
def test_wireguard_go_with_the_lock_in_place_and_no_interface_goes_first(config_of, backend) -> None:
    config = config_of(f'[tunnel]\nbackend = "{backend}"\n')
    assert refusal(config.settings, **HOST) is None


@pytest.mark.parametrize(
    ("toml", "host", "reason"),
    [
        ("", {"lock_present": False}, "the lock (table inet tunlock) is not in place"),
        ('[lock]\ntable = "boot"\n', {"lock_present": False}, "the lock (table inet boot) is not in place"),
        ('[tunnel]\nbackend = "kernel"\n', {}, "the kernel backend"),
        ('[tunnel]\nbackend = "auto"\n', {"kernel": True}, "the kernel backend"),
        ('[tunnel]\nnamespace = "vpn"\n', {}, "namespace mode"),
        ("", {"link_present": True}, "the tunnel interface exists already (the daemon adopts it)"),
        ("", {"uapi_served": True}, "the tunnel interface exists already (the daemon adopts it)"),
    ],
)
def test_everything_else_starts_as_before(config_of, toml, host, reason) -> None:
    assert refusal(config_of(toml).settings, **{**HOST, **host}) == reason


def test_userspace_is_chosen_even_on_a_kernel_with_wireguard(config_of) -> None:
    config = config_of('[tunnel]\nbackend = "userspace"\n')
    assert refusal(config.settings, **{**HOST, "kernel": True}) is None


def test_the_server_is_the_first_the_lock_lets_through_or_any_of_them(config_of) -> None:
    sequential = config_of("", servers=3)
    assert first_server(sequential, sequential.servers).name == "vpn1"
    # A lock a stopped daemon left lets through the server it was on only.
    assert first_server(sequential, sequential.servers[1:2]).name == "vpn2"
    randomly = config_of('[rotation]\nstrategy = "random"\n', servers=3)
    picks = {first_server(randomly, randomly.servers, random.Random(seed)).name for seed in range(20)}
    assert picks == {"vpn1", "vpn2", "vpn3"}
    picks = {first_server(randomly, randomly.servers[1:], random.Random(seed)).name for seed in range(20)}
    assert picks == {"vpn2", "vpn3"}
