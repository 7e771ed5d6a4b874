"""The README's end-to-end path as CI runs it: stack up (twice), the demo sweep of two datasets through
`ray job submit -- python orchestration/sweep.py`, what it left in MLflow, the model registry and the bucket read
back, the champion served with the printed `mlflow models serve` command and queried with the printed `curl`
command, stack down (twice) with no process left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.local.stack import LocalStack, Ports, StackConfig
from orchestration.sweep import HPARAMS
from stmi.config import flatten
from stmi.recipes import recipe

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 1500, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.local", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_readme_demo_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("demo-stack")
    ports = Ports.free()
    port_flags = [x for name, value in vars(ports).items() if value for x in (Ports.flag(name), str(value))]
    common = ["--state-dir", str(state), *port_flags]
    serve_port = _free_port()
    env = {**os.environ, "STMI_DEMO_DATA": str(tmp_path_factory.mktemp("demo-data"))}
    try:
        up = _cli("up", *common, "--num-cpus", "4", env=env, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        again = _cli("up", *common, env=env, timeout=300)  # twice is harmless
        assert again.returncode == 0 and again.stdout.count("already running") == 3, again.stdout + again.stderr
        # The job inherits the Ray head's environment, so the demo data location must be set there too: the
        # stack was started with STMI_DEMO_DATA in its environment above.
        demo = _cli("demo", *common, "--name", "readme", "--serve-port", str(serve_port), "--",
                    "--datasets", "rgbnt201", "msvr310", "--num-samples", "1", "--max-epochs", "1", env=env)
        assert demo.returncode == 0, demo.stdout[-5000:] + demo.stderr[-3000:]
        out = demo.stdout
        assert "STMI demo sweep 'readme' finished" in out
        assert re.search(r"rgbnt201\s+\S+\s+0\.\d{3}\s+0\.\d{3}", out), out[-2000:]
        # every trial with its validation mAP, and what a seed does to that number
        assert "Every trial by validation mAP" in out and "Seed noise:" in out, out[-3000:]
        trial = r"msvr310\s+\w{8}\s+0\.\d{3}\s+1 epoch\(s\)\s+alpha \S+ beta \S+ p \S+ tau \S+ K \d+ lr "
        assert re.search(trial, out), out[-3000:]
        serve_cmd = next(line.strip() for line in out.splitlines() if "mlflow models serve" in line)
        curl_cmd = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl "))

        config = StackConfig.load(state)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config.tracking_uri)
        mv = client.get_model_version_by_alias("stmi-rgbnt201", "champion")
        keys = []
        s3 = __import__("boto3").client("s3", endpoint_url=config.s3_endpoint, aws_access_key_id=config.access_key,
                                        aws_secret_access_key=config.secret_key, region_name=config.region)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=config.bucket):
            keys += [o["Key"] for o in page.get("Contents", [])]
        assert any(mv.source.split("/")[-1] in k and k.endswith("MLmodel") for k in keys)
        _check_sweep_in_mlflow(client, keys, "readme", ("rgbnt201", "msvr310"), epochs=1)

        serve_env = {**env, **config.env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
        server = subprocess.Popen(serve_cmd, shell=True, env=serve_env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            while time.time() < deadline:
                if subprocess.run(["curl", "-sf", f"http://127.0.0.1:{serve_port}/ping"],
                                  capture_output=True).returncode == 0:
                    break
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(1)
            answer = subprocess.run(curl_cmd, shell=True, capture_output=True, text=True, cwd=REPO, timeout=60)
            preds = json.loads(answer.stdout)["predictions"]
            assert len(preds) == 1 and preds[0]["modalities"] == ["rgb", "nir", "tir"]
            emb = preds[0]["embedding"]
            assert len(emb) > 8 and abs(sum(x * x for x in emb) - 1.0) < 1e-4  # a unit-length retrieval embedding
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        pids = [p for ps in LocalStack(config).pids().values() for p in ps]
        assert pids
    finally:
        down = _cli("down", "--state-dir", str(state), timeout=300)
        down2 = _cli("down", "--state-dir", str(state), timeout=300)
    assert down.returncode == 0 and down2.returncode == 0, down.stdout + down.stderr + down2.stderr
    assert "not running" in down2.stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), pid


def _check_sweep_in_mlflow(client, keys: list[str], name: str, datasets: tuple[str, ...], epochs: int) -> None:  # noqa: ANN001
    """What a sweep of one Optuna trial per dataset leaves behind, read back from MLflow and the bucket's ``keys``:
    a FINISHED parent per dataset with the Optuna plots, the summary and the report; its trial (the recipe's point,
    every epoch logged once); the champion registered from it, its files in the bucket, and the version's tags and
    description that a reviewer reads."""
    exp = client.get_experiment_by_name(f"stmi-{name}")
    assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["stmi.dataset"]: r for r in runs if r.data.tags.get("stmi.role") == "parent"}
    assert set(parents) == set(datasets)
    for dataset, parent in parents.items():
        recipe_point = {k: v for k, v in flatten(recipe("demo", dataset)).items() if k in HPARAMS}
        assert set(recipe_point) == set(HPARAMS)
        assert parent.info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 1, [c.info.run_name for c in children]
        trial = children[0]
        assert set(HPARAMS) <= set(trial.data.params), sorted(trial.data.params)
        assert trial.info.status == "FINISHED", trial.info.status
        assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, "epoch")) == list(range(epochs))
        # the first point Optuna evaluates is the recipe's (the paper's values)
        assert all(abs(float(trial.data.params[k]) - v) < 1e-12 for k, v in recipe_point.items()), trial.data.params
        artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
        assert {"optuna", "summary", "search_space"} <= artifacts
        assert "optuna/optimization_history.png" in {f.path for f in client.list_artifacts(parent.info.run_id,
                                                                                              "optuna")}
        assert parent.data.params["best.trial_id"] == trial.data.tags["stmi.trial_id"]
        assert parent.data.params["best.run_id"] == trial.info.run_id
        mv = client.get_model_version_by_alias(f"stmi-{dataset}", "champion")
        assert mv.run_id == parent.info.run_id and mv.tags["stmi.trained_run"] == trial.info.run_id
        model_keys = [k for k in keys if "/mlflow/" in k and mv.source.split("/")[-1] in k]
        assert any(k.endswith("MLmodel") for k in model_keys), "the registered model's files are not in the bucket"
        assert any(k.endswith("best.pt") for k in model_keys), model_keys
        assert float(mv.tags["metric.best_val_mAP"]) == trial.data.metrics["best_val_mAP"]
        assert float(mv.tags["metric.test_mAP"]) == trial.data.metrics["test_mAP"]
        assert mv.tags["stmi.data.fingerprint.train"] == trial.data.tags["stmi.data.fingerprint.train"]
        assert mv.tags["stmi.code.source_hash"] == trial.data.tags["stmi.code.source_hash"]
        assert mv.tags["stmi.sweep"] == name and mv.tags["stmi.trial"] == parent.data.params["best.trial_id"]
        assert f"--rerun {trial.info.run_id}" in mv.description
        note = parent.data.tags["mlflow.note.content"]
        assert "orchestration/sweep.py" in note and "demo.yaml" in note and parent.data.params["best.trial_id"] in note
        assert {"report/report.md", "report/report.html"} <= \
            {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
