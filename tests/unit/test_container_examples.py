"""The container examples configure tunlock correctly: every TUNLOCK_* variable they set is a
valid override, and the image's own tunlock.toml loads with it (no container needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from supervisor.config import load_config

ROOT = Path(__file__).resolve().parents[2]
IMAGE_CONFIG = ROOT / "supervisor" / "container" / "tunlock.toml"


def _compose_env() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "examples" / "compose" / "compose.yaml").read_text())
    return {k: str(v) for k, v in compose["services"]["tunlock"]["environment"].items()}


def _kube_env() -> dict[str, str]:
    docs = yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "tunlock-sidecar.yaml").read_text())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    sidecar = deployment["spec"]["template"]["spec"]["initContainers"][0]
    return {e["name"]: e["value"] for e in sidecar["env"]}


@pytest.mark.parametrize("environ", [_compose_env(), _kube_env()], ids=["compose", "kubernetes"])
def test_the_examples_environment_is_a_valid_configuration(environ: dict[str, str], tmp_path: Path) -> None:
    shutil.copy(IMAGE_CONFIG, tmp_path / "tunlock.toml")
    shutil.copytree(ROOT / "configs" / "servers", tmp_path / "servers")
    for server in (tmp_path / "servers").iterdir():
        server.chmod(0o600)
    config = load_config(tmp_path / "tunlock.toml", environ)
    assert config.warnings == ()
    assert config.settings.lock.inbound_tcp == [8080, 9586]
    assert config.settings.metrics.listen == "0.0.0.0:9586"


def test_the_kubernetes_sidecar_is_native_and_probed() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "tunlock-sidecar.yaml").read_text()))
    template = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    sidecar = template["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["readinessProbe"]["exec"]["command"] == ["tunlock", "health"]
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert (
        volumes["servers"]["secret"]["secretName"]
        == next(d for d in docs if d["kind"] == "Secret")["metadata"]["name"]
    )
