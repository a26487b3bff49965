"""tunlock.toml: the configuration contract, validated by pydantic.

The section and key names are a public contract (see docs/configuration.md);
extend them, never rename them. ``load_config`` reads the file, applies
``TUNLOCK_<SECTION>_<KEY>`` environment overrides and loads the server files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from supervisor.servers import Server


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TunnelSection(_Section):
    interface: str = "tunlock0"
    backend: Literal["auto", "kernel", "userspace"] = "auto"
    servers: list[str] = Field(default_factory=lambda: ["servers/*.conf"])
    # Marks the tunnel's own encrypted UDP so the lock and the routing rule can tell
    # it from everything else (wg-quick uses 51820 too).
    fwmark: int = 0xCA6C
    route_table: int = 51820


class RotationSection(_Section):
    strategy: Literal["sequential", "random"] = "sequential"
    cooldown_s: float = 60.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 60.0


class HealthSection(_Section):
    interval_s: float = 1.0
    dead_after_s: float = 3.0
    probe_target: str | None = None
    handshake_max_age_s: float = 180.0
    connect_timeouts_s: list[float] = Field(default_factory=lambda: [4.0, 8.0, 15.0])


class LockSection(_Section):
    mode: Literal["permanent", "session"] = "permanent"
    table: str = "tunlock"
    allow_lan: bool = False
    inbound_tcp: list[int] = Field(default_factory=list)


class ControlSection(_Section):
    socket: Path = Path("/run/tunlock/control.sock")


class MetricsSection(_Section):
    listen: str | None = None


class DnsSection(_Section):
    manage: bool = True
    resolv_conf: Path = Path("/etc/resolv.conf")


class ConfigFile(_Section):
    tunnel: TunnelSection = Field(default_factory=TunnelSection)
    rotation: RotationSection = Field(default_factory=RotationSection)
    health: HealthSection = Field(default_factory=HealthSection)
    lock: LockSection = Field(default_factory=LockSection)
    control: ControlSection = Field(default_factory=ControlSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    dns: DnsSection = Field(default_factory=DnsSection)


@dataclass(frozen=True)
class Config:
    """The validated configuration plus the servers its globs name."""

    path: Path
    settings: ConfigFile
    servers: tuple[Server, ...]


def load_config(path: Path) -> Config:
    """Read and validate ``path`` and its server files; raise ConfigError with every problem."""
    raise NotImplementedError
