"""Fixtures for the pure tests: server files written into a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.lock import guard as guard_module

from .memory_nft import MemoryNft
from .samples import VALID_SERVER


@pytest.fixture
def write_server(tmp_path: Path):
    def write(text: str, name: str = "vpn1.conf", mode: int = 0o600) -> Path:
        path = tmp_path / "servers" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    return write


@pytest.fixture
def write_config(tmp_path: Path, write_server):
    def write(text: str = "", servers: int = 1) -> Path:
        for i in range(servers):
            write_server(VALID_SERVER.replace("198.51.100.11", f"198.51.100.{11 + i}"), f"vpn{i + 1}.conf")
        path = tmp_path / "tunlock.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def memory_nft(monkeypatch: pytest.MonkeyPatch) -> MemoryNft:
    """``supervisor.lock.nft`` as the lock guard calls it, replaced by a table held in memory."""
    fake = MemoryNft()
    for name in ("apply", "swap_endpoints", "swap_tunnel_inbound", "listing", "reading"):
        monkeypatch.setattr(guard_module.nft, name, getattr(fake, name))
    return fake
