"""A real OpenSSH server in the lab's client and an administrator on the internet host.

``LabSshd`` runs Debian's ``/usr/sbin/sshd`` in the client namespace (never the machine's own
sshd, which is not started) with a throwaway host key and a key pair made for the test, in a
directory of the lab's. ``AdminSession`` is the administrator: ``ssh`` from the lab's internet
host (203.0.113.10) to the client's physical address, running ``cat`` on the server; a writer
sends a numbered line every ``interval`` seconds and a reader notes when each comes back, so the
longest gap is what the administrator felt across a fault.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.lab.topology import CLIENT_V4, Lab

SSHD = "/usr/sbin/sshd"
SSH_OPTIONS = (
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=3",
)
SSHD_CONFIG = """\
Port {port}
ListenAddress 0.0.0.0
ListenAddress ::
HostKey {dir}/host_key
PidFile none
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
LogLevel ERROR
"""


def keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True
    )


class SshAdmin:
    """The administrator's key (made for the test, in ``directory``) and ``ssh`` with it to
    ``port`` on the client's physical address, from a lab namespace."""

    def __init__(self, lab: Lab, directory: Path, port: int = 22) -> None:
        self.lab = lab
        self.port = port
        self.dir = directory
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.key = self.dir / "admin_key"
        if not self.key.exists():
            keygen(self.key)

    @property
    def public_key(self) -> str:
        return (self.dir / "admin_key.pub").read_text()

    def ssh_argv(self, *command: str, host: str = CLIENT_V4) -> list[str]:
        """``ssh`` as the administrator runs it (from whichever namespace runs the argv)."""
        return ["ssh", *SSH_OPTIONS, "-i", str(self.key), "-p", str(self.port), f"root@{host}", *command]

    def run_from(
        self, role: str, *command: str, timeout: float = 15, host: str = CLIENT_V4
    ) -> subprocess.CompletedProcess[str]:
        """One command over SSH from the lab namespace ``role`` (``inet``: the internet host)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.lab.ns(role), *self.ssh_argv(*command, host=host)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


class LabSshd(SshAdmin):
    """sshd on ``port`` in the lab's client, letting in the administrator's key."""

    def __init__(self, lab: Lab, port: int = 22) -> None:
        super().__init__(lab, lab.dir / f"sshd{port}", port)
        keygen(self.dir / "host_key")
        (self.dir / "authorized_keys").write_text(self.public_key)
        config = self.dir / "sshd_config"
        config.write_text(SSHD_CONFIG.format(port=port, dir=self.dir))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.process = lab.spawn("client", [SSHD, "-D", "-e", "-f", str(config)], log=f"sshd{port}.log")
        deadline = time.monotonic() + 10
        while f":{port} " not in lab.run("client", "ss", "-Htln", f"sport = :{port}"):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"sshd did not listen: {(lab.dir / f'sshd{port}.log').read_text()}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)


@dataclass
class AdminSession:
    """An interactive session from the internet host that keeps exchanging data."""

    sshd: SshAdmin
    interval: float = 0.1
    role: str = "inet"
    arrivals: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.sshd.lab.ns(self.role), *self.sshd.ssh_argv("cat")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._stop = threading.Event()
        self._first = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()
        if not self._first.wait(15):
            self.close()
            raise RuntimeError(f"the SSH session did not start: {self.stderr()}")
        self.started = time.monotonic()

    def _write(self) -> None:
        assert self.process.stdin is not None
        counter = 0
        while not self._stop.is_set():
            try:
                self.process.stdin.write(f"{counter}\n".encode())
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                return
            counter += 1
            self._stop.wait(self.interval)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for _line in self.process.stdout:
            self.arrivals.append(time.monotonic())
            self._first.set()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def mark(self) -> int:
        """A point in the session's record: ``longest_gap(since=mark)``."""
        return len(self.arrivals)

    def wait_for_echo(self, timeout: float = 10) -> None:
        """Until a line comes back after this call (the session still carries data)."""
        seen = len(self.arrivals)
        deadline = time.monotonic() + timeout
        while len(self.arrivals) <= seen:
            if not self.alive or time.monotonic() > deadline:
                raise AssertionError(
                    f"the administrator's session stopped answering (alive: {self.alive}; {self.stderr()})"
                )
            time.sleep(0.01)

    def longest_gap(self, since: int = 0) -> float:
        points = self.arrivals[max(0, since - 1) :]
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)

    def stderr(self) -> str:
        if self.alive or self.process.stderr is None:
            return ""
        return self.process.stderr.read().decode(errors="replace").strip()

    def close(self) -> None:
        self._stop.set()
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
