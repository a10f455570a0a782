"""The KubeRay manifests in cluster/kuberay/ against the RayCluster/RayJob CRD schemas (offline)."""

from __future__ import annotations

import copy
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from crosscoder.cli import COMMANDS
from crosscoder.config import RunConfig, from_dict

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
CRDS = REPO / "tests" / "data" / "kuberay"  # vendored; source and version in its README
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d]


def strict_schema(node):
    """OpenAPI v3 (Kubernetes flavour) → JSON Schema that also rejects unknown fields.

    ``x-kubernetes-int-or-string`` becomes integer-or-string; an object with declared properties
    and no ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``: the API
    server would silently prune such a field, so a typo in a manifest would be lost, not reported.
    """
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: strict_schema(v) for k, v in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    return node


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    out = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        crd = load_all(CRDS / name)[0]
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        # metadata is validated by the API server, not by the CRD schema
        schema["properties"]["metadata"] = {"type": "object"}
        out[crd["spec"]["names"]["kind"]] = strict_schema(schema)
    return out


def manifests() -> list[dict]:
    return [d for path in sorted(KUBERAY.glob("*.yaml")) for d in load_all(path)]


def test_manifests_validate_against_the_crd_schemas(schemas):
    kinds = {}
    for doc in manifests():
        kinds.setdefault(doc["kind"], []).append(doc)
        if doc["kind"] in schemas:
            assert doc["apiVersion"] == "ray.io/v1"
            errors = sorted(jsonschema.Draft7Validator(schemas[doc["kind"]]).iter_errors(doc), key=str)
            assert not errors, f"{doc['kind']} {doc['metadata']['name']}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    assert {"RayCluster", "RayJob", "ConfigMap", "Secret", "PersistentVolumeClaim"} <= set(kinds)


def test_the_strict_schema_catches_a_misspelled_field(schemas):
    job = next(d for d in manifests() if d["kind"] == "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["entrypont"] = bad["spec"].pop("entrypoint")
    assert list(jsonschema.Draft7Validator(schemas["RayJob"]).iter_errors(bad))


def cluster_specs() -> list[dict]:
    out = []
    for doc in manifests():
        if doc["kind"] == "RayCluster":
            out.append(doc["spec"])
        elif doc["kind"] == "RayJob":
            out.append(doc["spec"]["rayClusterSpec"])
    return out


def pod_templates() -> list[dict]:
    return [t for spec in cluster_specs()
            for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]]


def test_images_are_built_by_the_repo_dockerfiles_at_the_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for template in pod_templates():
        for container in template["spec"]["containers"]:
            repo_tag = container["image"].rsplit(":", 1)[1]
            tag_version, flavour = repo_tag.rsplit("-", 1)
            assert tag_version == version, container["image"]
            assert (REPO / "docker" / f"Dockerfile.{flavour}").is_file(), container["image"]
            assert container["securityContext"]["runAsNonRoot"] is True
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]


def test_job_command_config_and_referenced_objects_exist(tmp_path):
    docs = manifests()
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    job = next(d for d in docs if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and argv[1] in COMMANDS
    config_path = Path(argv[argv.index("--config") + 1])
    for template in pod_templates():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        config_volume = volumes[mounts[str(config_path.parent)]]
        configmap = config_volume["configMap"]["name"]
        assert ("ConfigMap", configmap) in names
        runs_volume = volumes[mounts["/runs"]]
        assert ("PersistentVolumeClaim", runs_volume["persistentVolumeClaim"]["claimName"]) in names
        container = spec["containers"][0]
        for ref in container.get("envFrom", []):
            assert ("Secret", ref["secretRef"]["name"]) in names
        for env in container.get("env", []):
            if "valueFrom" in env:
                assert ("Secret", env["valueFrom"]["secretKeyRef"]["name"]) in names
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics-0"] == 9400 and template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # the mounted config is a valid crosscoder config with metrics on the annotated ports
    configmap_doc = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == configmap)
    cfg = from_dict(RunConfig, tomllib.loads(configmap_doc["data"][config_path.name]))
    assert cfg.metrics.port == 9400 and cfg.harvest.models and cfg.train.workers > 0
