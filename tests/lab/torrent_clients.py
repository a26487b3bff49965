"""Real torrent clients in the lab's client namespace: qbittorrent-nox, transmission-daemon, and
deluged with deluge-web in front of it.

Each runs with a profile of its own under the lab's directory, its web API on loopback with a
password (qBittorrent's localhost bypass stays off, as by default), DHT, local peer discovery
and port mapping off so that the clients only listen. ``listening_ports`` reads the kernel's
socket table (``ss``), which is what a peer would meet, not what the client's API claims.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from supervisor.lab.topology import Lab, _kill

QBT_WEBUI_PORT = 8080
QBT_USER, QBT_PASSWORD = "seedbox", "lab-qbt-password"
TRANSMISSION_RPC_PORT = 9091
TRANSMISSION_USER, TRANSMISSION_PASSWORD = "seedbox", "lab-transmission-password"
DELUGE_WEB_PORT, DELUGE_DAEMON_PORT = 8112, 58846
DELUGE_PASSWORD = "lab-deluge-password"


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


def _deluge_config(path: Path, values: dict) -> None:
    """A Deluge config file: its version header, then the values (Deluge's own layout)."""
    path.write_text(json.dumps({"file": 1, "format": 1}) + json.dumps(values, indent=2))


def start_deluge(lab: Lab, port: int = 6881) -> subprocess.Popen:
    """deluged listening on ``port`` (DHT, UPnP, NAT-PMP, LSD off), its config under the lab's
    directory; deluge-web in front of it on loopback, started with the first deluged (the
    same config directory: the Web UI finds the daemon's local credentials there)."""
    config = lab.dir / "deluge"
    if not config.exists():
        config.mkdir()
        core = {
            "listen_ports": [port, port], "random_port": False, "dht": False, "upnp": False,
            "natpmp": False, "lsd": False, "utpex": False, "new_release_check": False,
            "download_location": str(config / "downloads"),
        }  # fmt: skip
        _deluge_config(config / "core.conf", core)
        salt = os.urandom(20).hex()
        digest = hashlib.sha1((salt + DELUGE_PASSWORD).encode()).hexdigest()  # Deluge's own format
        web = {"pwd_salt": salt, "pwd_sha1": digest, "interface": "127.0.0.1", "port": DELUGE_WEB_PORT}
        _deluge_config(config / "web.conf", web)
    daemon = lab.spawn(
        "client",
        [
            "deluged",
            "-d",
            "-c",
            str(config),
            "-u",
            "127.0.0.1",
            "-p",
            str(DELUGE_DAEMON_PORT),
            "-L",
            "warning",
        ],
        "deluged.log",
    )
    if not (config / "web.started").exists():
        (config / "web.started").touch()
        lab.spawn(
            "client",
            [
                "deluge-web",
                "-d",
                "-c",
                str(config),
                "-i",
                "127.0.0.1",
                "-p",
                str(DELUGE_WEB_PORT),
                "-L",
                "warning",
            ],
            "deluge-web.log",
        )
    return daemon


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


PREFERENCES = """
import json, sys, urllib.parse, urllib.request
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
base = f"http://127.0.0.1:{sys.argv[1]}/api/v2"
login = urllib.parse.urlencode({"username": sys.argv[2], "password": sys.argv[3]}).encode()
assert opener.open(f"{base}/auth/login", login).read() == b"Ok."
print(opener.open(f"{base}/app/preferences").read().decode())
"""


def qbittorrent_preferences(lab: Lab) -> dict:
    """qBittorrent's own preferences, asked from inside the client namespace (its WebUI)."""
    out = lab.run("client", sys.executable, "-c", PREFERENCES, str(QBT_WEBUI_PORT), QBT_USER, QBT_PASSWORD)
    return json.loads(out)


TRANSMISSION_SESSION = """
import base64, json, sys, urllib.error, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/transmission/rpc"
auth = "Basic " + base64.b64encode(f"{sys.argv[2]}:{sys.argv[3]}".encode()).decode()
body = json.dumps({"method": "session-get", "arguments": {}}).encode()
headers = {"Authorization": auth}
try:
    urllib.request.urlopen(urllib.request.Request(url, body, headers))
except urllib.error.HTTPError as e:
    headers["X-Transmission-Session-Id"] = e.headers["X-Transmission-Session-Id"]
print(urllib.request.urlopen(urllib.request.Request(url, body, headers)).read().decode())
"""


def transmission_session(lab: Lab) -> dict:
    """Transmission's session-get, asked from inside the client namespace."""
    argv = [sys.executable, "-c", TRANSMISSION_SESSION, str(TRANSMISSION_RPC_PORT)]
    out = lab.run("client", *argv, TRANSMISSION_USER, TRANSMISSION_PASSWORD)
    return json.loads(out)["arguments"]


DELUGE_CONFIG = """
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
url = f"http://127.0.0.1:{sys.argv[1]}/json"
def call(method, *params):
    body = json.dumps({"method": method, "params": list(params), "id": 1}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    return json.loads(opener.open(request).read())["result"]
assert call("auth.login", sys.argv[2]) is True
assert call("web.connected")
print(json.dumps(call("core.get_config_values", sys.argv[3:])))
"""


def deluge_config(lab: Lab, *keys: str) -> dict:
    """deluged's own configuration values, asked through deluge-web from the client namespace."""
    argv = [sys.executable, "-c", DELUGE_CONFIG, str(DELUGE_WEB_PORT), DELUGE_PASSWORD, *keys]
    return json.loads(lab.run("client", *argv))


def listening_addresses(lab: Lab, pid: int, port: int) -> set[str]:
    """The local addresses process ``pid`` listens on TCP ``port`` at, as the socket table says."""
    out = lab.run("client", "ss", "-ltnpH", f"sport = :{port}")
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if f"pid={pid}," in line}
