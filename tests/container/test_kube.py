"""The Kubernetes example under ``podman kube play``, with the 0-leak check while the app starts.

podman 4.3 differs from Kubernetes in ways the test works with, each said where it is done:

- it runs init containers to completion before the others, so the native sidecar (an init
  container with ``restartPolicy: Always``) would hold the pod forever: the test splits it into
  a one-shot init container running ``tunlock-entrypoint block`` and tunlock as the first
  ordinary container, as docs/containers.md tells users of podman and of Kubernetes before 1.29;
- it publishes a container's ``ports`` on the host, which needs its own bridge network (never
  here): the test leaves them out;
- it applies the pod's ``restartPolicy`` (Always, in a Deployment) to init containers as well,
  restarting a one-shot init container as soon as it exits: the test sets ``OnFailure``;
- its secret volumes write a Secret's ``data`` values to the files as they are, without
  decoding their base64, ignore ``stringData`` and ``defaultMode`` (the files are 0644), and a
  Secret in the played file must be valid base64: the test stores the Secret itself, the
  lab's server files as plain ``data``, with ``podman secret create``, and plays the rest;
- a pod cannot join a named network namespace (``--network ns:`` is refused for pods): the pod
  gets a private namespace (``--network none``), and the lab's client link is moved into it,
  which then serves as the lab's client namespace;
- it ignores ``startupProbe`` and ``readinessProbe``, and turns ``livenessProbe`` into the
  container's healthcheck: the test checks that, and runs ``tunlock health`` itself.

The images are the tier's (no registry): tunlock's, and for qBittorrent the probe app.
"""

from __future__ import annotations

import copy
import json
import os
import time

import pytest
import yaml

from supervisor.lab.probes import describe
from supervisor.lab.topology import CLIENT_LINK, INTERNET_V6, ip_batch, sh
from tests.container.tier import (
    FIGURES,
    IMAGE,
    OWNER_LABEL,
    ROOT,
    TIER,
    Created,
    podman,
    podman_rc,
    wait_for,
)
from tests.lab.conftest import LabUnderTest

pytestmark = pytest.mark.container

EXAMPLE = ROOT / "examples" / "kubernetes" / "tunlock-sidecar.yaml"


def for_podman(docs: list[dict], lab: LabUnderTest, name: str) -> list[dict]:
    """The example as podman 4.3 can run it in this lab (see the module docstring)."""
    docs = copy.deepcopy(docs)
    secret = next(d for d in docs if d["kind"] == "Secret")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    secret["metadata"]["name"] = f"{name}-servers"
    secret.pop("stringData")
    servers = sorted((lab.lab.dir / "servers").glob("*.conf"))
    secret["data"] = {p.name: p.read_text() for p in servers}  # not base64: see the docstring

    deployment["metadata"]["name"] = name
    template = deployment["spec"]["template"]
    template["metadata"]["labels"][OWNER_LABEL] = str(os.getpid())
    spec = template["spec"]
    spec["restartPolicy"] = "OnFailure"  # podman would restart the one-shot init container too
    sidecar = spec["initContainers"].pop(0)
    assert sidecar["name"] == "tunlock" and sidecar.pop("restartPolicy") == "Always"
    sidecar["image"] = IMAGE
    del sidecar["ports"]  # podman would publish them on the host, which needs its bridge
    lock_only = {
        "name": "tunlock-lock",
        "image": IMAGE,
        "command": ["tunlock-entrypoint", "block"],
        "securityContext": copy.deepcopy(sidecar["securityContext"]),
    }
    spec["initContainers"].insert(0, lock_only)
    app = spec["containers"][0]
    assert app["name"] == "qbittorrent"
    spec["containers"] = [
        sidecar,
        {
            "name": "app",
            "image": IMAGE,
            "command": ["python", "/tier/app.py", lab.lab.servers[0].endpoint_v4],
            "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_RAW"]}},
            "volumeMounts": [{"name": "tier", "mountPath": "/tier", "readOnly": True}],
        },
    ]
    for volume in spec["volumes"]:
        if "secret" in volume:
            volume["secret"]["secretName"] = secret["metadata"]["name"]
    spec["volumes"].append({"name": "tier", "hostPath": {"path": str(TIER), "type": "Directory"}})
    return docs


def move_client_link_into(lab: LabUnderTest, pid: int) -> None:
    """The pod's namespace becomes the lab's client: wan0 moves in, and the client name with it."""
    client = lab.lab.ns("client")
    sh("ip", "-n", client, "link", "set", "wan0", "netns", str(pid))
    sh("ip", "netns", "delete", client)
    sh("ip", "netns", "attach", client, str(pid))
    sh("ip", "netns", "exec", client, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
    ip_batch(client, CLIENT_LINK)
    # Neighbours answer a moment after the link comes up: wait until IPv6 reaches the internet.
    out = sh("ip", "netns", "exec", client, "ping", "-n", "-c1", "-i0.05", "-w5", INTERNET_V6, check=False)
    assert " 1 received" in out, out


def test_kubernetes_example_under_podman_kube_play_locks_before_the_app_starts(
    image: str, lab: LabUnderTest, created: Created
) -> None:
    name = f"tl{lab.lab.id}-kube"
    manifest = lab.lab.dir / "kube.yaml"
    docs = for_podman(list(yaml.safe_load_all(EXAMPLE.read_text())), lab, name)
    secret = next(d for d in docs if d["kind"] == "Secret")
    created.secrets.append(secret["metadata"]["name"])
    podman("secret", "create", secret["metadata"]["name"], "-", input=yaml.safe_dump(secret))
    manifest.write_text(yaml.safe_dump_all(d for d in docs if d["kind"] != "Secret"))
    created.pods.append(f"{name}-pod-0")

    # Created, not started: the infra container holds the pod's namespace, empty but for lo.
    podman("kube", "play", "--network", "none", "--start=false", str(manifest), timeout=120)
    pod = json.loads(podman("pod", "inspect", f"{name}-pod-0"))
    infra = pod["InfraContainerID"]
    if podman("inspect", "--format", "{{.State.Running}}", infra).strip() != "true":
        podman("start", infra)
    move_client_link_into(lab, int(podman("inspect", "--format", "{{.State.Pid}}", infra)))

    mark = lab.observer.mark()
    started = time.time()
    podman("pod", "start", f"{name}-pod-0", timeout=120)
    sidecar, app = f"{name}-pod-0-tunlock", f"{name}-pod-0-app"

    def rounds() -> list[dict]:
        return [json.loads(line) for line in podman("logs", app).splitlines() if '"ok"' in line]

    def through_tunnel() -> bool:
        return any(r["ok"]["tcp4"] and r["ok"]["tcp6"] for r in rounds())

    wait_for("the app's traffic through the tunnel", through_tunnel, 90)
    leaks = lab.observer.leaks(since=mark)
    assert leaks == [], f"{len(leaks)} packets left outside the tunnel:\n{describe(leaks)}"
    rc, out, err = podman_rc("exec", sidecar, "tunlock", "health")
    assert rc == 0 and out.startswith("healthy"), (rc, out, err)

    # What podman kept of the sidecar's spec: the capabilities, the liveness probe as its
    # healthcheck, the secret's files with their mode; the startup and readiness probes are gone.
    inspected = json.loads(podman("inspect", sidecar))[0]
    assert inspected["EffectiveCaps"] == ["CAP_NET_ADMIN"]
    assert inspected["Config"]["Healthcheck"]["Test"] == ["CMD-SHELL", "tunlock", "status", "||", "exit", "1"]
    listing = podman("exec", sidecar, "ls", "/etc/tunlock/servers/")
    assert listing.split() == ["vpn1.conf", "vpn2.conf"], listing
    first = next(r for r in rounds() if r["ok"]["tcp4"] and r["ok"]["tcp6"])
    FIGURES.append(
        f"kube play: the app's first round {rounds()[0]['t'] - started:.2f} s after `podman pod start`, "
        f"its traffic through the tunnel after {first['t'] - started:.2f} s; leaks 0 of "
        f"{len(rounds())} rounds x 11 kinds"
    )
