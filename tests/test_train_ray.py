"""Training on Ray Train with real servers on loopback: DDP, MLflow from rank 0, checkpoints on S3, worker failure.

Each test runs ``python -m orchestration.train`` against the test Ray head (``RAY_ADDRESS``) exactly as a user's
``ray job submit`` would, then reads MLflow and S3 back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from stmi.data.synth import make_synthetic
from stmi.recipes import recipe

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic("rgbnt201", tmp_path_factory.mktemp("synth201"), ids=20, seed=3, images_per_id=10,
                          difficulty="easy")  # asserts learning in 4 epochs: the hard benchmark needs more


def _train_cmd(name: str, root: Path, epochs: int, workers: int = 2, experiment: str = "stmi-train-test") -> list[str]:
    return [sys.executable, "-m", "orchestration.train", "--dataset", "rgbnt201", "--data-root", str(root),
            "--recipe", "demo", "--workers", str(workers), "--cpus-per-worker", "0.9", "--epochs", str(epochs),
            "--name", name, "--experiment", experiment, "--max-failures", "2"]


def _env(ray_cluster) -> dict[str, str]:
    return {**os.environ, **ray_cluster.env, "PYTHONUNBUFFERED": "1"}


def _run_for(client, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`stmi.run_key` = 'train/{name}'")
    assert len(runs) == 1, f"expected exactly one MLflow run for {name}, found {len(runs)}"
    return runs[0]


def test_ddp_training_logs_to_mlflow_and_s3(ray_cluster, mlflow_server, synth_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    proc = subprocess.run([*_train_cmd("ddp-ok", synth_root, epochs=4), "--missing", "all"], env=_env(ray_cluster),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(mlflow_server.tracking_uri)
    run = _run_for(client, "stmi-train-test", "ddp-ok")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.clip_model"] == recipe("demo", "rgbnt201").model.clip_model
    assert params["train.world_size"] == "2"
    assert params["optim.epochs"] == "4" and params["data.dataset"] == "rgbnt201"
    for metric in ("epoch", "train_loss", "train_G_tri", "train_U_ce", "train_T_ce", "train_lr", "val_mAP", "val_R1"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [0, 1, 2, 3], (metric, steps)
    m = run.data.metrics
    for key in ("test_mAP", "test_R1", "test_R5", "test_R10", "untrained_val_mAP"):
        assert 0.0 <= m[key] <= 1.0
    assert m["best_val_mAP"] >= m["untrained_val_mAP"] + 0.1, m  # learnt: well above the untrained model
    assert any(k.startswith("system/") for k in m), "system metrics were not logged"
    # --missing all: the final test also ran TOP-ReID's six settings and MDReID's 49, logged as metrics and a table
    assert params["eval.missing"] == "all"
    missing = {k for k in m if k.startswith("test_missing/")}
    assert len(missing) == (6 + 1 + 49) * 5, len(missing)
    assert m["test_missing/any2any/RNT_to_RNT/mAP"] == pytest.approx(m["test_mAP"], abs=1e-6)  # the complete test
    assert m["test_missing/topreid/NT/mAP"] == m["test_missing/any2any/NT_to_NT/mAP"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/missing_modalities.json",
                                                      str(synth_root.parent))).read_text())
    assert len(table["data"]) == 56 and table["columns"][:5] == ["protocol", "setting", "miss", "query", "gallery"]

    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "plots", "checkpoints"} <= artifacts
    keys = mlflow_server.s3.list_keys()
    run_keys = [k for k in keys if run.info.run_id in k]
    assert any(k.endswith("checkpoints/best.pt") for k in run_keys), run_keys
    assert any(k.endswith("plots/cmc_curve.png") for k in run_keys)
    assert any(k.endswith("plots/retrieval_top10.png") for k in run_keys)
    assert any("/ray/ddp-ok/" in k and k.endswith("state.pt") for k in keys), "no Ray checkpoint in S3"
    secret = mlflow_server.s3.secret_key
    assert secret not in str(params) and secret not in str(run.data.tags) and secret not in proc.stdout + proc.stderr
    # The run started no Ray Data manager (orchestration.train.trainer_class) and no preemption watcher (off on the
    # local stack: RayHead.extra_env); Ray's state API lists every actor the cluster ever had.
    classes = _actor_classes(ray_cluster)
    assert {"TrainController", "RayTrainWorker"} <= classes, classes
    assert not classes & {"DatasetManager", "PreemptionWatcher"}, classes


def _actor_classes(ray_cluster) -> set[str]:  # noqa: ANN001
    token = Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(f"{ray_cluster.dashboard_url}/api/v0/actors?limit=10000",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return {a["class_name"] for a in json.load(r)["data"]["result"]["result"]}


def test_trainer_leaves_out_only_ray_data_when_given_no_datasets() -> None:
    """``trainer_class`` overrides a private method of Ray's trainer: its callbacks are Ray's own list minus the
    datasets callback, and the whole list when datasets are given (a Ray upgrade that changes it fails here)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    from orchestration.train import trainer_class

    def kinds(cls: type, **kw: object) -> list[str]:
        t = cls(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), **kw)
        return [type(c).__name__ for c in t._create_default_callbacks()]

    ours, ray_own = kinds(trainer_class()), kinds(TorchTrainer)
    assert DatasetsCallback.__name__ in ray_own and DatasetsCallback.__name__ not in ours
    assert ours == [k for k in ray_own if k != DatasetsCallback.__name__]
    datasets = {"train": object()}
    assert kinds(trainer_class(), datasets=datasets) == kinds(TorchTrainer, datasets=datasets)


def _train_workers(temp_dir: Path) -> list[psutil.Process]:
    """The RayTrainWorker processes of the test cluster (not of any other Ray on the machine)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "RayTrainWorker" not in cmd:
                continue
            if any(str(temp_dir) in " ".join(a.cmdline()) for a in p.parents() if "raylet" in " ".join(a.cmdline())):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_killed_worker_resumes_from_checkpoint_without_duplicate_or_missing_epochs(
        ray_cluster, mlflow_server, synth_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    epochs = 6
    proc = subprocess.Popen(_train_cmd("ddp-kill", synth_root, epochs=epochs), env=_env(ray_cluster), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(mlflow_server.tracking_uri)
    killed = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed is None and proc.poll() is None:
            time.sleep(1)
            exp = client.get_experiment_by_name("stmi-train-test")
            runs = client.search_runs([exp.experiment_id], "tags.`stmi.run_key` = 'train/ddp-kill'") if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "epoch")) >= 2:
                workers = _train_workers(ray_cluster.temp_dir)
                assert workers, "no RayTrainWorker process found to kill"
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        assert killed is not None, "the run never reached epoch 2"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    run = _run_for(client, "stmi-train-test", "ddp-kill")
    assert run.info.status == "FINISHED"
    assert "stmi.resumed_from_epoch" in run.data.tags, "the run did not restart from a checkpoint"
    for metric in ("epoch", "train_loss", "val_mAP"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(epochs)), (metric, steps)  # no duplicate, no missing step
    assert "test_mAP" in run.data.metrics


def _job_cli(ray_cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real ``ray job`` CLI against the test cluster (retried when the job server drops the connection, as
    it does on a saturated machine)."""
    env = {**_env(ray_cluster), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(3):
        proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", args[0], "--address",
                               ray_cluster.dashboard_url, *args[1:]], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode == 0 or "ConnectionError" not in proc.stderr:
            return proc
        time.sleep(5)
    return proc


def test_bad_data_root_fails_before_any_run_is_created(ray_cluster, mlflow_server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    missing = tmp_path / "no-such-folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    jobs = [("orchestration/train.py", missing, "does not exist"),
            ("orchestration/train.py", empty, f"missing folder {empty / 'RGBNT201'}"),
            ("orchestration/sweep.py", missing, "does not exist")]
    for script, root, fragment in jobs:
        # As the job would run it (the check comes before Ray is touched, so no job server is needed for it).
        proc = subprocess.run([sys.executable, str(REPO / script), "--data-root", str(root), "--name", "bad-root",
                               "--experiment" if script.endswith("train.py") else "--datasets",
                               "stmi-bad-root" if script.endswith("train.py") else "rgbnt201"],
                              env=_env(ray_cluster), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
        assert errors and f"--data-root {root}" in errors[-1] and fragment in errors[-1], out[-3000:]
    # neither the train experiment nor the sweep's (stmi-<name>) was created: nothing started
    assert MlflowClient(mlflow_server.tracking_uri).get_experiment_by_name("stmi-bad-root") is None


def test_ray_job_stop_ends_the_run_killed_with_how_to_resume(ray_cluster, mlflow_server, synth_root: Path) -> None:
    """`ray job stop` ends the run KILLED, with the command that resumes it in a tag and in the job's log.

    That the command resumes the run from its last checkpoint and completes it, every epoch logged once:
    tests/test_faults.py (`make down` mid-run, which stops the job the same way, then runs the tag's command).
    """
    from mlflow.tracking import MlflowClient

    epochs, name = 4, "ddp-stop"
    cmd = _train_cmd(name, synth_root, epochs=epochs, workers=1)[1:]  # without sys.executable: the job's python
    sub = _job_cli(ray_cluster, "submit", "--submission-id", "train-stop-1", "--no-wait", "--", "python", *cmd)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    client = MlflowClient(mlflow_server.tracking_uri)
    deadline = time.time() + 400
    while time.time() < deadline:
        time.sleep(1)
        exp = client.get_experiment_by_name("stmi-train-test")
        runs = client.search_runs([exp.experiment_id], f"tags.`stmi.run_key` = 'train/{name}'") if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "epoch"):
            break
    else:
        pytest.fail("the run never logged an epoch: " + _job_cli(ray_cluster, "logs", "train-stop-1").stdout[-3000:])
    stop = _job_cli(ray_cluster, "stop", "train-stop-1", timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    run = _run_for(client, "stmi-train-test", name)
    assert run.info.status == "KILLED", run.info.status
    resume = run.data.tags["stmi.resume_command"]
    assert resume.startswith("ray job submit -- python orchestration/train.py ") and f"--name {name}" in resume
    logs = _job_cli(ray_cluster, "logs", "train-stop-1")
    assert "ended KILLED; continue with: ray job submit" in logs.stdout, logs.stdout[-2000:]
    assert len(client.get_metric_history(run.info.run_id, "epoch")) < epochs  # stopped, not finished


def _failure_decisions(temp_dir: Path, run_name: str) -> list[str]:
    """The Ray Train controller's failure-policy decisions (``RETRY`` / ``RAISE`` lines) for one run."""
    import json

    out = []
    for path in (temp_dir / "session_latest" / "logs" / "train").glob("ray-train-*-controller-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("run_name") == run_name and str(rec.get("message", "")).startswith("[FailurePolicy]"):
                out.append(rec["message"].splitlines()[0])
    return out


def test_dataset_error_in_a_worker_is_not_retried(ray_cluster, mlflow_server, synth_root: Path,
                                                  tmp_path: Path) -> None:
    import shutil

    from mlflow.tracking import MlflowClient

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    bad = sorted((root / "RGBNT201" / "train_171" / "NI").glob("*.jpg"))[0]
    bad.write_bytes(b"")  # a zero-byte image: the dataset reader raises DatasetError naming it, in every worker
    name = "bad-data"
    proc = subprocess.run(_train_cmd(name, root, 2), env=_env(ray_cluster), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()][-1]
    assert last.startswith("error: the run failed: rank ") and str(bad) in last and "zero-byte" in last, last
    decisions = _failure_decisions(ray_cluster.temp_dir, name)
    assert decisions and not [d for d in decisions if "RETRY" in d], decisions  # --max-failures 2, yet no retry
    run = _run_for(MlflowClient(mlflow_server.tracking_uri), "stmi-train-test", name)
    assert run.info.status == "FAILED"


def _upload_dir(dst: Path) -> Path:
    """What ``ray job submit --working-dir`` ships of a checkout: its sources, no ``.git``."""
    import shutil

    from stmi.provenance import SOURCE_DIRS

    for d in SOURCE_DIRS:
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


@pytest.mark.timeout(1500)
def test_provenance_on_a_working_dir_job_and_a_deterministic_rerun(ray_cluster, mlflow_server, synth_root: Path,
                                                                 tmp_path: Path) -> None:
    """A run submitted with ``--working-dir`` (no .git) records the upload's content hash, library and device facts
    and its data as dataset inputs; ``--rerun`` of it in deterministic mode gives the same metrics; a bad
    ``--rerun`` (unknown id, moved data) is one clear line."""
    import json

    from mlflow.tracking import MlflowClient

    from stmi.data import load_dataset
    from stmi.data.fingerprint import fingerprint_dataset
    from stmi.provenance import source_hash

    upload = _upload_dir(tmp_path / "upload")
    args = ["python", "-m", "orchestration.train", "--dataset", "rgbnt201", "--data-root", str(synth_root),
            "--recipe", "demo", "--workers", "1", "--cpus-per-worker", "0.9", "--epochs", "1",
            "--experiment", "stmi-rerun-test", "--set", "optim.deterministic=true", "--set", "data.num_workers=1"]
    first = ray_cluster.submit(*args, "--name", "det-a", extra_args=("--working-dir", str(upload)), timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    client = MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name("stmi-rerun-test")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"  # the UI opens on the runs
    a = _run_for(client, "stmi-rerun-test", "det-a")
    tags = a.data.tags
    assert tags["stmi.code.source_hash"] == source_hash(upload) and "stmi.code.git_commit" not in tags
    assert tags["stmi.code.version"].startswith("src:") and tags["mlflow.source.name"] == "orchestration/train.py"
    assert tags["stmi.device.world_size"] == "1" and tags["stmi.version.torch"] not in ("", "missing")
    current = fingerprint_dataset(load_dataset("rgbnt201", synth_root))
    inputs = {i.tags[0].value: i.dataset for i in a.inputs.dataset_inputs}
    assert set(inputs) == {"train", "query", "gallery"}
    for split, fp in current.items():
        assert inputs[split].digest == fp.digest == tags[f"stmi.data.fingerprint.{split}"]
        assert str(synth_root) in inputs[split].source

    second = ray_cluster.submit("python", "orchestration/train.py", "--rerun", a.info.run_id, "--name", "det-b",
                                "--experiment", "stmi-rerun-test", timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert "same code version and data fingerprints" in second.stdout
    b = _run_for(client, "stmi-rerun-test", "det-b")
    assert b.data.tags["stmi.rerun_of"] == a.info.run_id
    assert b.data.params["optim.deterministic"] == "True" and b.data.params["optim.epochs"] == "1"
    for metric in ("val_mAP", "train_loss", "test_mAP", "test_R1", "untrained_val_mAP"):
        ha = [(m.step, m.value) for m in client.get_metric_history(a.info.run_id, metric)]
        hb = [(m.step, m.value) for m in client.get_metric_history(b.info.run_id, metric)]
        assert ha and sorted(ha) == sorted(hb), (metric, ha, hb)

    env = _env(ray_cluster)
    t0 = time.monotonic()
    bad = subprocess.run([sys.executable, "-m", "orchestration.train", "--rerun", "0123456789abcdef"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and time.monotonic() - t0 < 60
    assert bad.stderr.strip().count("\n") == 0 and "no MLflow run '0123456789abcdef'" in bad.stderr

    # a run whose data moved: its config names a folder that is not there any more
    cfg = json.loads(Path(client.download_artifacts(a.info.run_id, "config.json", str(tmp_path))).read_text())
    cfg["data"]["root"] = str(tmp_path / "moved-away")
    moved = client.create_run(exp.experiment_id, run_name="moved", tags={
        k: v for k, v in tags.items() if k.startswith(("stmi.code.", "stmi.data."))})
    client.log_dict(moved.info.run_id, cfg, "config.json")
    client.set_terminated(moved.info.run_id)
    gone = subprocess.run([sys.executable, "-m", "orchestration.train", "--rerun", moved.info.run_id], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert gone.returncode == 2 and gone.stderr.strip().count("\n") == 0, gone.stderr
    assert "moved-away" in gone.stderr and "--data-root" in gone.stderr
