"""Selection over seeds on tiny real sweeps (`ray job submit` against the test servers, 1 epoch a trial): a grid
with `--seeds 2`, and an Optuna search whose 2 best configurations are confirmed with 2 new seeds. What is
checked is read back from MLflow: the runs' seeds and tags, the grouping, the champion = the best MEAN validation mAP
computed here from the runs, and the parent's mean and std equal to those of the runs; the confirmation's driver
SIGKILLed and the sweep resumed; `ray job stop` of a sweep.
"""

from __future__ import annotations

import json
import os
import statistics
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
BASE_SEED = 1111  # the demo recipe's optim.seed


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seedsdata")
    make_synthetic("rgbnt201", root, ids=12, seed=3, images_per_id=6)
    return root


def _sweep_runs(client, name: str):  # noqa: ANN001, ANN202
    exp = client.get_experiment_by_name(f"stmi-{name}")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("stmi.role") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return exp, parent, children


def _check_champion(client, parent, groups: dict[str, list]) -> str:  # noqa: ANN001
    """The parent's champion is the group with the best mean validation mAP (computed here from the runs), its mean
    and std are the runs', and the registered weights are that group's best run on validation. Returns its label."""
    val = {k: [r.data.metrics["best_val_mAP"] for r in rs] for k, rs in groups.items()}
    label = max(val, key=lambda k: statistics.fmean(val[k]))
    m = parent.data.metrics
    assert m["champion.best_val_mAP_mean"] == pytest.approx(statistics.fmean(val[label]))
    assert m["champion.best_val_mAP_std"] == pytest.approx(statistics.stdev(val[label]))
    tests = [r.data.metrics["test_mAP"] for r in groups[label]]
    assert m["champion.test_mAP_mean"] == pytest.approx(statistics.fmean(tests)) and m["champion.n"] == 2
    for k, v in val.items():
        assert m[f"config.{k}.best_val_mAP_mean"] == pytest.approx(statistics.fmean(v))
    best_run = max(groups[label], key=lambda r: r.data.metrics["best_val_mAP"])
    assert parent.data.params["best.run_id"] == best_run.info.run_id
    mv = client.get_model_version_by_alias("stmi-rgbnt201", "champion")
    assert mv.run_id == parent.info.run_id and mv.tags["stmi.trained_run"] == best_run.info.run_id
    assert mv.tags["stmi.seed"] == best_run.data.tags["stmi.seed"] and "MEAN best_val_mAP over 2 seed(s)" in \
        mv.description
    note = parent.data.tags["mlflow.note.content"]
    assert f"| {label} **(champion)** | 2 |" in note and f"{statistics.fmean(val[label]):.4f} ± " in note
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/configurations.json", "summary/configurations.csv", "summary/trials.csv"} <= files
    return label


def _report(client, parent, tmp_path: Path) -> dict:  # noqa: ANN001
    local = client.download_artifacts(parent.info.run_id, "report/report.json", str(tmp_path))
    return json.loads(Path(local).read_text())["tables"]


def test_grid_runs_every_variant_with_every_seed_and_leaks_no_secret(ray_cluster, mlflow_server, data_root: Path,
                                                                     tmp_path: Path) -> None:
    """A grid with --seeds 2; afterwards the security checks of tests/test_faults.py (no secret in any file or Ray
    answer, every Ray listener on loopback, SeaweedFS's own APIs closed), which need a sweep to have run."""
    from mlflow.tracking import MlflowClient

    from tests.test_faults import check_no_secret_anywhere_and_nothing_open

    space = tmp_path / "two.yaml"
    space.write_text("kind: grid\nvariants:\n  slow: {optim.lr: 1.0e-4}\n  fast: {optim.lr: 2.0e-3}\n")
    proc = ray_cluster.submit("python", SWEEP, "--datasets", "rgbnt201", "--search-space", str(space), "--seeds",
                              "2", "--max-epochs", "1", "--data-root", str(data_root), "--name", "seeds-grid",
                              timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "2 variants x seeds 1111, 1112" in proc.stdout
    client = MlflowClient(mlflow_server.tracking_uri)
    _, parent, children = _sweep_runs(client, "seeds-grid")
    assert parent.info.status == "FINISHED" and len(children) == 4, [c.info.run_name for c in children]
    groups: dict[str, list] = {}
    for c in children:
        assert c.info.status == "FINISHED"  # a grid runs without ASHA: every seed trains its full budget
        seed = c.data.params["optim.seed"]
        assert c.data.tags["stmi.seed"] == seed and c.info.run_name == f"rgbnt201-{c.data.tags['stmi.variant']}-s{seed}"
        groups.setdefault(c.data.tags["stmi.variant"], []).append(c)
    assert {k: sorted(r.data.params["optim.seed"] for r in rs) for k, rs in groups.items()} == \
        {"slow": [str(BASE_SEED), str(BASE_SEED + 1)], "fast": [str(BASE_SEED), str(BASE_SEED + 1)]}
    label = _check_champion(client, parent, groups)
    assert parent.data.params["best.variant"] == label
    report = _report(client, parent, tmp_path)["rgbnt201/champion"]["numbers"]["champion"]
    assert report["label"] == label and report["seeds"] == [str(BASE_SEED), str(BASE_SEED + 1)]
    assert report["test_mAP"]["mean"] == pytest.approx(parent.data.metrics["champion.test_mAP_mean"])

    check_no_secret_anywhere_and_nothing_open(mlflow_server, proc)


def _cli(ray_cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    env = {**os.environ, **ray_cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "ray"), "job", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _confirm_runs(client, status: str) -> dict[str, str]:  # noqa: ANN001
    """The confirmation runs of the sweep in ``status``: trial id -> stmi.driver_starts."""
    exp = client.get_experiment_by_name("stmi-seeds-confirm")
    if exp is None:
        return {}
    return {r.data.tags["stmi.trial_id"]: r.data.tags.get("stmi.driver_starts", "")
            for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("stmi.confirm_of") and r.info.status == status}


def _wait_for_new_finished_confirmation(client, known: set[str], timeout: float = 900) -> dict[str, str]:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(2)
        done = _confirm_runs(client, "FINISHED")
        if set(done) - known:
            return done
    raise AssertionError(f"no confirmation run finished in {timeout} s (finished before: {sorted(known)})")


def test_optuna_top_configurations_are_confirmed_over_new_seeds_and_resumed(ray_cluster, mlflow_server,
                                                                            data_root: Path, tmp_path: Path) -> None:
    """2 search trials of 1 epoch, both confirmed with 2 new seeds, two trials at a time.

    The sweep's driver is SIGKILLed once a confirmation run has finished, Tune saving its experiment state only when
    an experiment starts or ends (``TUNE_GLOBAL_CHECKPOINT_S``): Tune's state then says that trial has not finished,
    as it does on a cluster whenever a driver dies between a trial's end and Tune's next save. The resume: the runs
    the dead driver left RUNNING are marked KILLED and reopened; the trial Tune restarts although it had finished
    reports its result again and trains nothing; an interrupted trial is trained again and ends FINISHED with its
    epoch logged once; no MLflow run is duplicated and no finished one trained again. (A trial resumed half-way from
    its Train checkpoint: tests/test_train_ray.py, the killed worker.)
    """
    import signal

    from mlflow.tracking import MlflowClient

    args = ("python", SWEEP, "--datasets", "rgbnt201", "--num-samples", "2", "--max-epochs", "1", "--confirm-top",
            "2", "--seeds", "2", "--max-concurrent", "2", "--data-root", str(data_root), "--name", "seeds-confirm")
    env_json = json.dumps({"env_vars": {"TUNE_GLOBAL_CHECKPOINT_S": "3600"}})
    sub = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--submission-id", "seeds-confirm-1",
               "--runtime-env-json", env_json, "--no-wait", "--", *args)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    client = MlflowClient(mlflow_server.tracking_uri)
    t0 = time.time()
    finished = _wait_for_new_finished_confirmation(client, set())
    print(f"{time.time() - t0:.0f} s: confirmation run(s) {sorted(finished)} finished; SIGKILL")
    _, parent, _ = _sweep_runs(client, "seeds-confirm")
    pid = int(parent.data.tags["stmi.driver.pid"])
    assert "sweep.py" in Path(f"/proc/{pid}/cmdline").read_text(), "the parent's driver pid is not the sweep's"
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 120
    while time.time() < deadline:  # Ray sees its job's driver gone
        status = _cli(ray_cluster, "status", "--address", ray_cluster.dashboard_url, "seeds-confirm-1")
        if "Job 'seeds-confirm-1' failed" in status.stdout + status.stderr:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the killed sweep's job is not FAILED: {status.stdout + status.stderr}")
    assert _sweep_runs(client, "seeds-confirm")[1].info.status == "RUNNING"  # nobody could end it
    print(f"{time.time() - t0:.0f} s: the job is FAILED; resuming")

    proc = ray_cluster.submit(*args, "--resume", timeout=900)
    print(f"{time.time() - t0:.0f} s: the resume ended")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "resuming the Tune experiment" in proc.stdout and "rgbnt201-confirm" in proc.stdout
    assert f"run {parent.info.run_id}" in proc.stdout and "marked KILLED" in proc.stdout, proc.stdout[-3000:]
    assert "nothing is retrained" in proc.stdout, proc.stdout[-5000:]
    assert _confirm_runs(client, "FINISHED").items() >= finished.items(), \
        "a finished confirmation run was trained again"

    _, parent, children = _sweep_runs(client, "seeds-confirm")
    assert parent.info.status == "FINISHED"
    trial_ids = [c.data.tags["stmi.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 6, trial_ids  # no MLflow run duplicated by the resume
    search = {c.data.tags["stmi.trial_id"]: c for c in children if not c.data.tags.get("stmi.confirm_of")}
    confirm = [c for c in children if c.data.tags.get("stmi.confirm_of")]
    assert len(search) == 2 and len(confirm) == 4, [c.info.run_name for c in children]
    assert all(c.data.tags["stmi.driver_starts"] == "1" for c in search.values()), "a search trial was run again"
    for c in search.values():
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "epoch")]
        assert c.info.status == "FINISHED" and steps == [0], (c.info.status, steps)
    groups: dict[str, list] = {}
    for c in confirm:
        of = c.data.tags["stmi.confirm_of"]
        assert of in search and c.data.tags["stmi.role"] == "confirm" and c.info.status == "FINISHED"
        # the confirmed configuration, with a seed other than the search's
        assert {k: c.data.params[k] for k in HPARAMS} == {k: search[of].data.params[k] for k in HPARAMS}
        assert search[of].data.params["optim.seed"] == str(BASE_SEED)
        assert c.data.tags["stmi.seed"] == c.data.params["optim.seed"] and c.info.run_name.startswith(f"rgbnt201-{of}")
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "epoch")]
        assert steps == [0], steps  # logged once, also by a trial trained again after the kill
        groups.setdefault(of, []).append(c)
    assert {k: sorted(r.data.params["optim.seed"] for r in rs) for k, rs in groups.items()} == \
        {k: [str(BASE_SEED + 1), str(BASE_SEED + 2)] for k in search}
    label = _check_champion(client, parent, groups)
    assert parent.data.params["best.confirm_of"] == label
    # the report agrees: the champion is the confirmed configuration, averaged over its confirmation seeds only
    report = _report(client, parent, tmp_path)["rgbnt201/champion"]["numbers"]["champion"]
    assert report["seeds"] == [str(BASE_SEED + 1), str(BASE_SEED + 2)]
    assert report["val_mAP"] == pytest.approx(parent.data.metrics["champion.best_val_mAP_mean"])


def test_ray_job_stop_ends_the_sweep_killed_with_how_to_resume(ray_cluster, mlflow_server, data_root: Path) -> None:
    """`ray job stop` (SIGTERM) while a trial trains: Tune unwinds, then the parent and the trial run end KILLED and
    the parent says how to continue (the resume itself: the test above)."""
    from mlflow.tracking import MlflowClient

    from orchestration import tracking

    args = ("python", SWEEP, "--datasets", "rgbnt201", "--num-samples", "1", "--max-epochs", "3", "--confirm-top",
            "0", "--data-root", str(data_root), "--name", "seeds-stop")
    sub = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--submission-id", "seeds-stop-1",
               "--no-wait", "--", *args)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    client = MlflowClient(mlflow_server.tracking_uri)
    deadline = time.time() + 600
    while time.time() < deadline:  # until the trial's workers train (they log the resolved config first)
        time.sleep(1)
        exp = client.get_experiment_by_name("stmi-seeds-stop")
        trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stmi.trial_id")] if exp else []
        if trials and "train.world_size" in trials[0].data.params:
            break
    else:
        raise AssertionError("the sweep's trial never started training: "
                             + _cli(ray_cluster, "logs", "--address", ray_cluster.dashboard_url,
                                    "seeds-stop-1").stdout[-3000:])
    stop = _cli(ray_cluster, "stop", "--address", ray_cluster.dashboard_url, "seeds-stop-1")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    _, parent, children = _sweep_runs(client, "seeds-stop")
    assert parent.info.status == "KILLED", parent.info.status
    resume_cmd = parent.data.tags[tracking.RESUME_TAG]
    assert resume_cmd.startswith("ray job submit -- python orchestration/sweep.py ") and \
        "--name seeds-stop" in resume_cmd and "--resume" in resume_cmd, resume_cmd
    assert [c.info.status for c in children] == ["KILLED"], [(c.info.run_name, c.info.status) for c in children]
