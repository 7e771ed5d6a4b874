"""``make demo``: the stack up, the demo sweep submitted with ``ray job submit``, and a report.

The report says where to look (MLflow UI), what won (per dataset the registered trial with its metrics, the
champion configuration's mean ± std over its seeds when the sweep compared seeds, the registered version) and how
to use it: the exact ``mlflow models serve`` and ``curl`` commands, with a request file built from a real query
triplet of the demo data, written under ``<state dir>/demo/``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from infra.local.stack import REPO_ROOT, LocalStack, StackConfig

SERVE_PORT = 5001


def _env(config: StackConfig) -> dict[str, str]:
    return {**os.environ, **config.env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run_demo(config: StackConfig, sweep_args: list[str], name: str | None = None, serve_port: int = SERVE_PORT) -> int:
    """Start the stack, run the sweep job, print the report; returns the job's exit code."""
    stack = LocalStack(config)
    with DemoData(sweep_args):  # made while the stack starts, which waits on its servers most of the time
        stack.up()
    name = name or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", config.dashboard_url, "--",
           "python", "orchestration/sweep.py", "--name", name, *sweep_args]
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd[1:])}\n", flush=True)
    rc = subprocess.call(cmd, env=_env(config), cwd=REPO_ROOT)
    if rc != 0:
        print(f"\nthe sweep job failed (exit {rc}); its log is above, Ray's logs are in {config.ray_tmp}/session_latest"
              f"/logs and the dashboard at {config.dashboard_url}", file=sys.stderr)
        return rc
    print(report(config, name, serve_port, data_root=sweep_data_root(sweep_args)), flush=True)
    return 0


class DemoData:
    """The synthetic datasets the demo sweep will read, made in a thread while the stack starts.

    Only for the demo preset without ``--data-root``, and only what is not made yet (``ensure_demo_dataset``; its
    file lock keeps the job's own check from making them twice). The job inherits this process's environment
    through the Ray head, so both use the same ``$STMI_DEMO_DATA``. A failure is raised on leaving the block.
    """

    def __init__(self, sweep_args: list[str]) -> None:
        import argparse

        from stmi.config import DATASETS

        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--preset", default="demo")
        parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
        args = parser.parse_known_args(sweep_args)[0]
        own_data = sweep_data_root(sweep_args) is not None or args.preset != "demo"
        # an unknown name is left to the sweep, whose error lists the choices
        self.datasets = [] if own_data else [d for d in args.datasets if d in DATASETS]
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def _make(self) -> None:
        from orchestration.demo_data import ensure_demo_dataset

        try:
            for dataset in self.datasets:
                ensure_demo_dataset(dataset)
        except BaseException as e:  # noqa: BLE001 - raised in the main thread by __exit__
            self.error = e

    def __enter__(self) -> DemoData:
        if self.datasets:
            from orchestration.demo_data import demo_root

            print(f"synthetic demo data for {', '.join(self.datasets)} under {demo_root()} (made on first use, "
                  "while the stack starts)", flush=True)
            self.thread = threading.Thread(target=self._make, name="demo-data", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def sweep_data_root(sweep_args: list[str]) -> Path | None:
    """The ``--data-root`` the sweep was given (``demo -- --data-root DIR``), or None: the demo datasets."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-root")
    root = parser.parse_known_args(sweep_args)[0].data_root
    return None if root is None else Path(root).expanduser().absolute()


def report(config: StackConfig, sweep_name: str, serve_port: int = SERVE_PORT, data_root: Path | None = None) -> str:
    """The end-of-demo report (reads MLflow back); the request is a query of ``data_root`` (default: demo data)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking_uri)
    exp = client.get_experiment_by_name(f"stmi-{sweep_name}")
    if exp is None:
        return f"no MLflow experiment stmi-{sweep_name} at {config.tracking_uri}"
    lines = ["", "=" * 100, f"STMI demo sweep {sweep_name!r} finished", "",
             f"MLflow UI:  {config.tracking_uri}/#/experiments/{exp.experiment_id}   (a parent run per dataset, a "
             f"child per trial; compare children with the UI's chart view)", "",
             f"{'dataset':10s} {'best trial':12s} {'val mAP':>8s} {'test mAP':>9s} {'R1':>6s} {'R5':>6s} {'R10':>6s}"
             f"  {'over seeds: val mAP, test mAP':30s}  model"]
    first_dataset = None
    runs = client.search_runs([exp.experiment_id], max_results=5000)  # the parents and their trials
    parents = [r for r in runs if r.data.tags.get("stmi.role") == "parent"]
    for parent in sorted(parents, key=lambda r: r.data.tags.get("stmi.dataset", "")):
        ds = parent.data.tags["stmi.dataset"]
        m, p = parent.data.metrics, parent.data.params
        version = parent.data.tags.get("stmi.champion_version", "?")
        scores = [_f(m.get(k)) for k in ("best_best_val_mAP", "best_test_mAP", "best_test_R1", "best_test_R5",
                                          "best_test_R10")]
        seeds = "-"  # the champion configuration's mean ± std over its seeds (a confirmation or a seeded grid)
        if "champion.best_val_mAP_mean" in m:
            seeds = (f"{_f(m['champion.best_val_mAP_mean'])}±{_f(m.get('champion.best_val_mAP_std'))}, "
                     f"{_f(m.get('champion.test_mAP_mean'))}±{_f(m.get('champion.test_mAP_std'))} "
                     f"(n={int(m.get('champion.n', 0))})")
        lines.append(f"{ds:10s} {p.get('best.trial_id', '-'):12s} {scores[0]:>8s} {scores[1]:>9s} {scores[2]:>6s} "
                     f"{scores[3]:>6s} {scores[4]:>6s}  {seeds:30s}  models:/stmi-{ds}@champion (v{version})")
        first_dataset = first_dataset or ds
    noise = DEMO_SEED_NOISE if data_root is None else {}  # measured on the demo data only
    trial_lines = _trial_lines(client, runs, parents, noise)
    if trial_lines:
        lines += ["", "Every trial by validation mAP (what the sweep ranks by; test mAP is never used to choose):",
                  *trial_lines]
        if noise:
            lines.append("Seed noise: how much the gap between two trials of this sweep moves with the training seed "
                         "they share (std over 5 seeds of the demo's two trials' difference: "
                         + ", ".join(f"{d} {v:.3f}" for d, v in sorted(noise.items()))
                         + f"; `{DEMO_NOISE_COMMAND}`). A gap of 2x that or more is the configuration; under 1x it "
                           "may be the seed.")
        else:
            lines.append("Seed noise on your data: run the sweep with `--confirm-top K --seeds N` (the K best "
                         "configurations again with N new seeds; the report gives their mean and std).")
    if first_dataset:
        request = write_request(config, first_dataset, data_root)
        venv_bin = Path(sys.executable).parent
        lines += ["", "Serve the champion and query it (in two shells):",
                  f"  source {Path(config.state_dir) / 'env'} && PATH={venv_bin}:$PATH \\",
                  f"    mlflow models serve -m models:/stmi-{first_dataset}@champion --env-manager local "
                  f"-h 127.0.0.1 -p {serve_port}",
                  f"  curl -s http://127.0.0.1:{serve_port}/invocations -H 'Content-Type: application/json' "
                  f"--data @{request}",
                  "", "The request holds one query triplet of the demo data (rgb/nir/tir/mask as base64, caption, "
                      "camera); the answer is {\"predictions\": [{\"embedding\": [...], \"modalities\": "
                      "[\"rgb\", \"nir\", \"tir\"]}]}; a row may leave out one or two of rgb, nir, tir."]
    lines += ["", "Stop everything: make down", "=" * 100]
    return "\n".join(lines)


DEMO_SEED_NOISE = {"rgbnt201": 0.058, "rgbnt100": 0.024, "msvr310": 0.040}
"""Per dataset, the seed noise of a gap between two trials of the demo sweep: the std over 5 training seeds of the
difference between the validation mAP of the demo's two trials (the recipe's point and the first Optuna draw) when
both train with the same seed, as a sweep's trials do (``DEMO_NOISE_COMMAND``, the "A - B, paired" column)."""
DEMO_NOISE_COMMAND = "python benchmarks/selection_noise.py"
"""Its defaults are the demo's data, split and budget, and its B the demo sweep's second trial."""
_SHORT = {"model.alpha_init": "alpha", "model.beta_init": "beta", "model.p": "p", "model.tau": "tau", "model.K": "K",
          "optim.lr": "lr"}


def gap_note(behind: float, noise: float | None) -> str:
    """How far a trial is behind the best, and in units of the seed noise when it is known."""
    if not noise:
        return f"  ({behind:.3f} behind)"
    return f"  ({behind:.3f} behind: {behind / noise:.1f}x the seed noise)"


def _trial_lines(client: Any, runs: list[Any], parents: list[Any], noise: dict[str, float]) -> list[str]:
    """Per dataset, its trials (of ``runs``) best first: validation mAP, epochs trained and the searched values;
    each one's gap to the best, also in units of the dataset's seed noise where ``noise`` has it."""
    out = []
    children: dict[str, list[Any]] = {}
    for run in runs:
        children.setdefault(run.data.tags.get("mlflow.parentRunId", ""), []).append(run)
    for parent in sorted(parents, key=lambda r: r.data.tags.get("stmi.dataset", "")):
        runs = [r for r in children.get(parent.info.run_id, []) if "best_val_mAP" in r.data.metrics]
        runs.sort(key=lambda r: -r.data.metrics["best_val_mAP"])
        for i, run in enumerate(runs):
            params = run.data.params
            values = " ".join(f"{short} {_g(params[k])}" for k, short in _SHORT.items() if k in params)
            epochs = len(client.get_metric_history(run.info.run_id, "epoch"))
            behind = runs[0].data.metrics["best_val_mAP"] - run.data.metrics["best_val_mAP"]
            gap = "" if i == 0 else gap_note(behind, noise.get(parent.data.tags.get("stmi.dataset", "")))
            out.append(f"  {parent.data.tags.get('stmi.dataset', '') if i == 0 else '':10s} "
                       f"{run.data.tags.get('stmi.trial_id', run.info.run_name):10s} "
                       f"{_f(run.data.metrics['best_val_mAP']):>6s}  {epochs} epoch(s)  {values}{gap}")
    return out


def _g(v: str) -> str:
    try:
        return f"{float(v):.3g}"
    except ValueError:
        return v


def write_request(config: StackConfig, dataset: str, data_root: Path | None = None) -> Path:
    """A one-row request from the first query triplet of the dataset under ``data_root`` (the folder holding
    RGBNT201/, ...: the sweep's ``--data-root``) or, by default, of the demo dataset (real files, base64)."""
    from orchestration.demo_data import demo_root
    from stmi.data.layouts import read_split
    from stmi.data.triplet_dataset import load_frames

    records = read_split(dataset, data_root if data_root is not None else demo_root() / dataset, "query")
    t = records[0]
    row: dict[str, Any] = {k: _b64(im) for k, im in zip(("rgb", "nir", "tir"), load_frames(t))}
    if t.mask is not None and Path(t.mask).exists():
        row["mask"] = base64.b64encode(Path(t.mask).read_bytes()).decode()
    if t.caption:
        row["caption"] = t.caption
    row["camera"] = int(t.camid)
    out = Path(config.state_dir) / "demo" / f"request-{dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"inputs": [row]}))
    return out


def _b64(im: Any) -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode()


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"
