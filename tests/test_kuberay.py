"""The Kubernetes deployment in cluster/kuberay/ as an operator applies it: each overlay rendered by
kubectl's kustomize (no cluster needed), validated strictly against the KubeRay and Prometheus
Operator CRD schemas (vendored) and the Kubernetes core schemas (kubernetes-validate), and checked
for consistency: every path the run configuration names is mounted in every pod, every Secret,
ConfigMap, volume claim and service account a pod names is in the rendered set, the metrics ports
the PodMonitor scrapes are the ones the pods declare, and no secret value leaves its Secret."""

from __future__ import annotations

import base64
import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from crosscoder.cli import COMMANDS
from crosscoder.config import RunConfig, from_dict, validate

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
OVERLAYS = ("gpu", "cpu")
CRDS = {"RayCluster": REPO / "tests/data/kuberay/ray.io_rayclusters.yaml",  # vendored; sources in their READMEs
        "RayJob": REPO / "tests/data/kuberay/ray.io_rayjobs.yaml",
        "PodMonitor": REPO / "tests/data/prometheus-operator/monitoring.coreos.com_podmonitors.yaml"}
KUBERNETES_VERSION = "1.31.0"  # the core schemas kubernetes-validate checks against
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# what an operator puts in the overlays' secrets/*.env files; each must stay inside its Secret
SECRET_VALUES = {"HF_TOKEN": "hf_" + os.urandom(8).hex(), "AWS_ACCESS_KEY_ID": "AKIA" + os.urandom(8).hex(),
                 "AWS_SECRET_ACCESS_KEY": os.urandom(16).hex(), "auth_token": os.urandom(16).hex()}
ENV_FILES = {"hf.env": ["HF_TOKEN"], "s3.env": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
             "ray-token.env": ["auth_token"]}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl is missing (its kustomize renders the overlays): `apt-get install kubernetes-client` "
                    "(.ci/run installs it)")
    return found


def render(overlay: str, where: Path) -> list[dict]:
    """`kubectl kustomize` of an overlay in a copy of cluster/kuberay whose secrets/*.env files an
    operator has filled in (with SECRET_VALUES)."""
    tree = where / "kuberay"
    shutil.copytree(KUBERAY, tree, ignore=shutil.ignore_patterns("*.env"))
    for name, keys in ENV_FILES.items():
        (tree / "overlays" / overlay / "secrets" / name).write_text("".join(f"{k}={SECRET_VALUES[k]}\n" for k in keys))
    proc = subprocess.run([kubectl(), "kustomize", str(tree / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.load_all(proc.stdout, Loader=Loader) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return {overlay: render(overlay, tmp_path_factory.mktemp(overlay)) for overlay in OVERLAYS}


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
    for kind, path in CRDS.items():
        crd = next(d for d in yaml.load_all(path.read_text(), Loader=Loader) if d)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
        assert crd["spec"]["names"]["kind"] == kind
        out[kind] = strict_schema(schema)
    return out


def crd_errors(schemas, doc) -> list[str]:
    errors = sorted(jsonschema.Draft7Validator(schemas[doc["kind"]]).iter_errors(doc), key=str)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def cluster_spec(docs) -> dict:
    return next(d for d in docs if d["kind"] == "RayCluster")["spec"]


def pod_templates(docs) -> dict[str, dict]:
    """group name ("head" for the head) → pod template."""
    spec = cluster_spec(docs)
    return {"head": spec["headGroupSpec"]["template"]} | {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}


def test_rendered_manifests_validate_strictly(rendered, schemas):
    import kubernetes_validate

    for overlay, docs in rendered.items():
        kinds = [d["kind"] for d in docs]
        assert {"RayCluster", "RayJob", "PodMonitor", "ConfigMap", "Secret", "PersistentVolumeClaim",
                "ServiceAccount"} <= set(kinds), overlay
        for doc in docs:
            where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
            if doc["kind"] in schemas:
                errors = crd_errors(schemas, doc)
                assert not errors, f"{where}: " + "; ".join(errors[:5])
            else:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        # the pod templates inside the RayCluster, as core PodTemplates (strict core schema)
        for group, template in pod_templates(docs).items():
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                                          "template": template}, KUBERNETES_VERSION, strict=True)


def test_the_strict_schemas_catch_a_misspelled_field(rendered, schemas):
    import kubernetes_validate

    docs = rendered["gpu"]
    job = copy.deepcopy(next(d for d in docs if d["kind"] == "RayJob"))
    job["spec"]["entrypont"] = job["spec"].pop("entrypoint")
    assert crd_errors(schemas, job)
    monitor = copy.deepcopy(next(d for d in docs if d["kind"] == "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    assert crd_errors(schemas, monitor)
    claim = copy.deepcopy(next(d for d in docs if d["kind"] == "PersistentVolumeClaim"))
    claim["spec"]["accesModes"] = claim["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(claim, KUBERNETES_VERSION, strict=True)


def run_config(docs) -> tuple[RunConfig, list[str]]:
    """The mounted configuration and the RayJob's command line."""
    job = next(d for d in docs if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    config_path = Path(argv[argv.index("--config") + 1])
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "crosscoder-config")
    cfg = from_dict(RunConfig, tomllib.loads(configmap["data"][config_path.name]), where=config_path.name)
    return cfg, argv


def mounted(mounts: dict[str, dict | None], path: str) -> dict | None:
    """The volume of the deepest mount point holding ``path``, if any."""
    best = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default=None)
    return mounts[best] if best else None


def problems(docs) -> list[str]:
    """Everything that would stop the rendered set from running as shipped (empty when it runs)."""
    found = []
    present = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    cfg, argv = run_config(docs)
    validate(cfg)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    if argv[0] not in scripts or argv[1] not in COMMANDS:
        found.append(f"entrypoint {argv[:2]} is not a crosscoder command")
    config_path = argv[argv.index("--config") + 1]
    run_dir = argv[argv.index("--run") + 1].replace("{name}", cfg.name)
    # paths the run uses, on the pod that uses them: the driver on the head, the harvest actors, the
    # training ranks and the analysis on the workers; every pod sees all of them
    paths = {"the config": config_path, "the run directory": run_dir}
    for key, value in (("harvest.output", cfg.harvest.output), ("harvest.data", cfg.harvest.data),
                       ("train.data", cfg.train.data)):
        if value.startswith("/"):
            paths[key] = value
    for model in cfg.harvest.models:
        if model["path"].startswith("/"):
            paths[f"model {model['name']!r}"] = model["path"]
    needs_s3 = any(v.startswith("s3://") for v in (cfg.harvest.output, cfg.train.data, cfg.analyze.data))
    needs_hub = any(not m["path"].startswith("/") for m in cfg.harvest.models)
    secret_keys = {name: set(d.get("data") or {}) for (kind, name), d in present.items() if kind == "Secret"}
    for group, template in pod_templates(docs).items():
        spec = template["spec"]
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: volumes.get(m["name"]) for m in container.get("volumeMounts", [])}
        for mount, volume in mounts.items():
            if volume is None:
                found.append(f"{group}: {mount} mounts a volume the pod does not declare")
            elif "persistentVolumeClaim" in volume and \
                    ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) not in present:
                found.append(f"{group}: claim {volume['persistentVolumeClaim']['claimName']} is not in the set")
            elif "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in present:
                found.append(f"{group}: ConfigMap {volume['configMap']['name']} is not in the set")

        for what, path in paths.items():
            volume = mounted(mounts, path)
            if volume is None:
                found.append(f"{group}: {what} {path} is on no mounted volume")
            elif what == "the run directory" and "persistentVolumeClaim" not in volume:
                found.append(f"{group}: the run directory {path} is not on a shared volume claim")
        env = {e["name"]: e for e in container.get("env", [])}
        hf_home = env.get("HF_HOME", {}).get("value")
        if not hf_home or not (mounted(mounts, hf_home) or {}).get("persistentVolumeClaim"):
            found.append(f"{group}: HF_HOME is not a shared volume claim")
        if "/dev/shm" not in mounts or mounts["/dev/shm"].get("emptyDir", {}).get("medium") != "Memory":
            found.append(f"{group}: /dev/shm is not a memory volume")
        from_secrets = set()
        for ref in container.get("envFrom", []):
            name = ref.get("secretRef", {}).get("name")
            if name and name not in secret_keys:
                found.append(f"{group}: Secret {name} (envFrom) is not in the set")
            from_secrets |= secret_keys.get(name, set())
        for e in env.values():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] not in secret_keys.get(ref["name"], set()):
                found.append(f"{group}: Secret {ref['name']} key {ref['key']} is not in the set")
        if needs_hub and "HF_TOKEN" not in from_secrets:
            found.append(f"{group}: the models come from the hub but no Secret gives HF_TOKEN")
        if needs_s3 and "AWS_SECRET_ACCESS_KEY" not in from_secrets and "crosscoder-s3" not in \
                {r.get("secretRef", {}).get("name") for r in container.get("envFrom", [])}:
            found.append(f"{group}: the data is on S3 but no Secret gives its credentials")
        account = spec.get("serviceAccountName")
        if not account or ("ServiceAccount", account) not in present:
            found.append(f"{group}: service account {account} is not in the set")
    spec = cluster_spec(docs)
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token" or "auth_token" not in secret_keys.get(auth.get("secretName"), set()):
        found.append(f"authOptions {auth}: token mode with a Secret holding auth_token is required")
    job = next(d for d in docs if d["kind"] == "RayJob")
    if job["spec"].get("clusterSelector", {}).get("ray.io/cluster") != next(
            d for d in docs if d["kind"] == "RayCluster")["metadata"]["name"]:
        found.append("the RayJob selects no RayCluster of the set")
    # metrics: the PodMonitor scrapes exactly the named ports the pods declare, from metrics.port on
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    declared = {p["name"]: p["containerPort"] for t in pod_templates(docs).values()
                for p in t["spec"]["containers"][0].get("ports", [])}
    ours = {n: p for n, p in declared.items() if n.startswith("crosscoder-")}
    if scraped - set(declared):
        found.append(f"the PodMonitor scrapes ports no pod declares: {sorted(scraped - set(declared))}")
    if set(ours) | {"metrics"} != scraped:
        found.append(f"declared metrics ports {sorted(ours)} + metrics are not the scraped ones {sorted(scraped)}")
    if sorted(ours.values()) != list(range(cfg.metrics.port, cfg.metrics.port + len(ours))):
        found.append(f"the crosscoder ports {sorted(ours.values())} do not start at metrics.port {cfg.metrics.port}")
    labels = monitor["spec"]["selector"]["matchLabels"]
    for group, template in pod_templates(docs).items():
        if any(template["metadata"].get("labels", {}).get(k) != v for k, v in labels.items()):
            found.append(f"{group}: the PodMonitor's selector {labels} does not select its pods")
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_run_configuration_agrees_with_the_pods(rendered, overlay):
    assert problems(rendered[overlay]) == []


@pytest.mark.parametrize("change, expected", [
    ("unmount the run volume", "the run directory /runs/gemma2-2b-l13 is on no mounted volume"),
    ("unmount the config", "the config /etc/crosscoder/config.toml is on no mounted volume"),
    ("drop the HF Secret", "Secret crosscoder-hf (envFrom) is not in the set"),
    ("drop the token Secret", "token mode with a Secret holding auth_token is required"),
    ("drop the cache claim", "claim crosscoder-hf-cache is not in the set"),
    ("drop a metrics port", "are not the scraped ones"),
])
def test_the_consistency_check_fails_when_a_mount_or_a_secret_is_removed(rendered, change, expected):
    docs = copy.deepcopy(rendered["gpu"])
    gpu = next(g for g in cluster_spec(docs)["workerGroupSpecs"] if g["groupName"] == "gpu")["template"]["spec"]
    container = gpu["containers"][0]
    if change == "unmount the run volume":
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/runs"]
    elif change == "unmount the config":
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/etc/crosscoder"]
    elif change == "drop the HF Secret":
        docs = [d for d in docs if (d["kind"], d["metadata"]["name"]) != ("Secret", "crosscoder-hf")]
    elif change == "drop the token Secret":
        docs = [d for d in docs if (d["kind"], d["metadata"]["name"]) != ("Secret", "crosscoder-ray-token")]
    elif change == "drop the cache claim":
        docs = [d for d in docs if (d["kind"], d["metadata"]["name"]) != ("PersistentVolumeClaim", "crosscoder-hf-cache")]
    elif change == "drop a metrics port":
        container["ports"] = [p for p in container["ports"] if p["name"] != "crosscoder-7"]
        for template in pod_templates(docs).values():
            template["spec"]["containers"][0]["ports"] = [p for p in template["spec"]["containers"][0].get("ports", [])
                                                          if p["name"] != "crosscoder-7"]
    found = problems(docs)
    assert any(expected in p for p in found), found


def test_the_gpu_overlay_packs_a_run_into_8_gpu_pods_that_scale_from_zero(rendered):
    docs = rendered["gpu"]
    spec = cluster_spec(docs)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 == gpu["replicas"] and groups["cpu"]["minReplicas"] == 0
    container = gpu["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == 8 and container["image"].endswith("-cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    cfg, _ = run_config(docs)
    # the harvest's actors and the training's ranks each fit one pod (collectives stay on NVLink), and
    # every process of a full pod has a metrics port
    assert cfg.harvest.actors * cfg.harvest.gpus_per_actor <= gpus and cfg.train.workers <= gpus
    assert cfg.train.device == "cuda" and cfg.harvest.gpus_per_actor >= 1
    ports = [p for p in container["ports"] if p["name"].startswith("crosscoder-")]
    assert len(ports) >= max(cfg.train.workers, cfg.harvest.actors)
    cpus = float(container["resources"]["limits"]["cpu"])
    assert cfg.harvest.actors * cfg.harvest.cpus_per_actor + cfg.train.workers <= cpus
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # nothing scheduled on the head, which holds the drivers


def test_the_cpu_overlay_has_no_gpu_and_runs_the_demo_on_ray_train(rendered):
    docs = rendered["cpu"]
    groups = [g["groupName"] for g in cluster_spec(docs)["workerGroupSpecs"]]
    assert groups == ["cpu"]
    text = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in text and "-cuda" not in text
    cfg, _ = run_config(docs)
    assert cfg.harvest.demo_pair and cfg.train.workers == 2 and cfg.train.device == "cpu"


def test_no_secret_value_leaves_its_secret(rendered):
    """The values an operator writes to secrets/*.env appear in the Secrets and nowhere else of the
    rendered set; the repository holds no filled-in env file (git ignores them)."""
    for overlay, docs in rendered.items():
        for doc in docs:
            if doc["kind"] == "Secret":
                decoded = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
                assert all(decoded[k] == SECRET_VALUES[k] for k in decoded), doc["metadata"]["name"]
                assert not doc.get("stringData")
                continue
            text = yaml.safe_dump(doc)
            for value in SECRET_VALUES.values():
                assert value not in text, f"{overlay}: {doc['kind']} {doc['metadata']['name']} holds a secret"
            if doc["kind"] == "RayCluster":  # no container gets a secret as a literal value
                for template in pod_templates(docs).values():
                    for e in template["spec"]["containers"][0].get("env", []):
                        assert "value" not in e or not re.search(r"TOKEN|SECRET|KEY", e["name"]), e
    tracked = subprocess.run(["git", "ls-files", "cluster"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [p for p in tracked if p.endswith(".env")]
    for example in KUBERAY.glob("overlays/*/secrets/*.env.example"):
        for line in example.read_text().splitlines():
            if line and not line.startswith("#"):
                assert line.endswith("="), f"{example}: {line}"  # keys only
    probe = KUBERAY / "overlays" / "gpu" / "secrets" / "hf.env"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO)
    assert ignored.returncode == 0, f"{probe} would be committed"


def test_images_are_built_by_the_repo_dockerfiles_at_the_package_version(rendered):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for docs in rendered.values():
        for template in pod_templates(docs).values():
            for container in template["spec"]["containers"]:
                tag = container["image"].rsplit(":", 1)[1]
                tag_version, flavour = tag.rsplit("-", 1)
                assert tag_version == version, container["image"]
                assert (REPO / "docker" / f"Dockerfile.{flavour}").is_file(), container["image"]
                assert container["securityContext"]["runAsNonRoot"] is True
                assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]


def readme_commands() -> list[str]:
    text = (REPO / "launch" / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """The argument lists of a shell line's commands (split at |, &&, ;), redirections left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, current, skip_next = [], [], False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in ("|", "&&", ";", "||"):
            out, current = out + [current] if current else out, []
        elif token in (">", ">>", "<", "2>"):
            skip_next = True  # the redirection's target is a file the command writes or reads
        else:
            current.append(token)
    return out + [current] if current else out


def test_every_command_of_the_kubernetes_guide_names_what_exists(rendered):
    """launch/README.md, the guide from an empty cluster to a finished run: every file and overlay
    it names exists, every `kubectl apply -k` target renders (above), every crosscoder command and
    config it runs parses; the Secrets it has the operator create are the ones the overlay reads."""
    commands = readme_commands()
    assert len(commands) >= 10
    overlays_applied = set()
    for command in commands:
        for argv in simple_commands(command):
            for arg in (a.rstrip(")") for a in argv):
                if re.match(r"^(cluster|launch|docker)/", arg):
                    path = re.sub(r"/secrets/[a-z0-9-]+\.env$", "/secrets", arg)  # files the operator creates
                    assert (REPO / path).exists(), f"{command}: {arg} does not exist"
            if argv[:2] == ["kubectl", "apply"] and "-k" in argv:
                overlays_applied.add(argv[argv.index("-k") + 1])
            if argv[0] == "docker" and "-f" in argv:
                assert (REPO / argv[argv.index("-f") + 1]).is_file()
            if argv[0] == "crosscoder":
                assert argv[1] in COMMANDS, command
    assert overlays_applied and all((REPO / o / "kustomization.yaml").is_file() for o in overlays_applied)
    created = {m for c in commands for m in re.findall(r"secrets/([a-z0-9-]+\.env)\b", c)}
    assert set(ENV_FILES) <= created, f"the guide never creates {sorted(set(ENV_FILES) - created)}"
