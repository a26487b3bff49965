"""Real torrent clients in the lab's client namespace: qbittorrent-nox and transmission-daemon.

Each runs with a profile of its own under the lab's directory, its web API on loopback with a
password (qBittorrent's localhost bypass stays off, as by default), DHT, local peer discovery
and port mapping off so that the clients only listen. ``listening_ports`` reads the kernel's
socket table (``ss``), which is what a peer would meet, not what the client's API claims.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from pathlib import Path

from supervisor.lab.topology import Lab, _kill

QBT_WEBUI_PORT = 8080
QBT_USER, QBT_PASSWORD = "seedbox", "lab-qbt-password"
TRANSMISSION_RPC_PORT = 9091
TRANSMISSION_USER, TRANSMISSION_PASSWORD = "seedbox", "lab-transmission-password"


def _pbkdf2(password: str) -> str:
    """qBittorrent's WebUI\\Password_PBKDF2: PBKDF2-HMAC-SHA512, 100000 rounds, 16-byte salt."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 100_000)
    return f'"@ByteArray({base64.b64encode(salt).decode()}:{base64.b64encode(digest).decode()})"'


def start_qbittorrent(lab: Lab, port: int = 6881, role: str = "client") -> subprocess.Popen:
    """qbittorrent-nox with a fresh config that listens on ``port`` (its default is 6881), in
    ``role``'s namespace (``app``: namespace mode's)."""
    profile = lab.dir / "qbt"
    config = profile / "qBittorrent" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "qBittorrent.conf").write_text(
        "[LegalNotice]\nAccepted=true\n\n"
        "[BitTorrent]\n"
        f"Session\\Port={port}\nSession\\DHTEnabled=false\nSession\\LSDEnabled=false\n"
        "Session\\PeXEnabled=false\n\n"
        "[Preferences]\n"
        "Connection\\UPnP=false\n"
        f"WebUI\\Port={QBT_WEBUI_PORT}\nWebUI\\Address=127.0.0.1\n"
        f"WebUI\\Username={QBT_USER}\nWebUI\\Password_PBKDF2={_pbkdf2(QBT_PASSWORD)}\n"
        "WebUI\\LocalHostAuth=true\nWebUI\\UPnP=false\n"
    )
    return lab.spawn(
        role,
        ["qbittorrent-nox", f"--profile={profile}", f"--webui-port={QBT_WEBUI_PORT}"],
        "qbittorrent.log",
        env={**os.environ, "HOME": str(profile)},
    )


def start_transmission(lab: Lab, port: int = 51413) -> subprocess.Popen:
    """transmission-daemon listening on ``port``, its RPC behind a user and password."""
    config = lab.dir / "transmission"
    config.mkdir(exist_ok=True)
    return lab.spawn(
        "client",
        [
            "transmission-daemon", "-f", "-g", str(config), "-p", str(TRANSMISSION_RPC_PORT),
            "-P", str(port), "-t", "-u", TRANSMISSION_USER, "-v", TRANSMISSION_PASSWORD,
            "-O", "-Y", "-M", "--no-utp", "-w", str(config / "downloads"), "--log-error",
        ],
        "transmission.log",
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    _kill(proc.pid, timeout=10)
    proc.wait(10)


def listening_ports(lab: Lab, pid: int, ignore: int, role: str = "client") -> set[int]:
    """TCP ports process ``pid`` listens on in ``role``'s namespace (its API port ``ignore``d)."""
    out = lab.run(role, "ss", "-ltnpH")
    ports = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            match = re.search(r":(\d+)\s+\S+:\*", line) or re.search(r"\]:(\d+)\s", line)
            if match and int(match.group(1)) != ignore:
                ports.add(int(match.group(1)))
    return ports


def write_secret(lab: Lab, name: str, secret: str) -> Path:
    path = lab.dir / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path
