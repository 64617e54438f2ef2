"""Tests of infra/: the production definitions offline (schemas, the training command they run, the
spark-submit examples), and the local cluster scripts for real: Spark standalone running the sequence
builder with the project's code shipped by --py-files, an MLflow server used over HTTP, a Ray head running
submitted jobs. A test that starts a service stops it in its fixture's teardown, also on failure, and
checks that none of the service's processes is left."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
LOCAL = INFRA / "local"
BIN = Path(sys.executable).parent

# ----------------------------------------------------------------------------- schemas (offline)
# Minimal JSON schemas of what KubeRay (ray.io/v1) and Kubernetes require of our manifests. Field lists
# are closed where a typo would otherwise be silently ignored by the API server (e.g. `workerGroupSpec`).

QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9.]+[a-zA-Z]*$"}, {"type": "integer"}]}
RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    },
}
ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"}},
    "oneOf": [
        {"required": ["value"], "properties": {"value": {"type": "string"}}},
        {
            "required": ["valueFrom"],
            "properties": {
                "valueFrom": {
                    "type": "object",
                    "properties": {
                        "secretKeyRef": {
                            "type": "object",
                            "required": ["name", "key"],
                            "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                        }
                    },
                }
            },
        },
    ],
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string", "minLength": 1},
        "args": {"type": "array", "items": {"type": "string"}},
        "command": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array"},
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": {"type": "integer", "minimum": 1, "maximum": 65535}},
            },
        },
        "resources": RESOURCES,
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "initContainers": {"type": "array", "items": CONTAINER},
                "volumes": {"type": "array"},
            },
        },
    },
}
RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec", "workerGroupSpecs"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
        "headServiceAnnotations": {"type": "object"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "upgradeStrategy": {"type": "object"},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "additionalProperties": False,
            "properties": {
                "rayStartParams": RAY_START_PARAMS,
                "template": POD_TEMPLATE,
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "headService": {"type": "object"},
                "enableIngress": {"type": "boolean"},
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "rayStartParams", "template"],
                "additionalProperties": False,
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                    "numOfHosts": {"type": "integer", "minimum": 1},
                    "suspend": {"type": "boolean"},
                    "scaleStrategy": {"type": "object"},
                    "rayStartParams": RAY_START_PARAMS,
                    "template": POD_TEMPLATE,
                },
            },
        },
    },
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
    },
}
SCHEMAS: dict[tuple[str, str], dict] = {
    ("ray.io/v1", "RayCluster"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": METADATA, "spec": RAY_CLUSTER_SPEC},
    },
    ("ray.io/v1", "RayJob"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["entrypoint"],
                "anyOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
                "additionalProperties": False,
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "rayClusterSpec": RAY_CLUSTER_SPEC,
                    "clusterSelector": {"type": "object"},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "runtimeEnvYAML": {"type": "string"},
                    "jobId": {"type": "string"},
                    "metadata": {"type": "object"},
                    "entrypointNumCpus": {"type": "number"},
                    "entrypointNumGpus": {"type": "number"},
                    "entrypointResources": {"type": "string"},
                    "submitterPodTemplate": POD_TEMPLATE,
                    "submitterConfig": {"type": "object"},
                    "suspend": {"type": "boolean"},
                    "managedBy": {"type": "string"},
                    "deletionStrategy": {"type": "object"},
                },
            },
        },
    },
    ("apps/v1", "Deployment"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "template"],
                "properties": {
                    "replicas": {"type": "integer", "minimum": 0},
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
                    },
                    "template": {
                        "allOf": [
                            POD_TEMPLATE,
                            {
                                "required": ["metadata"],
                                "properties": {"metadata": {"required": ["labels"]}},
                            },
                        ]
                    },
                },
            },
        },
    },
    ("v1", "Service"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "ports"],
                "properties": {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "selector": {"type": "object", "minProperties": 1},
                    "ports": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535}},
                        },
                    },
                },
            },
        },
    },
}

# Secrets must come from secretKeyRef / envFrom, never from a literal `value` under a name like these.
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|TRACKING_URI|STORE_URI)", re.IGNORECASE)


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes document under infra/k8s and infra/mlflow."""
    docs = []
    for path in yaml_files():
        if path.parent.name in ("k8s", "mlflow"):
            docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def containers(pod_template: dict) -> list[dict]:
    spec = pod_template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def cluster_specs() -> list[tuple[str, dict]]:
    """(file name, RayClusterSpec) of every RayCluster and RayJob manifest."""
    out = []
    for path, doc in manifests():
        if doc["kind"] == "RayCluster":
            out.append((path.name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append((path.name, doc["spec"]["rayClusterSpec"]))
    return out


def test_every_yaml_file_under_infra_parses():
    files = yaml_files()
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {
        "k8s/raycluster.yaml",
        "k8s/rayjob.yaml",
        "mlflow/mlflow-server.yaml",
        "ray/autoscaler-aws.yaml",
    } <= names
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_kubernetes_manifests_match_their_schemas():
    seen = set()
    for path, doc in manifests():
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in SCHEMAS, f"{path}: no schema for {key}; add one to tests/test_infra.py"
        try:
            jsonschema.validate(doc, SCHEMAS[key])
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            pytest.fail(f"{path} ({key[1]} {doc['metadata'].get('name')}): {where}: {e.message}")
        seen.add(key[1])
    assert {"RayCluster", "RayJob", "Deployment", "Service"} <= seen


def test_schemas_reject_what_kuberay_would_ignore_or_refuse():
    """The schemas have teeth: a misspelt field or a missing image fails."""
    doc = yaml.safe_load((INFRA / "k8s" / "raycluster.yaml").read_text())
    schema = SCHEMAS[("ray.io/v1", "RayCluster")]
    misspelt = json.loads(json.dumps(doc))
    misspelt["spec"]["workerGroupSpec"] = misspelt["spec"].pop("workerGroupSpecs")
    no_image = json.loads(json.dumps(doc))
    del no_image["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    for bad in (misspelt, no_image):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_ray_clusters_have_a_cpu_head_gpu_workers_and_no_literal_secrets():
    specs = cluster_specs()
    assert {name for name, _ in specs} == {"raycluster.yaml", "rayjob.yaml"}
    for name, spec in specs:
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: the head should schedule no work"
        for c in containers(head["template"]):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), (
                f"{name}: GPU on the head"
            )
        gpu_groups = [
            g
            for g in spec["workerGroupSpecs"]
            if any(
                int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                for c in containers(g["template"])
            )
        ]
        assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: Ray token authentication is off"
        groups = [head, *spec["workerGroupSpecs"]]
        for group in groups:
            for c in containers(group["template"]):
                assert c["image"] == "ghcr.io/OWNER/autocdsr:VERSION", f"{name}: image {c['image']}"
                env = {e["name"]: e for e in c.get("env", [])}
                # The driver (head) and rank 0 (a worker) both talk to MLflow.
                assert "secretKeyRef" in env["MLFLOW_TRACKING_URI"].get("valueFrom", {}), name
                for e in env.values():
                    if SECRET_NAME.search(e["name"]):
                        assert "value" not in e, f"{name}: {e['name']} is a literal; use a secretKeyRef"


def test_rayjob_runs_a_valid_training_command_that_fits_its_cluster():
    from autocdsr.config import load_train_config

    job = next(doc for _, doc in manifests() if doc["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "autocdsr.train"], argv
    assert argv[3] == "--data" and argv[4].startswith("s3://"), "shards are read from object storage"
    overrides = argv[5:]
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    cfg = load_train_config(None, overrides)  # unknown keys or wrong types raise ConfigError
    assert cfg.method == "cd+autocdsr" and cfg.train.use_gpu
    assert cfg.train.storage_path and cfg.train.storage_path.startswith("s3://"), "checkpoints must be shared"
    gpus = sum(
        g.get("maxReplicas", g.get("replicas", 0)) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    assert cfg.train.num_workers <= gpus, f"{cfg.train.num_workers} GPU workers on a cluster with {gpus} GPUs"


def test_mlflow_server_manifest_uses_a_database_object_storage_and_secrets():
    docs = {d["kind"]: d for _, d in manifests() if d["metadata"]["name"] == "mlflow"}
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects no MLflow pod"
    server = next(c for c in pod["spec"]["containers"] if c["name"] == "mlflow")
    args = server["args"]
    assert args[0] == "server"
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert "--serve-artifacts" in args
    assert any(a.startswith("--allowed-hosts=") for a in args), "cluster DNS names are refused otherwise"
    for c in containers(pod):
        env = {e["name"]: e for e in c.get("env", [])}
        if "MLFLOW_BACKEND_STORE_URI" in env:
            assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    init = pod["spec"]["initContainers"][0]
    assert init["args"][:2] == ["db", "upgrade"], "schema migrations run once, before serving"


def test_ray_autoscaler_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray" / "autoscaler-aws.yaml").read_text())
    schema_path = Path(sys.modules["ray.autoscaler"].__file__).parent / "ray-schema.json"
    jsonschema.validate(raw, json.loads(schema_path.read_text()))
    validate_config(prepare_config(raw))
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "no GPU node type"
    assert "IamInstanceProfile" in raw["available_node_types"][raw["head_node_type"]]["node_config"]


def shell_scripts() -> list[Path]:
    return sorted(INFRA.rglob("*.sh"))


def test_shell_scripts_are_valid_strict_bash_without_machine_paths():
    scripts = shell_scripts()
    assert {p.name for p in scripts} >= {
        "common.sh",
        "spark.sh",
        "ray.sh",
        "mlflow.sh",
        "all.sh",
        "build-dist.sh",
        "submit-k8s.sh",
        "submit-yarn.sh",
    }
    for path in scripts:
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{path}: {r.stderr}"
        text = path.read_text()
        if path.name != "common.sh":  # sourced, not run
            assert text.startswith("#!/usr/bin/env bash\n"), f"{path}: shebang"
            assert "\nset -euo pipefail\n" in text, f"{path}: must run with set -euo pipefail"
            assert os.access(path, os.X_OK), f"{path} is not executable"
    for path in INFRA.rglob("*"):
        if path.is_file():
            assert "/work/" not in path.read_text(errors="replace"), (
                f"{path} refers to a path on this machine"
            )
    # Stopping by name would kill other people's clusters on a shared machine.
    for path in LOCAL.glob("*.sh"):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"\b(pkill|killall)\b|\bray\"? stop\b", code), f"{path} kills by name"


def test_spark_submit_examples_ship_the_code_and_no_credentials(tmp_path):
    zip_file = tmp_path / "autocdsr-0.0.0-py-files.zip"
    zip_file.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: the scripts only check it exists
    sentinel = f"not-a-real-secret-{uuid.uuid4().hex}"
    common = {
        "DRY_RUN": "1",
        "INPUT": "s3a://bucket/raw/synth",
        "OUTPUT": "s3a://bucket/autocdsr/sequences/synth",
        "PY_FILES": str(zip_file),
        "AWS_ACCESS_KEY_ID": "AKIA" + sentinel,
        "AWS_SECRET_ACCESS_KEY": sentinel,
    }
    cases = {
        "submit-k8s.sh": {
            "K8S_MASTER": "k8s://https://127.0.0.1:6443",
            "SPARK_IMAGE": "registry.example/spark:4.3.0",
            "UPLOAD_PATH": "s3a://bucket/spark-uploads",
            "OBJECT_STORE_SECRET": "autocdsr-object-store",
        },
        "submit-yarn.sh": {"HADOOP_CONF_DIR": str(tmp_path)},
    }
    for script, extra in cases.items():
        env = {**os.environ, **common, **extra}
        r = subprocess.run(
            [str(INFRA / "spark" / script), "--max-len", "200"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, f"{script}: {r.stderr}"
        argv = shlex.split(r.stdout)
        assert argv[argv.index("--deploy-mode") + 1] == "cluster"
        assert argv[argv.index("--py-files") + 1] == str(zip_file)
        config = Path(argv[argv.index("--files") + 1])
        assert config.is_file() and argv[argv.index("--config") + 1] == config.name
        assert argv[-2:] == ["--max-len", "200"]
        assert argv[argv.index("--input") + 1] == common["INPUT"]
        assert sentinel not in r.stdout, f"{script} puts a credential on the command line"
        # A missing setting is named, and nothing runs.
        env.pop("INPUT")
        r = subprocess.run(
            [str(INFRA / "spark" / script)], env=env, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 1 and "INPUT is not set" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- packaging


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The wheel and the --py-files zip, built by the script behind `make wheel`."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [str(INFRA / "build-dist.sh"), str(out)],
        env={**os.environ, "AUTOCDSR_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("autocdsr-*-py3-none-any.whl")
    (zip_file,) = out.glob("autocdsr-*-py-files.zip")
    return {"wheel": wheel, "zip": zip_file}


def test_build_dist_makes_a_wheel_and_a_py_files_zip(dist):
    import zipfile

    with zipfile.ZipFile(dist["wheel"]) as whl:
        wheel_names = set(whl.namelist())
    with zipfile.ZipFile(dist["zip"]) as z:
        zip_names = set(z.namelist())
    for needed in (
        "pipelines/__init__.py",
        "pipelines/build.py",
        "pipelines/config.py",
        "autocdsr/configtools.py",
    ):
        assert needed in zip_names and needed in wheel_names, needed
    assert any(n.endswith(".dist-info/METADATA") for n in wheel_names)
    assert {n.split("/")[0] for n in zip_names} == {"autocdsr", "pipelines"}
    assert not [n for n in wheel_names | zip_names if "__pycache__" in n or n.endswith(".pyc")]


# ----------------------------------------------------------------------------- local services


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports. All are bound at once: a port freed by one call can be handed out again by
    the next, and a service given the same port twice fails to start (seen in CI: Ray's dashboard and
    dashboard agent both on one port)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def owned_processes(state: Path) -> list[tuple[int, str]]:
    """Live (non-zombie) processes started by the scripts for this state folder: they carry its marker."""
    marker = f"AUTOCDSR_LOCAL_CLUSTER={state}:".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes()
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        if any(entry.startswith(marker) for entry in environ.split(b"\0")):
            found.append((int(d.name), cmdline.replace(b"\0", b" ").decode(errors="replace")[:160]))
    return found


class LocalService:
    """One infra/local script with its own state folder and ports, for one test."""

    def __init__(self, script: str, ports: dict[str, int]) -> None:
        self.script = LOCAL / script
        # Short and outside the repository: Ray puts Unix sockets under it (107-byte limit).
        self.state = Path(tempfile.mkdtemp(prefix="acs-", dir="/tmp")).resolve()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")
        }
        self.env |= {
            "AUTOCDSR_LOCAL_STATE": str(self.state),
            "AUTOCDSR_PYTHON": sys.executable,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            **{k: str(v) for k, v in ports.items()},
        }

    def run(self, command: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.script), command], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> subprocess.CompletedProcess:
        r = self.run("start")
        assert r.returncode == 0, f"{self.script.name} start failed:\n{r.stdout}\n{r.stderr}"
        return r

    def stop_and_check(self) -> None:
        """Stop; then nothing the service started may be alive. Kills leftovers by pid before failing."""
        r = self.run("stop", timeout=180)
        left = owned_processes(self.state)
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert r.returncode == 0, f"{self.script.name} stop failed:\n{r.stdout}\n{r.stderr}"
        assert not left, f"processes left after {self.script.name} stop: {left}"
        status = self.run("status", timeout=60)
        assert status.returncode == 3, (
            f"status after stop: {status.returncode}\n{status.stdout}{status.stderr}"
        )

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in (self.state / "logs").glob("*")
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)


def service(script: str, ports: dict[str, int]) -> Iterator[LocalService]:
    svc = LocalService(script, ports)
    try:
        svc.start()
        yield svc
    finally:
        try:
            svc.stop_and_check()
        finally:
            svc.cleanup()


@pytest.fixture
def spark_cluster() -> Iterator[LocalService]:
    names = ("AUTOCDSR_SPARK_MASTER_PORT", "AUTOCDSR_SPARK_MASTER_UI_PORT", "AUTOCDSR_SPARK_WORKER_UI_PORT")
    yield from service("spark.sh", dict(zip(names, free_ports(len(names)), strict=True)))


@pytest.fixture
def mlflow_server() -> Iterator[LocalService]:
    yield from service("mlflow.sh", {"AUTOCDSR_MLFLOW_PORT": free_port()})


@pytest.fixture
def ray_head() -> Iterator[LocalService]:
    # Free ports come from the ephemeral range, above Ray's worker ports (10002-19999).
    names = (
        "AUTOCDSR_RAY_PORT",
        "AUTOCDSR_RAY_DASHBOARD_PORT",
        "AUTOCDSR_RAY_CLIENT_PORT",
        "AUTOCDSR_RAY_AGENT_PORT",
    )
    yield from service("ray.sh", dict(zip(names, free_ports(len(names)), strict=True)))


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def test_local_scripts_refuse_bad_settings_and_busy_ports():
    svc = LocalService("mlflow.sh", {"AUTOCDSR_MLFLOW_PORT": 70000})
    try:
        r = svc.run("start", timeout=60)
        assert r.returncode == 1 and "AUTOCDSR_MLFLOW_PORT=70000 is not a port number" in r.stderr, r.stderr
        r = svc.run("bogus", timeout=60)
        assert r.returncode == 2 and "usage" in r.stderr
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            svc.env["AUTOCDSR_MLFLOW_PORT"] = str(busy.getsockname()[1])
            r = svc.run("start", timeout=60)
        assert r.returncode == 1 and "already in use" in r.stderr and "AUTOCDSR_MLFLOW_PORT" in r.stderr, (
            r.stderr
        )
        assert not owned_processes(svc.state)
        assert svc.run("status", timeout=60).returncode == 3
        assert svc.run("stop", timeout=60).returncode == 0  # stopping what never ran is fine
    finally:
        svc.cleanup()
    # one port given to two of Ray's components: refused by name before anything starts
    gcs, client, agent = free_ports(3)
    ray = LocalService(
        "ray.sh",
        {
            "AUTOCDSR_RAY_PORT": gcs,
            "AUTOCDSR_RAY_DASHBOARD_PORT": agent,
            "AUTOCDSR_RAY_CLIENT_PORT": client,
            "AUTOCDSR_RAY_AGENT_PORT": agent,
        },
    )
    try:
        r = ray.run("start", timeout=60)
        assert r.returncode == 1 and f"port {agent} is given twice" in r.stderr, r.stderr
        assert not owned_processes(ray.state)
    finally:
        ray.cleanup()


def isolated_python(where: Path) -> Path:
    """A Python that sees this environment's libraries (pyspark, PyYAML) but not this project: the editable
    install hooks in through a .pth file, and .pth files inside a path listed by a .pth are not read."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    site_dir = next((where / "lib").glob("python3.*/site-packages"))
    (site_dir / "autocdsr-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return where / "bin" / "python"


PROBE = """\
import pipelines
from pyspark.sql import SparkSession

def where(_):
    import pipelines
    return pipelines.__file__

spark = SparkSession.builder.appName("autocdsr-py-files-probe").getOrCreate()
print("DRIVER", pipelines.__file__)
print("EXECUTORS", sorted(set(spark.sparkContext.parallelize(range(4), 2).map(where).collect())))
spark.stop()
"""


@pytest.mark.slow
def test_spark_standalone_builds_sequences_with_the_code_from_py_files(spark_cluster, dist, tmp_path):
    svc = spark_cluster
    master = f"spark://127.0.0.1:{svc.env['AUTOCDSR_SPARK_MASTER_PORT']}"
    ui = f"http://127.0.0.1:{svc.env['AUTOCDSR_SPARK_MASTER_UI_PORT']}"

    # Outside the repository, with a driver and executor Python that cannot import the project.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    shutil.copy(REPO / "jobs" / "build_sequences.py", job_dir)
    shutil.copy(REPO / "conf" / "data" / "synth.yaml", job_dir)
    shutil.copy(REPO / "conf" / "spark" / "log4j2.properties", job_dir)
    (job_dir / "probe.py").write_text(PROBE)
    python = isolated_python(tmp_path / "pyenv")
    r = subprocess.run([str(python), "-c", "import pipelines"], cwd=job_dir, capture_output=True, timeout=60)
    assert r.returncode != 0, "the driver Python must not see the repository's packages"

    synth_args = ["--out", str(job_dir / "logs"), "--users", "200", "--seed", "3"]
    synth = subprocess.run(
        [sys.executable, "-m", "autocdsr.synth", *synth_args], capture_output=True, text=True, timeout=120
    )
    assert synth.returncode == 0, synth.stderr
    input_rows = int(re.search(r"total (\d+) rows", synth.stdout + synth.stderr).group(1))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARK_HOME")}
    env |= {
        "PYSPARK_PYTHON": str(python),
        "PYSPARK_DRIVER_PYTHON": str(python),
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    submit = [
        str(BIN / "spark-submit"),
        "--master",
        master,
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        "spark.executor.memory=1g",
        "--conf",
        "spark.sql.shuffle.partitions=4",
        "--driver-java-options",
        f"-Dlog4j2.configurationFile=file:{job_dir / 'log4j2.properties'}",
        "--py-files",
        str(dist["zip"]),
    ]

    probe = subprocess.run(
        [*submit, "probe.py"], cwd=job_dir, env=env, capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-5000:] + svc.logs()
    driver = re.search(r"^DRIVER (.+)$", probe.stdout, re.M).group(1)
    executors = re.search(r"^EXECUTORS (.+)$", probe.stdout, re.M).group(1)
    assert driver.startswith(str(dist["zip"])), driver
    assert dist["zip"].name in executors and str(REPO) not in executors, executors

    out = tmp_path / "sequences"
    job = subprocess.run(
        [*submit, "build_sequences.py", "--input", "logs", "--output", str(out), "--config", "synth.yaml"],
        cwd=job_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert job.returncode == 0, job.stderr[-5000:] + svc.logs()
    assert (out / "_SUCCESS").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["input_rows"] == input_rows
    assert c["input_rows"] == (
        c["interactions_kept"]
        + c["rejected_rows"]
        + c["duplicates_dropped"]
        + c["interactions_in_short_subsequences"]
    )
    assert c["users"] == 200 and c["subsequences"] >= 200 and c["items"] > 0
    for split in ("train", "valid", "test"):
        assert pq.read_table(out / split).num_rows == c["subsequences"], split

    # Both applications ran on the standalone cluster, not in a local[*] driver.
    apps = {a["name"]: a["state"] for a in http_json(f"{ui}/json/")["completedapps"]}
    assert apps.get("autocdsr-build-sequences") == "FINISHED", apps
    assert apps.get("autocdsr-py-files-probe") == "FINISHED", apps


@pytest.mark.slow
def test_mlflow_server_logs_and_serves_runs_and_artifacts_over_http(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    svc = mlflow_server
    url = f"http://127.0.0.1:{svc.env['AUTOCDSR_MLFLOW_PORT']}"
    again = svc.run("start", timeout=120)
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    assert svc.run("status", timeout=60).returncode == 0
    assert f"MLFLOW_TRACKING_URI={url}" in svc.run("env", timeout=60).stdout

    client = MlflowClient(tracking_uri=url)
    experiment = client.create_experiment(f"infra-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    run_id = run.info.run_id
    client.log_param(run_id, "method", "cd+autocdsr")
    client.log_metric(run_id, "valid/ndcg_at_10", 0.25, step=3)
    report = tmp_path / "report.txt"
    report.write_text("per-domain table\n")
    client.log_artifact(run_id, str(report), artifact_path="reports")
    client.set_terminated(run_id)

    # Artifacts go through the server (mlflow-artifacts:), so clients need no shared disk or bucket access.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"method": "cd+autocdsr"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "valid/ndcg_at_10")] == [(3, 0.25)]
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]
    downloaded = client.download_artifacts(run_id, "reports/report.txt", str(tmp_path / "down"))
    assert Path(downloaded).read_text() == "per-domain table\n"
    stored = list((svc.state / "mlflow" / "mlartifacts").rglob("report.txt"))
    assert len(stored) == 1, "the server keeps artifacts under its own artifact destination"


TINY_JOB = """\
import ray

import helper


@ray.remote
def square(x):
    return x * x


ray.init()
print(helper.MARK, sum(ray.get([square.remote(i) for i in range(4)])), int(ray.cluster_resources()["CPU"]))
"""


@pytest.mark.slow
def test_ray_head_runs_submitted_jobs_and_stop_ends_running_ones(ray_head, tmp_path):
    svc = ray_head
    address = f"http://127.0.0.1:{svc.env['AUTOCDSR_RAY_DASHBOARD_PORT']}"
    work = tmp_path / "working_dir"
    work.mkdir()
    mark = f"autocdsr-infra-{uuid.uuid4().hex[:8]}"
    (work / "helper.py").write_text(f"MARK = {mark!r}\n")
    (work / "tiny.py").write_text(TINY_JOB)
    sleeper = f"sleeper_{uuid.uuid4().hex[:8]}.py"
    (work / sleeper).write_text("import time\n\nprint('sleeping', flush=True)\ntime.sleep(600)\n")
    client_env = {**svc.env, "RAY_AUTH_MODE": "disabled"}

    # Submitted from elsewhere: the code reaches the cluster through --working-dir (runtime_env) only.
    def submit(*entrypoint: str, no_wait: bool = False) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(work)]
        return subprocess.run(
            [*cmd, *(["--no-wait"] if no_wait else []), "--", *entrypoint],
            cwd=tmp_path,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    job = submit("python", "tiny.py")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:] + svc.logs()
    assert f"{mark} 14 8" in job.stdout, job.stdout[-3000:]

    # A job still running when the cluster stops must not outlive it (entrypoints get their own session).
    r = submit("python", sleeper, no_wait=True)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 120
    while not [p for p, cmd in owned_processes(svc.state) if sleeper in cmd]:
        assert time.monotonic() < deadline, "the sleeping job never started"
        time.sleep(1)
    svc.stop_and_check()  # the fixture's own stop afterwards finds nothing to do


@pytest.mark.slow
def test_whole_pipeline_on_spark_standalone_ray_head_and_mlflow_server(
    spark_cluster, ray_head, mlflow_server, dist, tmp_path
):
    """The production path on localhost: spark-submit to a standalone master (code from --py-files), then
    `ray job submit --working-dir . -- python -m autocdsr.train ...` to `ray start --head`, logging to an
    MLflow tracking server over HTTP; checked through the MLflow client. The fixtures stop all three."""
    from mlflow import MlflowClient

    master = f"spark://127.0.0.1:{spark_cluster.env['AUTOCDSR_SPARK_MASTER_PORT']}"
    ray_address = f"http://127.0.0.1:{ray_head.env['AUTOCDSR_RAY_DASHBOARD_PORT']}"
    mlflow_url = f"http://127.0.0.1:{mlflow_server.env['AUTOCDSR_MLFLOW_PORT']}"
    logs, out = tmp_path / "logs", tmp_path / "sequences"
    synth = subprocess.run(
        [sys.executable, "-m", "autocdsr.synth", "--out", str(logs), "--users", "300", "--seed", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARK_HOME")}
    env |= {
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    build = subprocess.run(
        [str(BIN / "spark-submit"), "--master", master, "--conf", "spark.ui.enabled=false",
         "--conf", "spark.executor.memory=1g", "--conf", "spark.sql.shuffle.partitions=4",
         "--driver-java-options", f"-Dlog4j2.configurationFile=file:{REPO / 'conf/spark/log4j2.properties'}",
         "--py-files", str(dist["zip"]), "jobs/build_sequences.py",
         "--input", str(logs), "--output", str(out), "--config", "conf/data/synth.yaml", "--max-len", "40"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:] + spark_cluster.logs()
    assert (out / "_SUCCESS").is_file()

    entry = ["python", "-m", "autocdsr.train", "--data", str(out), "method=cd+autocdsr", "model.d_model=16",
             "model.n_layers=1", "model.n_heads=2", "data.max_len=30", "train.batch_size=32", "train.max_steps=40",
             "train.eval_every=20", "train.num_workers=2", "train.warmup_steps=5", "eval.num_negatives=20",
             f"train.storage_path={tmp_path}/ray", f"mlflow.tracking_uri={mlflow_url}", "mlflow.experiment=chain",
             "mlflow.run_name=chain", "registry.name=chain-model"]  # fmt: skip
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_address,
        "--working-dir",
        str(REPO),
        "--",
        *entry,
    ]
    job = subprocess.run(cmd, cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:] + ray_head.logs()
    assert "registered chain-model version 1" in job.stdout

    client = MlflowClient(mlflow_url)
    version = client.get_model_version_by_alias("chain-model", "candidate")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "chain"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must go through the server"
    assert run.data.params["method"] == "cd+autocdsr"
    # The Ray workers ran the code shipped with --working-dir (Ray's runtime_env copy), not the checkout that
    # the machine's editable install points at: what a cluster without this repository on its disk does.
    worker_code = Path(run.data.tags["code.worker_path"])
    assert "runtime_resources" in worker_code.parts and not worker_code.is_relative_to(REPO), worker_code
    manifest = json.loads((out / "manifest.json").read_text())
    assert run.data.tags["data.manifest_sha256"] and run.data.tags["data.users"] == str(
        manifest["counts"]["users"]
    )
    for key in ("test/ndcg_10/all", "val/ndcg_10/books", "train/alpha1", "train/a_cd"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train/loss_rec")) == 40
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/cross_domain_attention.png" in plots and "plots/pareto_weights_model.png" in plots
    stored = list((mlflow_server.state / "mlflow" / "mlartifacts").rglob("MLmodel"))
    assert stored, "the model was uploaded to the server's artifact store"
