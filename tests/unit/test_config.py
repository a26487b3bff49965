"""tunlock.toml: defaults that work, every key validated at its line, env overrides."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigError


def errors(path: Path, environ: dict[str, str] | None = None) -> list[tuple[str, int, str]]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ or {})
    return [(str(p.file), p.line, p.message) for p in caught.value.problems if not p.warning]


def test_empty_file_gives_working_defaults(write_config):
    config = load_config(write_config("", servers=2), {})
    s = config.settings
    assert (s.tunnel.interface, s.tunnel.backend, s.rotation.strategy) == ("tunlock0", "auto", "sequential")
    assert s.lock.allow_lan is False and s.lock.inbound_tcp == [] and s.lock.mode == "permanent"
    assert ip_network("192.168.0.0/16") in s.lock.lan_ranges
    assert [srv.name for srv in config.servers] == ["vpn1", "vpn2"]


def test_relative_control_socket_is_relative_to_the_config(write_config):
    path = write_config('[control]\nsocket = "run/ctl.sock"\n')
    assert load_config(path, {}).settings.control.socket == path.parent / "run/ctl.sock"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            '[tunnel]\nbackend = "kernal"\n',
            2,
            "tunnel.backend: Input should be 'auto', 'kernel' or 'userspace'",
        ),
        ('[tunnel]\ninterface = "much-too-long-name0"\n', 2, "an interface name is 1 to 15"),
        ("[tunnel]\nroute_table = 254\n", 2, "tables 253-255 are the kernel's"),
        ("[tunnel]\nfwmark = 0\n", 2, "tunnel.fwmark: Input should be greater than or equal to 1"),
        (
            '[rotation]\nstrategy = "roundrobin"\n',
            2,
            "rotation.strategy: Input should be 'sequential' or 'random'",
        ),
        ("[health]\ndead_after_s = 0\n", 2, "health.dead_after_s: Input should be greater than 0"),
        (
            "\n[lock]\ninbound_tcp = [80, 70000]\n",
            3,
            "lock.inbound_tcp: Input should be less than or equal to 65535",
        ),
        ("[lock]\ninbound_tcp = [80, 80]\n", 2, "a port is listed twice"),
        ('[lock]\nallow_lan = "yes please"\n', 2, "lock.allow_lan: Input should be a valid boolean"),
        ('[lock]\nlan_ranges = ["10.0.0.0/8", "lan"]\n', 2, "lock.lan_ranges"),
        ('[lock]\nmode = "forever"\n', 2, "lock.mode: Input should be 'permanent' or 'session'"),
        ("[lock]\nalow_lan = true\n", 2, "unknown key 'alow_lan' in [lock] (did you mean 'allow_lan'?)"),
        ("[tunel]\n", 1, "unknown key 'tunel' in the top level (did you mean 'tunnel'?)"),
        ('[metrics]\nlisten = "localhost:9586"\n', 2, "metrics.listen: use IP:port or [IPv6]:port"),
        ('[tunnel]\nservers = ["nothing/*.conf"]\n', 2, "servers pattern 'nothing/*.conf' matches no file"),
        ("[tunnel]\nservers = []\n", 2, "tunnel.servers: List should have at least 1 item"),
        ("[tunnel\n", 1, "TOML: "),
        ("a = 1\na = 2\n", 2, "TOML: Cannot overwrite a value"),
    ],
)
def test_each_key_is_validated_at_its_line(write_config, text, line, message):
    path = write_config(text)
    found = errors(path)
    assert any(f == str(path) and n == line and message in m for f, n, m in found), found


def test_missing_config_and_directory(tmp_path):
    assert errors(tmp_path / "none.toml") == [
        (str(tmp_path / "none.toml"), 0, "no such file; write one (see configs/tunlock.toml)")
    ]
    assert "is a directory" in errors(tmp_path)[0][2]


def test_server_file_problems_are_reported_with_the_config(write_config, write_server):
    path = write_config("")
    write_server("[Interface]\nPrivateKey = nope\n", "broken.conf")
    found = errors(path)
    assert any(f.endswith("broken.conf") and n == 2 and "PrivateKey is 3 bytes" in m for f, n, m in found)


def test_duplicate_server_names_across_patterns(write_config, tmp_path):
    path = write_config('[tunnel]\nservers = ["servers/*.conf", "more/*.conf"]\n')
    other = tmp_path / "more"
    other.mkdir()
    (other / "vpn1.conf").write_text((tmp_path / "servers" / "vpn1.conf").read_text())
    assert any("server name 'vpn1' is taken" in m for _, _, m in errors(path))


def test_two_patterns_naming_one_file_read_it_once(write_config):
    path = write_config('[tunnel]\nservers = ["servers/*.conf", "./servers/vpn1.conf"]\n')
    assert [s.name for s in load_config(path, {}).servers] == ["vpn1"]


@pytest.mark.parametrize(
    ("text", "warned"),
    [
        ('[metrics]\nlisten = "0.0.0.0:9586"\n', True),
        ('[metrics]\nlisten = "[::]:9586"\n[lock]\ninbound_tcp = [9586]\n', False),
        ('[metrics]\nlisten = "127.0.0.1:9586"\n', False),
        ('[metrics]\nlisten = "[::1]:9586"\n', False),
    ],
)
def test_metrics_beyond_loopback_is_warned_about_unless_the_lock_lets_it_in(write_config, text, warned):
    config = load_config(write_config(text), {})
    found = [(p.line, p.message) for p in config.warnings if "metrics.listen" in p.message]
    assert found == (
        [
            (
                2,
                "metrics.listen 0.0.0.0:9586: the lock lets only this host scrape it; add 9586 "
                "to lock.inbound_tcp to let the LAN in",
            )
        ]
        if warned
        else []
    )


def test_env_overrides_every_kind_of_value(write_config):
    environ = {
        "TUNLOCK_LOCK_ALLOW_LAN": "true",
        "TUNLOCK_LOCK_INBOUND_TCP": "9091, 8080",
        "TUNLOCK_TUNNEL_BACKEND": "userspace",
        "TUNLOCK_HEALTH_DEAD_AFTER_S": "2.5",
        "TUNLOCK_LOCK_LAN_RANGES": "192.0.2.0/24",
        "TUNLOCK_CONFIG": "/ignored/by/the/loader",
        "TUNLOCK_LAB_ONLY": "1",
    }
    s = load_config(write_config("[lock]\nallow_lan = false\n"), environ).settings
    assert s.lock.allow_lan is True
    assert s.lock.inbound_tcp == [8080, 9091]
    assert s.tunnel.backend == "userspace"
    assert s.health.dead_after_s == 2.5
    assert s.lock.lan_ranges == [ip_network("192.0.2.0/24")]


def test_bad_env_values_name_the_variable(write_config):
    path = write_config("")
    assert errors(path, {"TUNLOCK_LOCK_INBOUND_TCP": "80,http"})[0][0] == "env TUNLOCK_LOCK_INBOUND_TCP"
    found = errors(path, {"TUNLOCK_LOCK_ALOW_LAN": "1"})
    assert found == [
        (
            "env TUNLOCK_LOCK_ALOW_LAN",
            0,
            "[lock] has no key 'alow_lan' (did you mean TUNLOCK_LOCK_ALLOW_LAN?)",
        )
    ]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[lock]\nadmin_tcp = [0]\n", 2, "lock.admin_tcp: Input should be greater than or equal to 1"),
        (
            "[lock]\nadmin_tcp = [22, 65536]\n",
            2,
            "lock.admin_tcp: Input should be less than or equal to 65535",
        ),
        ("[lock]\nadmin_tcp = [22, 22]\n", 2, "a port is listed twice"),
        ('[lock]\nadmin_tcp = [22]\nadmin_sources = ["office"]\n', 3, "lock.admin_sources"),
        ('[lock]\nadmin_tcp = [22]\nadmin_sources = ["203.0.113.7/24"]\n', 3, "lock.admin_sources"),
        (
            '[lock]\nadmin_tcp = [22]\nadmin_sources = ["203.0.113.0/24", "203.0.113.0/24"]\n',
            3,
            "a network is listed twice",
        ),
        (
            "[tunnel]\nfwmark = 0x746c0022\n",
            2,
            "tunnel.fwmark 0x746c0022 is the mark of the administrator's connections (lock.admin_tcp)",
        ),
    ],
)
def test_admin_keys_are_validated_at_their_line(write_config, text, line, message):
    path = write_config(text)
    found = errors(path)
    assert any(f == str(path) and n == line and message in m for f, n, m in found), found


def test_admin_ports_and_sources_are_read_and_sorted(write_config):
    text = '[lock]\nadmin_tcp = [2222, 22]\nadmin_sources = ["203.0.113.0/24", "2001:db8:203::/64"]\n'
    config = load_config(write_config(text), {})
    assert config.settings.lock.admin_tcp == [22, 2222]
    assert config.settings.lock.admin_sources == [
        ip_network("203.0.113.0/24"),
        ip_network("2001:db8:203::/64"),
    ]
    assert load_config(write_config(""), {}).settings.lock.admin_tcp == []
    from_env = load_config(write_config(""), {"TUNLOCK_LOCK_ADMIN_TCP": "22"}).settings
    assert from_env.lock.admin_tcp == [22]


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("[lock]\nadmin_tcp = [22]\n", None),
        ("[lock]\nadmin_tcp = [22, 2222]\n", "lock.admin_tcp [2222]: any local user may listen"),
        (
            '[lock]\nadmin_sources = ["203.0.113.0/24"]\n',
            "lock.admin_sources is set but lock.admin_tcp is empty",
        ),
    ],
)
def test_admin_settings_that_allow_more_or_less_than_meant_are_warned_about(write_config, text, warning):
    found = [
        (p.line, p.message) for p in load_config(write_config(text), {}).warnings if "admin" in p.message
    ]
    if warning is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0][0] == 2 and warning in found[0][1], found


def test_lock_uplinks_name_interfaces_and_reach_the_policy(write_config):
    from supervisor.lock.configured import policy_from_config

    path = write_config('[lock]\nuplinks = ["eth0", "enp3s0"]\n')
    assert policy_from_config(load_config(path, {})).uplinks == ("eth0", "enp3s0")
    assert load_config(write_config(""), {"TUNLOCK_LOCK_UPLINKS": "wan0"}).settings.lock.uplinks == ["wan0"]
    bad = errors(write_config('[lock]\nuplinks = ["eth0 accept"]\n'))
    assert bad and bad[0][1] == 2, bad
    assert errors(write_config('[lock]\nuplinks = ["a-name-longer-than-15"]\n'))


def test_every_wrong_key_of_a_section_is_reported_once_at_its_line(write_config):
    """A section validated as one value still reports each of its wrong keys (a value of the wrong
    type, a section's own check, an unknown key), each once, in the file's order."""
    path = write_config(
        '[lock]\nlan_ranges = ["lan"]\ninbound_tcp = [22, 22]\nmode = "forever"\nalow_lan = true\n'
        "[tunnel]\nroute_table = 254\n"
    )
    assert errors(path) == [
        (str(path), 2, "lock.lan_ranges: Input is not a valid IPv4 or IPv6 network"),
        (str(path), 3, "lock.inbound_tcp: a port is listed twice"),
        (str(path), 4, "lock.mode: Input should be 'permanent' or 'session'"),
        (str(path), 5, "unknown key 'alow_lan' in [lock] (did you mean 'allow_lan'?)"),
        (str(path), 7, "tunnel.route_table: tables 253-255 are the kernel's default, main and local tables"),
    ]


def test_a_network_written_with_host_bits_says_so(write_config):
    path = write_config('[lock]\nadmin_tcp = [22]\nadmin_sources = ["203.0.113.7/24"]\n')
    wrong = "lock.admin_sources: Input is not a valid IPv4 or IPv6 network"
    assert errors(path) == [(str(path), 3, f"{wrong} (203.0.113.7/24 has host bits set)")]


@pytest.mark.parametrize(("value", "allowed"), [("yes", True), ("On", True), ("n", False), ("0", False)])
def test_env_booleans_take_the_usual_words(write_config, value, allowed):
    settings = load_config(write_config(""), {"TUNLOCK_LOCK_ALLOW_LAN": value}).settings
    assert settings.lock.allow_lan is allowed
