"""The container tier: the image built from the top-level Containerfile, run with podman in labs.

No registry is reachable here, so the base image is made from Debian's packages: mmdebstrap
builds a root like ``debian:bookworm-slim`` (minbase, docs and locales left out), cached as a
tarball under ``.cache/container`` (one per package list), and ``podman import`` turns it into
``BASE``. podman runs through ``tests/container/podman``: the tier's own containers.conf and
storage, images kept in ``.cache/container`` between runs (so a rerun reuses the build's layers).

Every container and pod joins a lab namespace (``--network ns:/run/netns/tlab...``, or a pod's
private namespace that the test moves the lab's client link into), never the host's network.
Each is labelled with this process's PID and removed by name when its test ends, failed or not;
one left by a crashed run is removed by the next. The images stay: they are the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

from supervisor.lab.topology import Lab
from supervisor.safety import LAB_NETNS_PREFIX, NETNS_DIR

ROOT = Path(__file__).resolve().parents[2]
TIER = ROOT / "tests" / "container"
PODMAN = TIER / "podman"
CACHE = ROOT / ".cache" / "container"
IMAGE = "localhost/tunlock:test"
# containers.conf names this image as the infra container of pods (`podman kube play`).
INFRA_IMAGE = "localhost/tunlock-tier-infra:latest"
OWNER_LABEL = "tunlock.test.owner"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# The base: what debian:bookworm-slim is (Debian's minbase, merged /usr without the usrmerge
# package, no manuals, docs or translations), with the security and point-release updates.
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
)
BASE_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Figures printed at the end of the run (timings on a shared machine: indicative only).
FIGURES: list[str] = []


class PodmanError(RuntimeError):
    pass


class SkipTier(Exception):
    """The tier cannot run here (not root, a tool missing): the reason."""


def podman(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
    """Run the tier's podman; its stdout, or PodmanError with its stderr."""
    done = subprocess.run([str(PODMAN), *args], input=input, text=True, capture_output=True, timeout=timeout)
    if check and done.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def podman_rc(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    done = subprocess.run([str(PODMAN), *args], text=True, capture_output=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def lab_network(lab: Lab) -> str:
    """``--network`` for a container in the lab's client namespace (refuses anything else)."""
    path = NETNS_DIR / lab.ns("client")
    assert path.name.startswith(LAB_NETNS_PREFIX) and path.exists(), path
    return f"ns:{path}"


def parse_time(text: str) -> float:
    """An RFC 3339 time as podman prints it (nanoseconds, Z or an offset) -> epoch seconds."""
    text = text.strip().replace("Z", "+00:00")
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    return datetime.fromisoformat(text).timestamp()


def wait_for(what: str, predicate, timeout: float = 60.0, interval: float = 0.1):
    """Poll until ``predicate()`` is truthy (returned); a hang guard, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


# --- the image ---------------------------------------------------------------------------------


def _base_rootfs() -> Path:
    """The base root as a tarball, built once per package list (~20-30 s) and cached."""
    key = hashlib.sha256(json.dumps([SUITE, MIRRORS, DPKG_OPTIONS]).encode()).hexdigest()[:12]
    tarball = CACHE / f"base-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    argv = ["mmdebstrap", "--variant=minbase", "--quiet", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    argv += [f"--dpkgopt={option}" for option in DPKG_OPTIONS]
    argv += [SUITE, str(partial), *MIRRORS]
    started = time.monotonic()
    done = subprocess.run(argv, text=True, capture_output=True, timeout=600)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise PodmanError(f"mmdebstrap failed: {done.stderr.strip()[-2000:]}")
    partial.rename(tarball)
    FIGURES.append(f"base root built by mmdebstrap in {time.monotonic() - started:.0f} s")
    return tarball


def _import_base(tarball: Path) -> str:
    """``BASE`` for the build (and the pods' infra image), imported once per tarball."""
    base = f"localhost/tunlock-tier-base:{tarball.stem.rsplit('-', 1)[-1]}"
    if podman_rc("image", "exists", base)[0] != 0:
        podman("import", "--change", f"ENV {BASE_PATH}", "--change", 'CMD ["bash"]', str(tarball), base)
    if podman_rc("image", "exists", INFRA_IMAGE)[0] != 0:
        change = ["--change", f"ENV {BASE_PATH}", "--change", 'CMD ["sleep", "infinity"]']
        podman("import", *change, str(tarball), INFRA_IMAGE)
    return base


def build_image() -> str:
    """The tunlock image built from the Containerfile (layers cached between runs)."""
    if os.geteuid() != 0:
        raise SkipTier("the container tier needs root (podman, network namespaces)")
    for tool in ("podman", "mmdebstrap", "runc"):
        if shutil.which(tool) is None:
            raise SkipTier(f"{tool} is not installed (scripts/bootstrap installs it)")
    base = _import_base(_base_rootfs())
    argv = ["build", "--format", "docker", "--network", "host", "--pull=never", "--build-arg", f"BASE={base}"]
    if CA_BUNDLE.exists():
        # Package downloads may go through a TLS-intercepting proxy whose CA only the host's bundle
        # has: the build sees it under another path (the image's own /etc/ssl/certs stays its own)
        # and pip is told where, by a build argument that does not reach the image.
        argv += ["-v", f"{CA_BUNDLE.parent}:/etc/ssl/host-certs:ro"]
        argv += ["--build-arg", f"PIP_CERT=/etc/ssl/host-certs/{CA_BUNDLE.name}"]
    started = time.monotonic()
    podman(*argv, "-t", IMAGE, "-f", str(ROOT / "Containerfile"), str(ROOT), timeout=900)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE))
    base_size = int(podman("image", "inspect", "--format", "{{.Size}}", base))
    FIGURES.append(
        f"image built in {time.monotonic() - started:.0f} s (from the layers cached in .cache, if any); "
        f"{size / 1e6:.0f} MB, of which the base {base_size / 1e6:.0f} MB"
    )
    return IMAGE


# --- what a test creates, removed also on failure ----------------------------------------------


class Created:
    """Names of the containers, pods and secrets a test made; removed at its end."""

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.pods: list[str] = []
        self.secrets: list[str] = []

    @property
    def label(self) -> list[str]:
        return ["--label", f"{OWNER_LABEL}={os.getpid()}"]

    def remove(self) -> None:
        """Everything, dependents first (an app sharing a sidecar's namespace before the sidecar);
        what cannot be removed fails the test, so that nothing is left behind unseen."""
        left = []
        for kind, names in (("pod", self.pods), ("container", self.containers[::-1])):
            for name in names:
                rc, _, err = podman_rc(kind, "rm", "--force", "--time", "0", name)
                if rc != 0 and "no such" not in err and "no pod with name" not in err:
                    left.append(f"{kind} {name}: {err.strip()}")
        for secret in self.secrets:
            podman_rc("secret", "rm", secret)
        if left:
            raise PodmanError("could not remove: " + "; ".join(left))
