"""The userspace backend's pure parts: the child's environment, its log lines, DeviceConfig."""

from __future__ import annotations

from ipaddress import ip_interface, ip_network
from pathlib import Path

import pytest
import structlog

from supervisor.redact import Secret
from supervisor.servers import Peer, Server
from supervisor.wgquick import parse_endpoint
from supervisor.wireguard.backend import BackendError, DeviceConfig, handshake_age
from supervisor.wireguard.userspace import UserspaceBackend, _Process, open_userspace_backend

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def test_child_environment_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WG_TUN_FD", "7")
    monkeypatch.setenv("WG_UAPI_FD", "8")
    monkeypatch.setenv("TUNLOCK_SECRET_THING", "x")
    env = UserspaceBackend("tl0", log_level="verbose")._child_env()
    assert env["WG_PROCESS_FOREGROUND"] == "1" and env["LOG_LEVEL"] == "verbose"
    assert not {"WG_TUN_FD", "WG_UAPI_FD", "TUNLOCK_SECRET_THING"} & set(env)


def test_wireguard_go_lines_become_log_events_with_their_level() -> None:
    backend = UserspaceBackend("tl0")
    process = _Process(pid=42, pidfd=-1)
    with structlog.testing.capture_logs() as logs:
        backend._log = structlog.get_logger().bind(ifname="tl0")
        backend._log_line(process, "ERROR: (tl0) 2026/11/24 23:40:02 Failed to send handshake initiation")
        backend._log_line(process, "DEBUG: (tl0) 2026/11/24 23:40:02 Interface up requested")
        backend._log_line(process, "something unexpected")
    assert [(e["log_level"], e["output"]) for e in logs] == [
        ("error", "Failed to send handshake initiation"),
        ("debug", "Interface up requested"),
        ("info", "something unexpected"),
    ]
    assert process.last_lines[-1] == "something unexpected"


def test_device_config_for_a_server_carries_its_peer_and_our_fwmark() -> None:
    server = Server(
        name="vpn1",
        path=Path("vpn1.conf"),
        private_key=Secret(KEY),
        addresses=(ip_interface("10.99.0.2/32"),),
        peer=Peer(
            public_key=KEY,
            endpoint=parse_endpoint("198.51.100.11:51820"),
            allowed_ips=(ip_network("0.0.0.0/0"),),
            persistent_keepalive=25,
        ),
        listen_port=51000,
    )
    config = DeviceConfig.for_server(server, fwmark=0xCA6C)
    assert (config.fwmark, config.listen_port, config.peer.persistent_keepalive) == (0xCA6C, 51000, 25)
    assert config.peer.endpoint == server.endpoint and config.private_key == server.private_key
    assert KEY not in repr(config.private_key)


def test_handshake_age() -> None:
    assert handshake_age(None) is None
    assert handshake_age(100.0, now=103.5) == 3.5
    assert handshake_age(110.0, now=103.5) == 0.0  # a clock step back never gives a negative age


@pytest.mark.anyio
async def test_a_missing_wireguard_go_is_a_clear_error(tmp_path: Path) -> None:
    async with open_userspace_backend(
        "tlnone0", binary=str(tmp_path / "wireguard-go"), uapi_dir=tmp_path
    ) as b:
        with pytest.raises(BackendError, match=r"cannot start .*wireguard-go: No such file"):
            await b.ensure_interface()


@pytest.mark.anyio
async def test_a_wireguard_go_that_exits_at_start_says_how(tmp_path: Path) -> None:
    fake = tmp_path / "fake-wireguard-go"
    line = "ERROR: (tl0) 2026/11/24 23:40:02 Failed to create TUN device: busy"
    fake.write_text(f"#!/bin/sh\necho '{line}' >&2\nexit 1\n")
    fake.chmod(0o755)
    async with open_userspace_backend("tlnone0", binary=str(fake), uapi_dir=tmp_path) as backend:
        with pytest.raises(BackendError) as err:
            await backend.ensure_interface()
    assert "exited with status 1 at start: Failed to create TUN device: busy" in str(err.value)
