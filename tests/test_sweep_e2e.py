"""The sweep as users run it: `ray job submit -- python orchestration/sweep.py` against a real Ray head, with the
S3 and MLflow servers on loopback; then MLflow, the model registry and the bucket are read back. Also: resume after
the sweep's driver is killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.sweep import HPARAMS
from stmi.data.synth import make_synthetic

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
SWEEP = str(REPO / "orchestration" / "sweep.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweepdata")
    for dataset in ("rgbnt201", "msvr310"):
        make_synthetic(dataset, root, ids=14, seed=5, images_per_id=8)
    return root


def _children(client, exp_id: str, parent_id: str):
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_demo_sweep_via_ray_job_submit(ray_cluster, mlflow_server, data_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    # --confirm-top 0: the best search trial is the champion (the confirmation has its own test, test_sweep_seeds)
    proc = ray_cluster.submit("python", SWEEP, "--datasets", "rgbnt201", "msvr310", "--num-samples", "2",
                              "--max-epochs", "2", "--confirm-top", "0", "--data-root", str(data_root), "--name", "e2e",
                              timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "STMI sweep: running the DEMO preset" in proc.stdout
    client = MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name("stmi-e2e")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["stmi.dataset"]: r for r in runs if r.data.tags.get("stmi.role") == "parent"}
    assert set(parents) == {"rgbnt201", "msvr310"}
    keys = mlflow_server.s3.list_keys()
    for dataset, parent in parents.items():
        assert parent.info.status == "FINISHED"
        children = _children(client, exp.experiment_id, parent.info.run_id)
        assert len(children) == 2, [c.info.run_name for c in children]
        for child in children:
            assert set(HPARAMS) <= set(child.data.params), sorted(child.data.params)
            assert child.info.status in ("FINISHED", "KILLED"), child.info.status  # ASHA-stopped -> KILLED
            epochs = len(client.get_metric_history(child.info.run_id, "epoch"))
            assert epochs == 2 if child.info.status == "FINISHED" else 1 <= epochs < 2
        recipe_point = {"model.K": 2.0, "model.tau": 0.5, "model.p": 0.1, "model.alpha_init": 0.1, "optim.lr": 3e-4}
        assert any(all(abs(float(c.data.params[k]) - v) < 1e-12 for k, v in recipe_point.items()) for c in children), \
            "the recipe's (paper's) values were not among the evaluated points"
        artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
        assert {"optuna", "summary", "search_space"} <= artifacts
        optuna_files = {f.path for f in client.list_artifacts(parent.info.run_id, "optuna")}
        assert "optuna/optimization_history.png" in optuna_files
        assert parent.data.params["best.trial_id"] in {c.data.tags["stmi.trial_id"] for c in children}
        mv = client.get_model_version_by_alias(f"stmi-{dataset}", "champion")
        assert mv.run_id == parent.info.run_id
        model_keys = [k for k in keys if "/mlflow/" in k and mv.source.split("/")[-1] in k]
        assert any(k.endswith("MLmodel") for k in model_keys), "registered model's files are not in the bucket"
        assert any(k.endswith("checkpoint/best.pt") or k.endswith("best.pt") for k in model_keys)
        # what a reviewer reads: the version's tags and description, the parent's note, the report
        trial = client.get_run(mv.tags["stmi.trained_run"])
        assert trial.info.run_id == parent.data.params["best.run_id"]
        assert float(mv.tags["metric.best_val_mAP"]) == trial.data.metrics["best_val_mAP"]
        assert float(mv.tags["metric.test_mAP"]) == trial.data.metrics["test_mAP"]
        assert mv.tags["stmi.data.fingerprint.train"] == trial.data.tags["stmi.data.fingerprint.train"]
        assert mv.tags["stmi.code.source_hash"] == trial.data.tags["stmi.code.source_hash"]
        assert mv.tags["stmi.sweep"] == "e2e" and mv.tags["stmi.trial"] == parent.data.params["best.trial_id"]
        assert f"--rerun {trial.info.run_id}" in mv.description
        note = parent.data.tags["mlflow.note.content"]
        assert "orchestration/sweep.py" in note and "demo.yaml" in note and parent.data.params["best.trial_id"] in note
        assert {"report/report.md", "report/report.html"} <= \
            {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"


def _cli(ray_cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ray_cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "ray"), "job", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_resume_after_the_sweep_driver_is_killed(ray_cluster, mlflow_server, data_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    args = ("python", SWEEP, "--datasets", "rgbnt201", "--num-samples", "3", "--max-epochs", "2",
            "--max-concurrent", "1", "--confirm-top", "0", "--data-root", str(data_root), "--name", "resume")
    sub = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--submission-id", "sweep-resume-1",
               "--no-wait", "--", *args)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    client = MlflowClient(mlflow_server.tracking_uri)
    deadline = time.time() + 600
    finished_before: set[str] = set()
    while time.time() < deadline and not finished_before:
        time.sleep(2)
        exp = client.get_experiment_by_name("stmi-resume")
        if exp is None:
            continue
        finished_before = {r.data.tags["stmi.trial_id"] for r in client.search_runs([exp.experiment_id])
                           if r.data.tags.get("stmi.trial_id") and r.info.status == "FINISHED"}
    assert finished_before, "no trial finished before the deadline"
    stop = _cli(ray_cluster, "stop", "--address", ray_cluster.dashboard_url, "sweep-resume-1")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    # `ray job stop` (SIGTERM): the runs in progress end KILLED, the parent tagged with how to continue
    exp = client.get_experiment_by_name("stmi-resume")
    stopped = client.search_runs([exp.experiment_id])
    parent = next(r for r in stopped if r.data.tags.get("stmi.role") == "parent")
    assert parent.info.status == "KILLED", parent.info.status
    assert parent.data.tags["stmi.resume_command"].startswith("ray job submit -- python orchestration/sweep.py ")
    resume_cmd = parent.data.tags["stmi.resume_command"]
    assert "--name resume" in resume_cmd and "--resume" in resume_cmd
    # (its trials still RUNNING are ended in the same handler when Ray's 3 s stop window allows; the resumed sweep
    # ends every one of them FINISHED or KILLED, checked below)

    rerun = ray_cluster.submit(*args, "--resume", timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-5000:] + rerun.stderr[-3000:]
    exp = client.get_experiment_by_name("stmi-resume")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stmi.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("stmi.trial_id")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_ids = [c.data.tags["stmi.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 3, trial_ids  # no MLflow run duplicated
    for c in children:
        assert c.info.status in ("FINISHED", "KILLED")
        if c.data.tags["stmi.trial_id"] in finished_before:
            assert c.data.tags["stmi.driver_starts"] == "1", "a finished trial was run again"
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "epoch")]
        assert len(steps) == len(set(steps)), steps
    assert client.get_model_version_by_alias("stmi-rgbnt201", "champion") is not None
