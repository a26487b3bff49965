"""A real systemd, booted in a lab namespace: the Debian 12 root it boots and the booted system.

The root is built from Debian's packages by mmdebstrap (~20 s) and cached per package list and
Python dependency list under ``.cache/systemd-root/`` in the project (git ignores it). Nothing of
tunlock is installed in it by hand: the project is bound in read-only at /opt/tunlock-src, and a
virtual environment built at set-up time from the project's own dependencies (wheels downloaded
on the host, installed in the root without network) finds it through a ``.pth`` file, as an
editable install would. Debian 12's Python is 3.11 like the host's, so the same wheels fit.

Each test boots its own copy: an overlay (the cached root read-only below, a temporary upper
directory) that `systemd-nspawn -b` boots inside the lab's client namespace. This machine's
systemd is not PID 1, hence ``--register=no --keep-unit``; commands run inside through
``nsenter`` into the container's PID 1 (no machined to ask). Power-off, unmount and removal
happen by PID and path in ``close()``, also when a test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from supervisor.lab.topology import Lab, process_alive
from supervisor.safety import LAB_NETNS_PREFIX, NETNS_DIR

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "systemd-root"
SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "nftables",
    "wireguard-go",
    "iproute2",
    "iputils-ping",
    "python3",
    "python3-venv",
    "openssh-server",  # the administrator's way in (lock.admin_tcp), started at boot as on a VPS
    "qbittorrent-nox",  # namespace mode's seedbox: a torrent client joined to the namespace
)
VENV = "/opt/tunlock-venv"
SRC = "/opt/tunlock-src"
PYTHON = f"{VENV}/bin/python"
# Bump when the recipe below changes, so that a cached root is rebuilt.
RECIPE = 2
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 120


class SystemError_(RuntimeError):
    """The booted system did not do what was asked; the message carries its console's tail."""


def _dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def cache_key() -> str:
    recipe = json.dumps([RECIPE, SUITE, PACKAGES, _dependencies(), f"{sys.version_info[:2]}"])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def debian_root() -> Path:
    """The cached root for this package list, built first when missing."""
    final = CACHE / cache_key()
    if (final / PYTHON.lstrip("/")).exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f"{final.name}.building-{os.getpid()}"
    wheels = CACHE / f"{final.name}.wheels-{os.getpid()}"
    try:
        # The project's dependencies as wheels for Debian 12's CPython 3.11 (the host's pip and
        # its index settings; the root then installs them with no network at all).
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
             "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
             "--implementation", "cp", "--abi", "cp311", "-d", str(wheels), *_dependencies()],
            check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        clean = f"env -i PATH={INSIDE_PATH}"
        hooks = [
            'echo tunlock-test > "$1/etc/hostname"',
            f'mkdir -p "$1/opt/wheels" && cp {wheels}/*.whl "$1/opt/wheels/"',
            f'chroot "$1" {clean} python3 -m venv {VENV}',
            f'chroot "$1" {clean} {VENV}/bin/pip install -q --no-index --find-links /opt/wheels '
            + " ".join(f"'{d}'" for d in _dependencies()),
            'rm -rf "$1/opt/wheels"',
            f'echo {SRC} > "$1{VENV}/lib/python3.11/site-packages/tunlock-src.pth"',
        ]
        subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}",
             *(f"--customize-hook={hook}" for hook in hooks), SUITE, str(building)],
            check=True, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        try:
            building.rename(final)
        except OSError:  # another run built it meanwhile
            if not (final / PYTHON.lstrip("/")).exists():
                raise
    except subprocess.CalledProcessError as err:
        raise SystemError_(f"building the Debian root failed: {err.cmd[0]}: {err.stderr[-3000:]}") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(wheels, ignore_errors=True)
    return final


class BootedSystem:
    """A Debian 12 booted by systemd-nspawn in a lab's client namespace, on an overlay of the root."""

    def __init__(self, root: Path, lab: Lab, workdir: Path) -> None:
        self.root = root
        self.lab = lab
        self.workdir = workdir
        self.merged = workdir / "merged"
        self.console = workdir / "console.log"
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None
        self._mounted = False

    # --- before boot ----------------------------------------------------------------------

    def mount(self) -> None:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.merged):
            d.mkdir(parents=True)
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.root},upperdir={upper},workdir={work}", str(self.merged)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        self._mounted = True

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """A file in the system's tree (before boot, or in a directory it does not write)."""
        target = self.merged / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_text(text)
        target.chmod(mode)

    def offline(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command in the tree without booting it (``systemctl enable`` works offline), with
        a private network namespace of its own: nothing can reach out."""
        return subprocess.run(
            ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--private-network",
             "--resolv-conf=off", "--timezone=off", "--link-journal=no", "-D", str(self.merged),
             f"--bind-ro={REPO}:{SRC}", "--setenv=PYTHONDONTWRITEBYTECODE=1", *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    # --- booting ---------------------------------------------------------------------------

    def boot(self, *init_args: str) -> None:
        """Boot in the lab's client namespace; return once systemd says the boot is done."""
        netns = NETNS_DIR / self.lab.ns("client")
        assert netns.name.startswith(LAB_NETNS_PREFIX) and netns.exists(), "boot only in a lab namespace"
        with self.console.open("ab") as console:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "-D", str(self.merged), "-b",
                 f"--network-namespace-path={netns}", "--capability=CAP_NET_ADMIN,CAP_NET_RAW",
                 "--bind=/dev/net/tun", f"--bind-ro={REPO}:{SRC}", "--resolv-conf=off",
                 "--timezone=off", "--link-journal=no", "--console=read-only", *init_args],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.leader = self._wait_for_init()
        # PID 1 answers on its private socket once it has set itself up; until then systemctl
        # cannot even ask, and `--wait` does not wait for that.
        private = Path(f"/proc/{self.leader}/root/run/systemd/private")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not private.exists():
            if time.monotonic() > deadline or self.nspawn.poll() is not None:
                raise SystemError_(f"systemd in the container never listened\n{self.tail()}")
            time.sleep(0.02)
        state = self.sh("systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_TIMEOUT_S)
        if state.stdout.strip() not in ("running", "degraded"):
            raise SystemError_(
                f"the boot did not finish: {state.stdout.strip()} {state.stderr.strip()}\n{self.tail()}"
            )

    def _wait_for_init(self) -> int:
        """The container's PID 1 as the host sees it: nspawn's child once it runs systemd."""
        assert self.nspawn is not None
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise SystemError_(f"systemd-nspawn exited ({self.nspawn.returncode})\n{self.tail()}")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.02)
        raise SystemError_(f"no systemd started in the container\n{self.tail()}")

    # --- inside ----------------------------------------------------------------------------

    def sh(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command inside the booted system: its namespaces, its root, a clean environment."""
        assert self.leader is not None, "not booted"
        done = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid",
             "--cgroup", "--root", "--wd", "env", "-i", f"PATH={INSIDE_PATH}", *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise SystemError_(
                f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}\n{self.journal()}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def tunlock(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The CLI inside, as an administrator of that host runs it."""
        return self.sh(PYTHON, "-m", "supervisor.cli", *args, check=check)

    def status(self) -> dict:
        return json.loads(self.tunlock("status", "--json").stdout)

    def wait_for(self, what: str, condition, timeout: float = 30.0, poll: float = 0.05):
        """Poll ``condition()`` until it returns something true; on timeout, the journal's tail."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = condition()
            if last:
                return last
            time.sleep(poll)
        raise SystemError_(f"no {what} within {timeout} s (last: {last})\n{self.journal()}")

    def journal(self, unit: str = "tunlock.service", lines: int = 40) -> str:
        if self.leader is None or not process_alive(self.leader):
            return self.tail()
        done = self.sh(
            "journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), "-u", unit, check=False
        )
        return done.stdout

    def tail(self, lines: int = 30) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- the end ---------------------------------------------------------------------------

    def poweroff(self, timeout: float = 20.0) -> None:
        """SIGTERM to nspawn powers the system off cleanly; SIGKILL (nspawn and its PID 1) when it
        does not end in time."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.leader is not None and process_alive(self.leader):
                    os.kill(self.leader, signal.SIGKILL)
                self.nspawn.kill()
                self.nspawn.wait(10)
        self.leader = None

    def close(self) -> None:
        try:
            self.poweroff()
        finally:
            if self._mounted:
                done = subprocess.run(["umount", str(self.merged)], capture_output=True, text=True)
                if done.returncode != 0:
                    subprocess.run(["umount", "--lazy", str(self.merged)], capture_output=True)
                self._mounted = False
            shutil.rmtree(self.workdir, ignore_errors=True)
