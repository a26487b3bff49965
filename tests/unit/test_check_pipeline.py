"""`tunlock check` reads servers its own way (digests, in parallel) but must judge like `run`.

check.read_checked and config.load_config share the settings half; each reads the server files
with its own reader. For the same directory both must give the same verdict: the same problems
(ConfigError), or the same warnings in the same order and the same servers (a digest per Server).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.check import PARALLEL_FROM_FILES, read_checked, summary
from supervisor.config import Config, load_config
from supervisor.errors import ConfigError
from supervisor.servers import Server

from .samples import VALID_SERVER
from .test_parsers_property import PROPERTY_SETTINGS, VALID_CONFIG, mutated

ENDPOINT = "198.51.100.11:51820"


def server(host: int = 11, port: int = 51820, edits: dict[str, str] | None = None) -> str:
    """VALID_SERVER with its own endpoint and each ``old: new`` of ``edits`` replaced."""
    text = VALID_SERVER.replace(ENDPOINT, f"198.51.100.{host}:{port}")
    for old, new in (edits or {}).items():
        assert old in text
        text = text.replace(old, new)
    return text


def as_digest(s: Server) -> tuple[str, tuple[int, int, int], tuple[int, ...]]:
    endpoint = (s.endpoint.family, int(s.endpoint.host), s.endpoint.port)
    return s.name, endpoint, tuple(sorted(s.families))


def run_verdict(config: Path, environ: dict[str, str]) -> tuple:
    try:
        loaded = load_config(config, environ)
    except ConfigError as err:
        return "refused", [str(p) for p in err.problems]
    return "ok", [str(p) for p in loaded.warnings], [as_digest(s) for s in loaded.servers], loaded


def check_verdict(config: Path, environ: dict[str, str]) -> tuple:
    try:
        checked = read_checked(config, environ)
    except ConfigError as err:
        return "refused", [str(p) for p in err.problems]
    return "ok", [str(p) for p in checked.warnings], [tuple(d) for d in checked.servers], checked


def assert_same_verdict(config: Path, environ: dict[str, str]) -> tuple:
    run, check = run_verdict(config, environ), check_verdict(config, environ)
    assert run[:3] == check[:3]
    if run[0] == "ok":
        loaded: Config = run[3]
        assert check[3].settings == loaded.settings and check[3].path == loaded.path
    return run


def write_tree(
    root: Path, config: str, files: Mapping[str, str | bytes], loose: frozenset[str] = frozenset()
) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text == "<dir>":
            path.mkdir()
            continue
        if text == "<fifo>":
            os.mkfifo(path)
            continue
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        path.chmod(0o644 if name in loose else 0o600)
    (root / "tunlock.toml").write_text(config, encoding="utf-8", errors="surrogatepass")
    return root / "tunlock.toml"


TWO_DIRS = '[tunnel]\nservers = ["servers/*.conf", "more/*.conf"]\n'
# name: (tunlock.toml, server files by path, files readable by others, environment)
# name: (tunlock.toml's extra lines, the files by path, the paths others may read, the environment)
Case = tuple[str, Mapping[str, str | bytes], set[str], dict[str, str]]
BROKEN: dict[str, Case] = {
    "valid, one file readable by others": (
        "",
        {"servers/a.conf": server(), "servers/b.conf": server(12)},
        {"servers/b.conf"},
        {},
    ),
    "a pattern matching nothing": (TWO_DIRS, {"servers/a.conf": server()}, set(), {}),
    "a name taken twice": (TWO_DIRS, {"servers/a.conf": server(), "more/a.conf": server(12)}, set(), {}),
    "a directory and a FIFO matched": (
        "",
        {"servers/a.conf": server(), "servers/d.conf": "<dir>", "servers/f.conf": "<fifo>"},
        set(),
        {},
    ),
    "not UTF-8": ("", {"servers/a.conf": server().encode() + b"\n# \xff\n"}, set(), {}),
    "empty file": ("", {"servers/a.conf": ""}, set(), {}),
    "Address prefix too long": (
        "",
        {"servers/a.conf": server(edits={"10.64.1.2/32": "10.64.1.2/33"})},
        set(),
        {},
    ),
    "Address with a scope": (
        "",
        {"servers/a.conf": server(edits={"10.64.1.2/32": "fe80::1%eth0/64"})},
        set(),
        {},
    ),
    "Address not a number prefix": (
        "",
        {"servers/a.conf": server(edits={"10.64.1.2/32": "10.64.1.2/x"})},
        set(),
        {},
    ),
    "IPv6 Address alone, search domain in DNS": (
        "",
        {
            "servers/a.conf": server(
                edits={"10.64.1.2/32, ": "", "DNS = 10.64.1.1": "DNS = 10.64.1.1, corp.example"}
            )
        },
        set(),
        {},
    ),
    "hostname endpoint and a hook": (
        "",
        {
            "servers/a.conf": server().replace(ENDPOINT, "vpn.example:51820") + "[Interface]\n",
            "servers/b.conf": server(12) + "PostUp = x\n",
        },
        set(),
        {},
    ),
    "unknown env key and a broken server": (
        "",
        {"servers/a.conf": server(edits={"PersistentKeepalive = 25": "PersistentKeepalive = -1"})},
        set(),
        {"TUNLOCK_TUNNEL_NOPE": "x"},
    ),
    "a server named like shell code": (
        "",
        {"servers/a.conf": server(), "servers/s2$(echo INJECTED).conf": server(12)},
        set(),
        {},
    ),
    "a server named like an option": ("", {"servers/-rf.conf": server()}, set(), {}),
    "unknown env key alone": ("", {"servers/a.conf": server()}, set(), {"TUNLOCK_LOCK_ALLOWLAN": "true"}),
    "env value invalid": ("", {"servers/a.conf": server()}, set(), {"TUNLOCK_LOCK_INBOUND_TCP": "0"}),
    "TOML syntax": ("[tunnel\n", {"servers/a.conf": server()}, set(), {}),
    "a key invalid": ("[lock]\ninbound_tcp = [0]\n", {"servers/a.conf": server()}, set(), {}),
    "an unknown plugins key and a broken server": (
        "[plugins]\nbogus = 1\n",
        {"servers/a.conf": "[Peer]\n"},
        set(),
        {},
    ),
    "an unknown plugins key, servers fine": (
        "[plugins]\nbogus = 1\n",
        {"servers/a.conf": server()},
        set(),
        {},
    ),
    "warnings of servers, metrics and plugins": (
        '[metrics]\nlisten = "192.0.2.1:9586"\n[plugins.natpmp]\ngateway = "10.0.0.1"\n',
        {"servers/a.conf": server(edits={"0.0.0.0/0, ::/0": "10.0.0.0/8"}), "servers/b.conf": server(12)},
        {"servers/a.conf"},
        {},
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_check_and_run_give_the_same_verdict(tmp_path, case):
    config, files, loose, environ = BROKEN[case]
    verdict = assert_same_verdict(write_tree(tmp_path, config, files, frozenset(loose)), environ)
    # Each row is what its name says: a refusal, or warnings; never a silent pass.
    assert verdict[1], verdict


def test_the_table_covers_refusals_and_passes(tmp_path):
    outcomes = set()
    for i, (config, files, loose, environ) in enumerate(BROKEN.values()):
        root = tmp_path / str(i)
        root.mkdir()
        outcomes.add(run_verdict(write_tree(root, config, files, frozenset(loose)), environ)[0])
    assert outcomes == {"ok", "refused"}


def test_the_summary_counts_what_run_would_load(tmp_path):
    files = {
        "servers/a.conf": server(),
        "servers/b.conf": server(12).replace("198.51.100.12:51820", "[2001:db8::1]:51820"),
    }
    files["servers/c.conf"] = server(11)  # the same endpoint as a.conf: one endpoint, two servers
    config = write_tree(tmp_path, "", files)
    assert summary(read_checked(config, {})) == (
        f"{config}: ok: 3 servers, 2 endpoints over IPv4+IPv6, tunnel carries IPv4+IPv6"
    )
    assert len(load_config(config, {}).servers) == 3


def test_a_directory_read_in_shares_gives_the_same_verdict(tmp_path):
    # Past PARALLEL_FROM_FILES check reads in forked shares: problems from every share, in order.
    count = PARALLEL_FROM_FILES + 50
    files: dict[str, str | bytes] = {
        f"servers/vpn{i:04d}.conf": server(i % 250 + 1, 51820 + i // 250) for i in range(count)
    }
    loose = frozenset({"servers/vpn0003.conf", f"servers/vpn{count - 3:04d}.conf"})
    config = write_tree(tmp_path, "", files, loose)
    passing = assert_same_verdict(config, {})
    assert passing[0] == "ok" and len(passing[1]) == 2 and len(passing[2]) == count

    (tmp_path / "servers" / "vpn0000.conf").write_text(server().replace(ENDPOINT, "vpn.example:1"))
    (tmp_path / "servers" / f"vpn{count - 1:04d}.conf").write_text("[Interface]\n")
    refused = assert_same_verdict(config, {})
    assert refused[0] == "refused"
    assert {Path(p.partition(":")[0]).name for p in refused[1]} == {
        "vpn0000.conf",
        f"vpn{count - 1:04d}.conf",
    }


CONFIGS = st.sampled_from(["", TWO_DIRS, "[plugins]\nbogus = 1\n", '[metrics]\nlisten = "192.0.2.1:9586"\n'])
ENVIRONS = st.sampled_from([{}, {"TUNLOCK_TUNNEL_NOPE": "x"}, {"TUNLOCK_LOCK_ALLOW_LAN": "maybe"}])
SERVER_TEXTS = st.one_of(
    st.builds(server, st.integers(1, 3)),
    mutated(VALID_SERVER),
    st.text(max_size=80),
)


@PROPERTY_SETTINGS
@given(
    config=CONFIGS | mutated(VALID_CONFIG),
    environ=ENVIRONS,
    texts=st.lists(
        st.tuples(st.sampled_from(["servers", "more"]), SERVER_TEXTS, st.booleans()), min_size=1, max_size=4
    ),
)
def test_check_and_run_agree_on_any_directory(config, environ, texts):
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, str | bytes] = {}
        loose = set()
        for i, (folder, text, readable) in enumerate(texts):
            name = f"{folder}/s{i % 3}.conf"  # s0 in both folders: names taken twice happen
            files[name] = text
            if readable:
                loose.add(name)
        assert_same_verdict(write_tree(Path(tmp), config, files, frozenset(loose)), environ)


@pytest.mark.parametrize(
    "name", ["s2$(echo INJECTED)", "a b", "x;reboot", "`id`", "-rf", "é", "x" * 65, "a\nb"]
)
def test_a_server_file_whose_name_is_not_a_safe_name_is_refused_by_run_and_check(tmp_path, name):
    """The name ends up in hooks, logs and labels: ``run`` refuses the file (and ``check`` alike),
    naming it, so that a hook like ``sh -c "echo {server}"`` never gets shell code as a name."""
    config = write_tree(tmp_path, "", {"servers/a.conf": server(), f"servers/{name}.conf": server(12)})
    verdict = assert_same_verdict(config, {})
    assert verdict[0] == "refused"
    assert verdict[1] == [
        f"{tmp_path / 'servers' / (name + '.conf')}: server name {name!a} is refused: a server's name "
        "(the file's name without its extension) may hold only letters, digits, '.', '_' and '-', "
        "start with a letter, digit or '_', and be at most 64 characters; rename the file"
    ]


def test_ordinary_provider_file_names_stay_valid(tmp_path):
    names = ["vpn1", "ch-zurich-01", "wg-CH-12", "se.got.wg.001", "_spare", "x" * 64]
    files: dict[str, str | bytes] = {f"servers/{n}.conf": server(i + 1) for i, n in enumerate(names)}
    verdict = assert_same_verdict(write_tree(tmp_path, "", files), {})
    assert verdict[0] == "ok" and sorted(d[0] for d in verdict[2]) == sorted(names)
