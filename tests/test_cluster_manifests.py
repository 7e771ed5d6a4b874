"""The cluster manifests parse, validate against a schema where a package ships one, and fit together.

Ray ships its cluster-config schema (``ray/autoscaler/ray-schema.json``): the ``ray up`` YAML is validated
with it, and with Ray's own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs first). No
Kubernetes schema package is installed, so the Kubernetes objects are checked for the structure the API server
and KubeRay require and for the cross-references between them (secrets, config maps, selectors, ports).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "infra" / "cluster"
K8S_FILES = sorted((CLUSTER / "k8s").glob("*.yaml"))
RAY_UP = CLUSTER / "ray-up" / "aws-gpu.yaml"
SECRET_VARS = {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "POSTGRES_PASSWORD", "AWS_SESSION_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME",
               "MLFLOW_TRACKING_USERNAME", "RAY_AUTH_TOKEN"}
CREDENTIALS_FILE = "/etc/stmi/s3/credentials"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def k8s_objects() -> list[dict[str, Any]]:
    docs = []
    for f in K8S_FILES:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                doc["__file__"] = f.name
                docs.append(doc)
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_objects() if d["kind"] == kind]


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod template) of every pod an object creates: Deployments, StatefulSets, Ray head/worker groups."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet"):
        yield obj["metadata"]["name"], spec["template"]
    cluster = spec.get("rayClusterSpec", spec) if obj["kind"] in ("RayCluster", "RayJob") else None
    if cluster is not None:
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in by_kind("RayCluster"):
        out.append((obj["metadata"]["name"], obj["spec"]))
    for obj in by_kind("RayJob"):
        out.append((obj["metadata"]["name"], obj["spec"]["rayClusterSpec"]))
    return out


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ----------------------------------------------------------------------------------------------------- ray up
@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_up_config_matches_rays_schema(ray_schema: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_UP.read_text())
    jsonschema.validate(config, ray_schema)
    prepared = prepare_config(copy.deepcopy(config))  # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"

    head = config["head_node_type"]
    assert head in config["available_node_types"]
    gpu_types = {n: t for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no node type advertises GPUs"
    for name, node in gpu_types.items():
        assert name != head
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]
        assert node["node_config"]["InstanceType"].startswith(("g", "p")), "GPU resources on a non-GPU instance"
    assert config["docker"]["image"] and ":" in config["docker"]["image"]
    assert any("--shm-size" in opt for opt in config["docker"]["run_options"])
    assert any("--env-file" in opt for opt in config["docker"]["run_options"])  # credentials by file, not here
    text = RAY_UP.read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S", text)


def test_ray_schema_rejects_a_broken_config(ray_schema: dict[str, Any]) -> None:
    """The validation above can fail: a typo in a node type or a fractional GPU count is caught."""
    config = yaml.safe_load(RAY_UP.read_text())
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu_worker"]["max_wokers"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        jsonschema.validate(typo, ray_schema)
    fractional = copy.deepcopy(config)
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(fractional, ray_schema)


# ------------------------------------------------------------------------------------------------- kubernetes
def test_every_manifest_is_well_formed() -> None:
    objects = k8s_objects()
    kinds = {d["kind"] for d in objects}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "RayCluster",
            "RayJob"} <= kinds
    namespaces = {d["metadata"]["name"] for d in objects if d["kind"] == "Namespace"}
    for d in objects:
        where = f"{d['__file__']}: {d['kind']}"
        assert isinstance(d.get("apiVersion"), str) and d["apiVersion"], where
        assert DNS1123.match(d["metadata"]["name"]), f"{where}: name {d['metadata'].get('name')!r}"
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") in namespaces, f"{where}: namespace not declared"
        if d["kind"] not in ("Namespace", "ConfigMap", "Secret"):
            assert isinstance(d.get("spec"), dict), f"{where}: no spec"
        expected_api = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "RayCluster": "ray.io/v1",
                        "RayJob": "ray.io/v1"}.get(d["kind"], "v1")
        assert d["apiVersion"] == expected_api, where


def test_containers_have_images_resources_and_secret_refs() -> None:
    secrets = {s["metadata"]["name"]: set(s.get("stringData", s.get("data", {}))) for s in by_kind("Secret")}
    config_maps = {c["metadata"]["name"]: c["data"] for c in by_kind("ConfigMap")}
    n_containers = 0
    for obj in k8s_objects():
        for label, template in pod_templates(obj):
            for c in template["spec"]["containers"]:
                n_containers += 1
                where = f"{obj['__file__']} {label}/{c['name']}"
                image = c["image"]
                assert ":" in image and not image.endswith(":latest"), f"{where}: pin the image tag ({image})"
                res = c["resources"]
                assert res.get("limits", {}).get("memory") and res.get("requests", {}).get("cpu"), where
                names = set()
                for e in c.get("env", []):
                    names.add(e["name"])
                    if e["name"] in SECRET_VARS:
                        ref = e.get("valueFrom", {}).get("secretKeyRef")
                        assert ref and "value" not in e, f"{where}: {e['name']} must come from a Secret"
                        assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: unknown secret {ref}"
                for src in c.get("envFrom", []):
                    name = src["configMapRef"]["name"]
                    assert name in config_maps, f"{where}: ConfigMap {name} is not defined"
                    names |= set(config_maps[name])
                if obj["kind"] in ("RayCluster", "RayJob") or c["name"] == "mlflow":
                    need = {"STMI_S3_BUCKET", "STMI_S3_PREFIX", "AWS_SHARED_CREDENTIALS_FILE"}
                    if obj["kind"] != "Deployment":
                        need |= {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
                    assert need <= names, f"{where}: missing {sorted(need - names)}"
                    # The S3 keys by file only: a Ray driver's AWS_* values would be copied into runtime_envs.
                    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & names, f"{where}: S3 keys in env"
                    env = {e["name"]: e for e in c.get("env", [])}
                    assert env["AWS_SHARED_CREDENTIALS_FILE"]["value"] == CREDENTIALS_FILE, where
                    mount = next(m for m in c["volumeMounts"] if CREDENTIALS_FILE.startswith(m["mountPath"] + "/"))
                    assert mount.get("readOnly") is True, where
                    vol = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
                    assert vol["secret"]["defaultMode"] == 0o400, where
                    assert vol["secret"]["secretName"] in secrets, where
                    assert [i["key"] for i in vol["secret"]["items"]] == ["credentials"], where
                    assert "credentials" in secrets[vol["secret"]["secretName"]], where
    assert n_containers == 6  # postgres, mlflow, head + GPU worker of the RayCluster and of the RayJob
    text = "\n".join(f.read_text() for f in K8S_FILES)
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|aws_secret_access_key)\s*[:=]\s*(?!CHANGE_ME|%s|\$)\S", text)
    for cm in config_maps.values():
        assert not SECRET_VARS & set(cm), "credentials belong in a Secret, not a ConfigMap"


def test_ray_clusters_have_a_gpu_worker_group() -> None:
    import ray

    specs = ray_cluster_specs()
    assert len(specs) == 2
    for name, spec in specs:
        version = spec["rayVersion"]
        assert version.split(".")[:2] == ray.__version__.split(".")[:2], f"{name}: rayVersion {version} != image's"
        groups = spec["workerGroupSpecs"]
        gpu_groups = [g for g in groups if any(gpus(c) > 0 for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{name}: no worker group requests nvidia.com/gpu"
        for g in gpu_groups:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            for c in g["template"]["spec"]["containers"]:
                req = c["resources"].get("requests", {}).get("nvidia.com/gpu")
                assert req is None or int(req) == gpus(c), "GPU requests must equal limits"
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/dev/shm" in mounts and "/data" in mounts
        for group in [spec["headGroupSpec"], *groups]:
            params = group["rayStartParams"]
            assert all(isinstance(v, str) for v in params.values()), "KubeRay wants string rayStartParams"
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}


def test_rayjob_runs_the_paper_sweep_and_fits_the_cluster() -> None:
    from orchestration.sweep import parser

    (job,) = by_kind("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "orchestration/sweep.py"]
    args = parser().parse_args(argv[2:])  # the sweep's real parser: a renamed flag fails here
    assert args.preset == "paper" and args.data_root == "/data"
    assert set(args.datasets) == {"rgbnt201", "msvr310", "rgbnt100"}
    spec = job["spec"]["rayClusterSpec"]
    total_gpus = sum(g["replicas"] * max(gpus(c) for c in g["template"]["spec"]["containers"])
                     for g in spec["workerGroupSpecs"])
    per_trial = args.workers_per_trial * args.gpus_per_worker
    assert 0 < per_trial <= total_gpus, f"a trial needs {per_trial} GPUs, the cluster has {total_gpus}"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["workingDir"] == "/app"  # the image's repository: the relative script path resolves


def test_services_select_their_pods_and_mlflow_reaches_postgres() -> None:
    workloads = by_kind("Deployment") + by_kind("StatefulSet")
    for svc in by_kind("Service"):
        selector = svc["spec"]["selector"]
        targets = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} workloads"
        w = targets[0]
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"Service {svc['metadata']['name']}: no container port {p['targetPort']}"

    (sts,) = by_kind("StatefulSet")
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind("Service")}
    assert sts["spec"]["volumeClaimTemplates"]

    (mlflow,) = by_kind("Deployment")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    opts = dict(zip(args[::2], args[1::2]))
    backend = opts["--backend-store-uri"]
    pg_service = next(s for s in by_kind("Service") if s["metadata"]["name"] == sts["spec"]["serviceName"])
    host_port = backend.split("@", 1)[1].split("/", 1)[0]
    assert backend.startswith("postgresql://")
    assert host_port.split(".")[0] == pg_service["metadata"]["name"]
    assert int(host_port.rsplit(":", 1)[1]) == pg_service["spec"]["ports"][0]["port"]
    assert opts["--artifacts-destination"] == "s3://$(STMI_S3_BUCKET)/$(STMI_S3_PREFIX)/mlflow"


def test_mlflow_accepts_the_tracking_uri_host_the_cluster_uses() -> None:
    """MLflow answers 403 to Host headers not in --allowed-hosts: the ConfigMap's tracking URI must pass."""
    from urllib.parse import urlparse

    from mlflow.server.security_utils import is_allowed_host_header

    (mlflow,) = by_kind("Deployment")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = [h.strip() for h in args[args.index("--allowed-hosts") + 1].split(",")]
    (cm,) = by_kind("ConfigMap")
    uri = urlparse(cm["data"]["MLFLOW_TRACKING_URI"])
    for host in (uri.netloc, f"mlflow:{uri.port}", "mlflow.stmi.svc:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")
    svc = next(s for s in by_kind("Service") if s["metadata"]["name"] == "mlflow")
    assert uri.hostname.split(".")[0] == "mlflow" and uri.port == svc["spec"]["ports"][0]["port"]


def test_ray_clusters_require_the_token_and_mlflow_requires_a_login() -> None:
    """Nobody reaching the cluster network submits a job or reads a run without credentials."""
    for name, spec in ray_cluster_specs():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: Ray token authentication is off"
        major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), f"{name}: token authentication needs Ray >= 2.52"
    (mlflow,) = by_kind("Deployment")
    pod = mlflow["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    env = {e["name"]: e for e in c["env"]}
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "stmi-mlflow-auth"
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (auth_secret,) = [s for s in by_kind("Secret") if s["metadata"]["name"] == vol["secret"]["secretName"]]
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(auth_secret["stringData"][Path(config_path).name])
    assert ini["mlflow"]["database_uri"].startswith("postgresql://")  # users survive a restart of the pod
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    # The probes still work: MLflow's auth app leaves /health open (mlflow/server/auth: _UNPROTECTED_PATH_PREFIXES).
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    # The image has the auth app's dependencies (mlflow[auth]: Flask-WTF).
    assert "mlflow[auth]" in (CLUSTER / "Dockerfile").read_text()
