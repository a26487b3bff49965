"""Helpers for the seedbox tests: the lab's NAT-PMP gateways, listeners, connections, configs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from supervisor.lab.topology import Lab

GATEWAY = "10.99.0.1"
QUICK = {
    "TUNLOCK_HEALTH_CONNECT_TIMEOUTS_S": "2,4",
    "TUNLOCK_ROTATION_BACKOFF_INITIAL_S": "1",
    "TUNLOCK_ROTATION_BACKOFF_MAX_S": "4",
}


def start_gateways(lab: Lab, ports: dict[int, int]) -> None:
    """A NAT-PMP gateway in each server namespace: server index -> port it hands out."""
    for server in lab.servers:
        set_gateway(lab, server.index, "ok", ports.get(server.index, 40000 + server.index))
        lab.spawn(
            server.ns,
            [
                sys.executable,
                "-m",
                "supervisor.lab.natpmp",
                str(_control(lab, server.index)),
                str(_state(lab, server.index)),
            ],
            f"natpmp-{server.name}.log",
        )
    for server in lab.servers:
        wait_until(lambda s=server: _state(lab, s.index).exists(), f"the NAT-PMP gateway of {server.name}")


def set_gateway(
    lab: Lab,
    index: int,
    mode: str,
    port: int,
    extra: tuple[int, ...] = (),
    keep: bool = False,
    suggested: bool = False,
) -> None:
    """How the gateway of server ``index`` answers: ``port`` whatever is asked (``suggested``:
    the suggested port when it is one of 1024-65535); ``keep``: it goes on forwarding after an
    unmap, as a hostile gateway would."""
    path = _control(lab, index)
    settings = {"mode": mode, "port": port, "extra": list(extra), "keep": keep, "suggested": suggested}
    path.with_suffix(".tmp").write_text(json.dumps(settings))
    path.with_suffix(".tmp").replace(path)


def gateway_state(lab: Lab, index: int) -> dict:
    return json.loads(_state(lab, index).read_text())


def _control(lab: Lab, index: int) -> Path:
    return lab.dir / f"natpmp-vpn{index}.json"


def _state(lab: Lab, index: int) -> Path:
    return lab.dir / f"natpmp-vpn{index}.state.json"


LISTENER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET6)  # dual stack: IPv4 and IPv6 alike
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if len(sys.argv) < 3:  # "exclusive": no SO_REUSEADDR, as a program that holds the port would
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(sys.argv[1]))); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"seedbox " + sys.argv[1].encode() + b"\\n"); c.close()
    """
)

CONNECT = textwrap.dedent(
    """
    import socket, sys
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)
    except OSError as e:
        print("refused" if isinstance(e, ConnectionRefusedError) else "no answer")
        sys.exit()
    try:
        print(c.recv(64).decode().strip() or "connected")
    except OSError:
        print("connected")  # a torrent client waits for the peer's handshake
    """
)


def listen(lab: Lab, port: int, exclusive: bool = False) -> subprocess.Popen:
    """A TCP listener in the client namespace on every address, answering ``seedbox <port>``."""
    argv = [sys.executable, "-c", LISTENER, str(port), *(["exclusive"] if exclusive else [])]
    proc = lab.spawn("client", argv, f"listener-{port}.log")
    wait_until(
        lambda: f":{port} " in lab.run("client", "ss", "-ltnH", f"sport = :{port}"), f"a listener on {port}"
    )
    return proc


def connect(lab: Lab, role: str, host: str, port: int) -> str:
    """What a TCP connection from ``role`` to host:port gets: ``seedbox <port>``, or why not."""
    return lab.run(role, sys.executable, "-c", CONNECT, host, str(port)).strip()


def write_config(lab: Lab, plugins: str, name: str = "seedbox.toml") -> str:
    """The lab's config plus a [plugins] part, beside it (server globs stay relative)."""
    path = lab.dir / name
    path.write_text(lab.config_path.read_text() + "\n" + textwrap.dedent(plugins))
    return str(path)


def wait_until(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"no {what} within {timeout} s")
