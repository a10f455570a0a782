"""The images and the compose stack in docker/, checked offline (no Docker daemon here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_is_multistage_pinned_non_root_and_installs_torch_first(flavour):
    steps = instructions(DOCKER / f"Dockerfile.{flavour}")
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    for image in froms:
        ref = image.split()[0]
        assert ":" in ref and not ref.endswith(":latest"), f"unpinned base image {ref}"
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime stage must not run as root"
    runs = [args for word, args in steps if word == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    req_at = next(i for i, r in enumerate(runs) if "requirements.txt" in r)
    assert torch_at < req_at, "torch must be installed before the other requirements"
    assert any("--no-deps" in r for r in runs), "the package is installed without re-resolving torch"
    for word, args in steps:  # everything copied from the build context exists in the repo
        if word == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert any(word == "CMD" and "crosscoder" in args for word, args in steps)
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "/opt/venv/bin" in env
    if flavour == "cuda":  # a CUDA torch whose CUDA is the image's, accelerate pinned, DeepSpeed on CUDA
        assert any("download.pytorch.org/whl/cu128" in r for r in runs) and "torch.version.cuda == '12.8'" in " ".join(runs)
        assert "DS_ACCELERATOR=cuda" in env
        assert "accelerate==" in (REPO / "requirements.txt").read_text()


def test_compose_stack_mounts_files_that_exist_and_pins_images():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"prometheus", "grafana", "minio"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).resolve().exists(), f"{name}: mounts missing {source}"
    grafana_env = services["grafana"]["environment"]
    datasource = (REPO / "cluster/monitoring/grafana/provisioning/datasources/prometheus.yaml").read_text()
    assert "${PROMETHEUS_URL}" in datasource and grafana_env["PROMETHEUS_URL"].endswith(":9090")
