"""Server files: every validation rule reports its file, line and reason, and no key leaks."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from supervisor.addresses import parse_endpoint
from supervisor.errors import ConfigError, Problem
from supervisor.servers import Endpoint, Server, network_within
from supervisor.wgquick import load_server, read_server

from .samples import PRESHARED_KEY, PRIVATE_KEY, PUBLIC_KEY, VALID_SERVER


def problems_of(path: Path) -> tuple[Server | None, list[Problem]]:
    found: list[Problem] = []
    server = read_server(path, found)
    return server, found


def errors_of(path):
    server, found = problems_of(path)
    assert server is None, "a broken file must not yield a server"
    return [(p.line, p.message) for p in found if not p.warning]


def warnings_of(path):
    server, found = problems_of(path)
    assert server is not None
    return [(p.line, p.message) for p in found if p.warning]


def replace(old: str, new: str) -> str:
    assert old in VALID_SERVER
    return VALID_SERVER.replace(old, new)


def test_valid_file_gives_a_normalised_server(write_server):
    server = load_server(write_server(VALID_SERVER, "se-sto-1.conf"))
    assert server.name == "se-sto-1"
    assert server.endpoint == Endpoint(ip_address("198.51.100.11"), 51820)
    assert [str(a) for a in server.addresses] == ["10.64.1.2/32", "fd00:64:1::2/128"]
    assert server.peer.allowed_ips == (ip_network("0.0.0.0/0"), ip_network("::/0"))
    assert server.dns == (ip_address("10.64.1.1"),)
    assert server.peer.persistent_keepalive == 25
    assert server.private_key.reveal() == PRIVATE_KEY
    assert server.peer.preshared_key is not None
    assert server.peer.preshared_key.reveal() == PRESHARED_KEY
    assert PRIVATE_KEY not in repr(server) and PRESHARED_KEY not in repr(server)


def test_keys_are_case_insensitive_and_lists_may_span_lines(write_server):
    text = replace(
        "Address = 10.64.1.2/32, fd00:64:1::2/128", "address = 10.64.1.2/32\nADDRESS = fd00:64:1::2/128"
    )
    server = load_server(write_server(text))
    assert len(server.addresses) == 2


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        (f"PrivateKey = {PRIVATE_KEY}", "PrivateKey = not-a-key!", 2, "PrivateKey is not base64"),
        (
            f"PrivateKey = {PRIVATE_KEY}",
            "PrivateKey = AAAA",
            2,
            "PrivateKey is 3 bytes, a WireGuard key is 32",
        ),
        (f"PublicKey = {PUBLIC_KEY}", f"PublicKey = {PUBLIC_KEY[:-4]}", 7, "PublicKey is"),
        (f"PresharedKey = {PRESHARED_KEY}", "PresharedKey = x", 8, "PresharedKey is not base64"),
        (
            "Address = 10.64.1.2/32, fd00:64:1::2/128",
            "Address = 10.64.1.300/32",
            3,
            "Address entry '10.64.1.300/32' is not an IP address",
        ),
        ("AllowedIPs = 0.0.0.0/0, ::/0", "AllowedIPs = 0.0.0.0/0, nope", 10, "AllowedIPs entry 'nope'"),
        ("Endpoint = 198.51.100.11:51820", "Endpoint = 198.51.100.11", 9, "has no port"),
        (
            "Endpoint = 198.51.100.11:51820",
            "Endpoint = 198.51.100.11:0",
            9,
            "port '0' must be a number from 1",
        ),
        ("Endpoint = 198.51.100.11:51820", "Endpoint = 198.51.100.11:65536", 9, "from 1 to 65535"),
        ("Endpoint = 198.51.100.11:51820", "Endpoint = 2001:db8::1:51820", 9, "in brackets"),
        ("Endpoint = 198.51.100.11:51820", "Endpoint = [2001:db8::1]51820", 9, "must be [IPv6]:port"),
        (
            "Endpoint = 198.51.100.11:51820",
            "Endpoint = vpn.example.net:51820",
            9,
            "is a name, not an IP address: resolving it would need DNS outside the tunnel",
        ),
        (
            "Endpoint = 198.51.100.11:51820",
            "Endpoint = 198.51.100.11:51820, 198.51.100.12:51820",
            9,
            "Endpoint takes exactly one value",
        ),
        (
            "PersistentKeepalive = 25",
            "PersistentKeepalive = 70000",
            11,
            "PersistentKeepalive must be a whole number",
        ),
        ("PersistentKeepalive = 25", "PersistentKeepalive = soon", 11, "PersistentKeepalive must be"),
        ("DNS = 10.64.1.1", "DNS = 10.64.1.1\nMTU = 1000", 5, "MTU must be a whole number from 1280 to 9000"),
        ("DNS = 10.64.1.1", "DNS = 10.64.1.1\nListenPort = 0", 5, "ListenPort must be a whole number from 1"),
        (
            "DNS = 10.64.1.1",
            "DNS = 10.64.1.1\nPrivatKey = x",
            5,
            "unknown key 'PrivatKey' (did you mean PrivateKey?)",
        ),
        (f"PrivateKey = {PRIVATE_KEY}\n", "", 1, "[Interface] has no PrivateKey"),
        ("Endpoint = 198.51.100.11:51820\n", "", 6, "[Peer] has no Endpoint"),
        ("AllowedIPs = 0.0.0.0/0, ::/0\n", "", 6, "[Peer] has no AllowedIPs"),
        ("[Peer]", "[Peer]\n[Peer]", 7, "exactly one [Peer], found 2"),
        ("[Peer]", "[Pear]", 6, "unknown section '[Pear]'"),
        ("DNS = 10.64.1.1", "DNS = 10.64.1.1\njust words", 5, "expected 'Key = value'"),
    ],
)
def test_each_rule_reports_line_and_reason(write_server, old, new, line, message):
    errors = errors_of(write_server(replace(old, new)))
    assert any(n == line and message in m for n, m in errors), errors


def test_no_peer_at_all(write_server):
    text = VALID_SERVER.split("[Peer]")[0]
    assert (0, "a server file holds exactly one [Peer], found 0") in errors_of(write_server(text))


def test_every_problem_is_reported_at_once(write_server):
    text = replace("Endpoint = 198.51.100.11:51820", "Endpoint = nowhere").replace(
        "PersistentKeepalive = 25", "PersistentKeepalive = -1"
    )
    lines = sorted(n for n, _ in errors_of(write_server(text)))
    assert lines == [9, 11]


@pytest.mark.parametrize("hook", ["PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig", "Table", "FwMark"])
def test_hooks_are_never_run_but_named_in_a_warning(write_server, hook):
    text = replace("DNS = 10.64.1.1", f"DNS = 10.64.1.1\n{hook} = iptables -F")
    assert (
        5,
        f"{hook} is ignored: tunlock never runs hooks and does its own routing and firewall marking",
    ) in (warnings_of(write_server(text)))


def test_group_readable_private_key_is_warned_about(write_server):
    warnings = warnings_of(write_server(VALID_SERVER, mode=0o644))
    assert any("readable by group or others (mode 0644)" in m for _, m in warnings)
    assert not warnings_of(write_server(VALID_SERVER, "b.conf", mode=0o600))


def test_search_domain_in_dns_is_ignored_with_a_warning(write_server):
    server, found = problems_of(write_server(replace("DNS = 10.64.1.1", "DNS = 10.64.1.1, corp.example")))
    assert server is not None and server.dns == (ip_address("10.64.1.1"),)
    assert [(p.line, "search domain" in p.message) for p in found if p.warning] == [(4, True)]


def test_split_allowed_ips_is_warned_about(write_server):
    warnings = warnings_of(write_server(replace("AllowedIPs = 0.0.0.0/0, ::/0", "AllowedIPs = 10.0.0.0/8")))
    assert any(n == 10 and "blocked by the lock" in m for n, m in warnings)


def test_disabled_wgconfig_lines_stay_comments(write_server):
    # Some tools write '#! ' lines to disable one (wgconfig revives them); wg-quick treats them as
    # comments, and so must we.
    text = replace("DNS = 10.64.1.1", "DNS = 10.64.1.1\n#! PostUp = rm -rf /")
    assert warnings_of(write_server(text)) == []


def test_inline_comments_end_a_value(write_server):
    text = replace("PersistentKeepalive = 25", "PersistentKeepalive = 25 #! provider default")
    server, found = problems_of(write_server(text))
    assert server is not None and server.peer.persistent_keepalive == 25 and found == []


def test_digits_int_refuses_are_a_reported_problem(write_server):
    # str.isnumeric() accepts superscripts; int() does not.
    text = replace("PersistentKeepalive = 25", "PersistentKeepalive = \u00b2")
    message = "PersistentKeepalive must be a whole number from 0 to 65535"
    assert errors_of(write_server(text)) == [(11, message)]
    text = replace("198.51.100.11:51820", "198.51.100.11:5\u00b2")
    assert errors_of(write_server(text)) == [(9, "endpoint port '5\u00b2' must be a number from 1 to 65535")]


def test_messages_never_hold_a_private_key(write_server):
    broken = PRIVATE_KEY[:-2] + "x="
    text = replace(f"PrivateKey = {PRIVATE_KEY}", f"PrivateKey = {broken}")
    with pytest.raises(ConfigError) as caught:
        load_server(write_server(text))
    assert broken not in str(caught.value) and PRIVATE_KEY not in str(caught.value)


def test_unreadable_and_binary_files(write_server, tmp_path):
    errors = errors_of(tmp_path / "missing.conf")
    assert errors and "cannot read" in errors[0][1]
    path = tmp_path / "bin.conf"
    path.write_bytes(b"\xff\xfe\x00")
    assert errors_of(path) == [(1, "not UTF-8 text (byte 0xff)")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("198.51.100.1:1", "198.51.100.1:1"), ("[2001:db8::1]:51820", "[2001:db8::1]:51820")],
)
def test_parse_endpoint_round_trips(text, expected):
    assert str(parse_endpoint(text)) == expected


def test_a_single_value_key_given_twice(write_server):
    text = replace("Endpoint = 198.51.100.11:51820", "Endpoint = 198.51.100.11:51820\nPublicKey = x")
    assert (10, "PublicKey is given twice (first at line 7)") in errors_of(write_server(text))


@pytest.mark.parametrize(
    "module",
    [
        "supervisor.servers",  # the lock, net and wireguard import it for the types alone
        "supervisor.addresses",  # endpoint parsing, which the UAPI adapter needs
        "supervisor.wireguard.uapi",
    ],
)
def test_the_plain_data_and_endpoint_parsing_import_neither_reader(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m in ('supervisor.wgquick', 'supervisor.files', 'wgconfig')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("10.1.2.0/24", "10.0.0.0/8", True),
        ("10.0.0.0/8", "10.1.2.0/24", False),
        ("fd00:1::/64", "fd00::/8", True),
        ("10.0.0.0/8", "::/0", False),  # across versions: no, where ipaddress would raise
        ("fe80::/10", "0.0.0.0/0", False),
    ],
)
def test_network_within(inner: str, outer: str, within: bool) -> None:
    assert network_within(ip_network(inner), ip_network(outer)) is within
