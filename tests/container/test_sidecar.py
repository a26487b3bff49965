"""The tunlock image as a sidecar, run with podman in a lab: what the ISP sees, what the app gets.

The sidecar joins the lab's client namespace (the pod's namespace, in effect); an app container
shares it (``--network container:SIDECAR``), started right after the sidecar without waiting for
it, and sends every probe kind in a loop from its first moment (tests/container/app.py). The
lab's observer in the ISP counts every packet that leaves outside the tunnel: the leak count.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import pytest

from supervisor.lab.faults import blackhole_server, restore_server
from supervisor.lab.probes import describe
from supervisor.lab.topology import CLIENT_V4, LAN_HOST_V4, sh
from tests.container.tier import (
    FIGURES,
    IMAGE,
    TIER,
    Created,
    lab_network,
    parse_time,
    podman,
    podman_rc,
    wait_for,
)
from tests.lab.conftest import LabUnderTest

pytestmark = pytest.mark.container

# Only NET_ADMIN (lock, interface, routes) and /dev/net/tun (wireguard-go): nothing else.
SIDECAR_PRIVILEGES = ["--cap-drop", "all", "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun"]
# The image's HEALTHCHECK would ask podman for a systemd timer; there is no systemd here, and the
# tests run the check themselves (`podman healthcheck run`).
NO_HEALTH_TIMER = ["--health-interval", "disable"]
BLOCK_COMMENT = "tunlock: blocking everything while the container starts"


@dataclass
class Round:
    t: float
    ok: dict[str, bool]

    @property
    def through_tunnel(self) -> bool:
        return self.ok["tcp4"] and self.ok["tcp6"] and self.ok["udp4"]

    @property
    def all_refused(self) -> bool:
        # udp-to-endpoint only reports that it sent (the observer says whether it left).
        return not any(v for k, v in self.ok.items() if k != "udp-to-endpoint")


class Pod:
    """A sidecar and an app container sharing the lab's client namespace."""

    def __init__(self, lab: LabUnderTest, created: Created, prefix: str = "") -> None:
        self.lab = lab
        self.created = created
        self.sidecar = f"tl{lab.lab.id}{prefix}-tunlock"
        self.app = f"tl{lab.lab.id}{prefix}-app"

    def create_sidecar(self, *extra: str, command: tuple[str, ...] = ()) -> None:
        self.created.containers.append(self.sidecar)
        servers = self.lab.lab.dir / "servers"
        podman(
            "create", "--name", self.sidecar, *self.created.label,
            "--network", lab_network(self.lab.lab), *SIDECAR_PRIVILEGES, *NO_HEALTH_TIMER,
            "--volume", f"{servers}:/etc/tunlock/servers:ro", *extra, IMAGE, *command,
        )  # fmt: skip

    def create_app(self, network: str | None = None) -> None:
        """The app: it shares the sidecar's namespace and probes from its first moment."""
        self.created.containers.append(self.app)
        podman(
            "create", "--name", self.app, *self.created.label,
            "--network", network or f"container:{self.sidecar}",
            "--cap-drop", "all", "--cap-add", "NET_RAW",  # its raw-socket pings
            "--volume", f"{TIER}:/tier:ro", "--entrypoint", "python", IMAGE,
            "/tier/app.py", self.lab.lab.servers[0].endpoint_v4,
        )  # fmt: skip

    def start_both(self) -> float:
        """Both at once, the app right after the sidecar without waiting for its health (a compose
        file without ``depends_on`` does just that); the wall-clock time they were asked for."""
        asked = time.time()
        podman("start", self.sidecar, self.app)
        return asked

    def rounds(self) -> list[Round]:
        rounds = []
        for line in podman("logs", self.app).splitlines():
            entry = json.loads(line)
            if "ok" in entry:
                rounds.append(Round(entry["t"], entry["ok"]))
        return rounds

    def rounds_after(self, moment: float, count: int = 1) -> list[Round] | None:
        later = [r for r in self.rounds() if r.t > moment]
        return later if len(later) >= count else None

    def through_tunnel_after(self, moment: float) -> Round | None:
        return next((r for r in self.rounds() if r.t > moment and r.through_tunnel), None)

    def status(self) -> dict:
        rc, out, _ = podman_rc("exec", self.sidecar, "tunlock", "status", "--json")
        return json.loads(out) if rc == 0 else {}

    def state(self, key: str) -> str:
        return podman("inspect", "--format", "{{" + key + "}}", self.sidecar).strip()

    def log_time(self, needle: str, after: float = 0.0) -> float | None:
        """When the sidecar wrote its first line holding ``needle`` (podman's timestamps)."""
        _, out, err = podman_rc("logs", "--timestamps", self.sidecar)  # the container's stderr: err
        for line in (out + err).splitlines():
            stamp, _, text = line.partition(" ")
            if needle in text and parse_time(stamp) > after:
                return parse_time(stamp)
        return None

    def lock_listing(self) -> str:
        return sh("ip", "netns", "exec", self.lab.lab.ns("client"), "nft", "list", "ruleset")

    def assert_no_leaks(self, since: int, phase: str) -> None:
        leaks = self.lab.observer.leaks(since=since)
        assert leaks == [], f"{phase}: {len(leaks)} packets left outside the tunnel:\n{describe(leaks)}"


def test_sidecar_locks_from_the_first_packet_through_failover_kill_restart_and_stop(
    image: str, lab: LabUnderTest, created: Created
) -> None:
    pod = Pod(lab, created)
    mark = lab.observer.mark()

    # Start: the app right after the sidecar, without waiting for its health.
    pod.create_sidecar()
    pod.create_app()
    asked = pod.start_both()
    first = wait_for("the app's traffic through the tunnel", lambda: pod.through_tunnel_after(0), 90)
    started = int(pod.state(".State.StartedAt.UnixNano")) / 1e9
    locked = pod.log_time("tunlock-entrypoint: locked")
    connected = pod.log_time('"state": "connected"')
    app_started = json.loads(podman("logs", pod.app).splitlines()[0])["started"]
    assert locked is not None and connected is not None
    assert pod.rounds()[0].t < first.t, "the app's first round was already through the tunnel"
    pod.assert_no_leaks(mark, "start")
    FIGURES.append(
        f"sidecar start: lock in place {1000 * (locked - started):.0f} ms after the container started "
        f"({1000 * (locked - asked):.0f} ms after `podman run`), connected after "
        f"{connected - started:.2f} s; the app's first probe {app_started - started:.2f} s after it; "
        f"leaks 0 of {len(pod.rounds())} rounds x 11 kinds"
    )

    # A silent server: the daemon fails over; the app's traffic goes on, nothing leaks.
    mark = lab.observer.mark()
    old = pod.status()["server"]
    faulted = time.time()
    blackhole_server(lab.lab, old.removeprefix("vpn"))
    wait_for("another server", lambda: pod.status().get("server") not in (None, old), 60)
    wait_for("traffic after the failover", lambda: pod.through_tunnel_after(faulted), 60)
    restore_server(lab.lab, old.removeprefix("vpn"))
    pod.assert_no_leaks(mark, "failover")

    # tunlock leaktest from inside the sidecar (issue #24), as docs/containers.md shows it: with
    # the daemon connected nothing gets out, by its own verdict and by the observer's count.
    # --privileged gives the test (not the sidecar) the raw sockets that see what came back.
    mark = lab.observer.mark()
    rc, out, err = podman_rc("exec", "--privileged", pod.sidecar, "tunlock", "leaktest", "--json")
    report = json.loads(out)
    assert rc == 0 and report["exit"] == 0, f"leaktest in the sidecar: exit {rc}\n{out}\n{err}"
    assert report["probes"], "the leak test sent no probe"
    pod.assert_no_leaks(mark, "leaktest")

    # The sidecar killed: the app keeps running, every probe refused (the lock stays), no leak.
    mark = lab.observer.mark()
    podman("kill", "--signal", "KILL", pod.sidecar)
    killed = time.time()
    wait_for("the sidecar gone", lambda: pod.state(".State.Running") == "false", 30)
    after_kill = wait_for("three app rounds after the kill", lambda: pod.rounds_after(killed + 0.5, 3), 60)
    assert all(r.all_refused for r in after_kill), after_kill
    assert podman("inspect", "--format", "{{.State.Running}}", pod.app).strip() == "true"
    assert "table inet tunlock" in pod.lock_listing()
    pod.assert_no_leaks(mark, "sidecar killed")

    # Its restart keeps the lock that is there and connects again.
    mark = lab.observer.mark()
    restarted = time.time()
    podman("start", pod.sidecar)
    wait_for("traffic after the restart", lambda: pod.through_tunnel_after(restarted), 90)
    assert pod.log_time("kept table inet tunlock, already in place", after=restarted) is not None
    pod.assert_no_leaks(mark, "restart")

    # `podman stop`: the daemon takes the tunnel down and leaves the lock; the app stays locked.
    mark = lab.observer.mark()
    podman("stop", "--time", "20", pod.sidecar, timeout=60)
    stopped = time.time()
    assert pod.state(".State.ExitCode") == "0"
    after_stop = wait_for("three app rounds after the stop", lambda: pod.rounds_after(stopped, 3), 60)
    assert all(r.all_refused for r in after_stop), after_stop
    assert "table inet tunlock" in pod.lock_listing()
    pod.assert_no_leaks(mark, "stopped")


def test_a_broken_configuration_exits_with_its_line_and_leaves_the_namespace_locked(
    image: str, lab: LabUnderTest, created: Created
) -> None:
    bad = lab.lab.dir / "broken.toml"
    bad.write_text('[tunnel]\nservers = ["servers/*.conf"]\n\n[lock]\ninbound_tcp = [8080, 70000]\n')
    pod = Pod(lab, created)
    mark = lab.observer.mark()
    pod.create_sidecar("--volume", f"{bad}:/etc/tunlock/tunlock.toml:ro")
    pod.create_app(network=lab_network(lab.lab))  # the sidecar does not stay to be joined
    pod.start_both()
    wait_for("the sidecar to exit", lambda: pod.state(".State.Running") == "false", 60)
    _, logs, errors = podman_rc("logs", pod.sidecar)
    assert pod.state(".State.ExitCode") == "2", logs + errors
    assert "/etc/tunlock/tunlock.toml:5: lock.inbound_tcp" in logs + errors
    assert BLOCK_COMMENT in pod.lock_listing()
    exited = time.time()
    rounds = wait_for("three app rounds after the exit", lambda: pod.rounds_after(exited, 3), 60)
    assert all(r.all_refused for r in pod.rounds()), rounds
    pod.assert_no_leaks(mark, "broken configuration")


def test_health_is_unhealthy_while_no_server_answers_and_healthy_after(
    image: str, lab: LabUnderTest, created: Created
) -> None:
    for server in lab.lab.servers:
        blackhole_server(lab.lab, str(server.index))
    pod = Pod(lab, created)
    # Short waits between attempts, so the restored servers are tried again soon.
    pod.create_sidecar(
        "--env", "TUNLOCK_HEALTH_CONNECT_TIMEOUTS_S=2",
        "--env", "TUNLOCK_ROTATION_COOLDOWN_S=1",
        "--env", "TUNLOCK_ROTATION_BACKOFF_MAX_S=2",
    )  # fmt: skip
    podman("start", pod.sidecar)
    wait_for("the daemon running", lambda: pod.log_time('"event": "tunlock running"'), 60)
    rc, out, err = podman_rc("healthcheck", "run", pod.sidecar)
    assert (rc, out.strip()) == (1, "unhealthy"), (rc, out, err)
    assert pod.status()["state"] != "connected"

    for server in lab.lab.servers:
        restore_server(lab.lab, str(server.index))
    wait_for(
        "a healthy check", lambda: podman_rc("healthcheck", "run", pod.sidecar)[0] == 0, 90, interval=0.5
    )
    assert pod.status()["state"] == "connected"


WEB_UI = (
    "import socket\n"
    "server = socket.create_server(('0.0.0.0', 8080))\n"
    "while True:\n"
    "    conn, _ = server.accept(); conn.sendall(b'webui'); conn.close()\n"
)


def _connect(lab: LabUnderTest, role: str, source: str | None = None) -> str:
    """What a TCP client in ``role`` reads from the client's port 8080 ("" when refused)."""
    code = (
        "import socket\ns = socket.socket(); s.settimeout(1)\n"
        + (f"s.bind(({source!r}, 0))\n" if source else "")
        + f"try:\n s.connect(({CLIENT_V4!r}, 8080)); print(s.recv(16).decode(), end='')\n"
        "except OSError:\n pass\n"
    )
    return sh("ip", "netns", "exec", lab.lab.ns(role), sys.executable, "-c", code, check=False)


def test_the_apps_web_ui_is_reachable_from_the_lan_through_inbound_tcp_only(
    image: str, lab: LabUnderTest, created: Created
) -> None:
    pod = Pod(lab, created)
    # The lab's LAN is a documentation range, not RFC 1918: named as the lab's own config does.
    lan = "TUNLOCK_LOCK_LAN_RANGES=192.0.2.0/24,2001:db8:c::/64"
    pod.create_sidecar("--env", "TUNLOCK_LOCK_INBOUND_TCP=8080", "--env", lan)
    created.containers.append(pod.app)
    podman(
        "create", "--name", pod.app, *created.label, "--network", f"container:{pod.sidecar}",
        "--cap-drop", "all", "--entrypoint", "python", IMAGE, "-c", WEB_UI,
    )  # fmt: skip
    mark = lab.observer.mark()
    podman("start", pod.sidecar, pod.app)
    wait_for("connected", lambda: pod.status().get("state") == "connected", 60)
    from_lan = wait_for("the web UI from the LAN", lambda: _connect(lab, "isp", source=LAN_HOST_V4), 30)
    assert from_lan == "webui"
    assert _connect(lab, "inet") == "", "the internet reached the web UI past the lock"
    # What left outside the tunnel is the web UI's answer to the LAN host, and only that.
    seen = lab.observer.leaks(since=mark)
    assert seen and all(e["kind"] == "tcp" and e["dst"] == LAN_HOST_V4 for e in seen), describe(seen)
