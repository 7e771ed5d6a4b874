"""The STMI sweep: Ray Tune + Optuna (+ ASHA) over alpha/beta init, p, tau, K and lr, per dataset.

Usage (on a Ray cluster; the local stack is ``make up``)::

    ray job submit -- python orchestration/sweep.py                      # the demo: synthetic data, tiny model
    ray job submit -- python orchestration/sweep.py --preset paper --data-root /data --gpus-per-worker 1

Three levels (Ray's shape): ``train_fn_per_worker`` (``orchestration/train.py``, every DDP rank),
:func:`train_driver` (one per Tune trial: builds and fits a ``TorchTrainer``), :func:`build_tuner` (one Optuna
study per dataset). MLflow: one experiment per sweep, a parent run per dataset, a child run per trial; the best
trial of each dataset is logged as a pyfunc model and registered as ``stmi-<dataset>`` with alias ``champion``.

Names are deterministic (sweep name / dataset / trial id), so ``--resume`` after the driver was killed continues
the same Tune experiments, the same Ray Train runs (from their last checkpoints) and the same MLflow runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import logging
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestration import tracking
from orchestration.demo_data import ensure_demo_dataset
from orchestration.search_space import SearchSpace, SearchSpaceError, load_search_space
from orchestration.settings import PlatformSettings, SettingsError
from orchestration.train import (
    EXPORT_DIR,
    EXPORT_FILE,
    MISSING_CHOICES,
    StopHandler,
    check_data_root,
    failure_message,
    fit,
)
from stmi.config import DATASETS, ConfigError, STMIConfig, apply_overrides, flatten, parse_assignments
from stmi.recipes import recipe

log = logging.getLogger("stmi.sweep")

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"recipe": "demo", "search_space": "demo", "num_samples": 2, "max_epochs": 3, "workers_per_trial": 1,
             "cpus_per_worker": 0.9, "gpus_per_worker": 0.0, "grace_period": 1},
    "paper": {"recipe": "paper", "search_space": "paper", "num_samples": 24, "max_epochs": None,
              "workers_per_trial": 1, "cpus_per_worker": "node", "gpus_per_worker": 1.0, "grace_period": 10},
}
"""``cpus_per_worker: "node"``: CPUs per training worker and ``data.num_workers`` from the cluster's GPU nodes
(:func:`node_loader_plan`) unless ``--cpus-per-worker`` / ``--set data.num_workers=...`` say otherwise."""
MAX_LOADER_WORKERS = 8
TRIAL_DRIVER_CPUS = 0.1
HPARAMS = ("model.alpha_init", "model.beta_init", "model.p", "model.tau", "model.K", "optim.lr")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Everything a trial needs besides its sampled values (it travels in the Tune config as ``_sweep``)."""

    name: str
    dataset: str
    recipe: str
    data_root: str
    search_space: str
    max_epochs: int
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    experiment_id: str
    parent_run_id: str
    settings: dict[str, str]
    """Non-secret platform settings (credentials stay in the cluster's environment)."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``--set`` config overrides for every trial (applied before the search space's values)."""

    @functools.cached_property
    def space(self) -> SearchSpace:
        """The search space, read once per process (the spec travels to trial processes as a dict)."""
        return load_search_space(self.search_space)

    def platform(self) -> PlatformSettings:
        """The platform settings of the sweep (credentials from this process's environment)."""
        return PlatformSettings.from_env(argparse.Namespace(**self.settings))


# --------------------------------------------------------------------------------------------------- trial level
def trial_config(spec: SweepSpec, config: dict[str, Any]) -> STMIConfig:
    """The resolved config of one trial: recipe, data root, epochs, the space's fixed values, the trial's values."""
    overrides = {"data.root": spec.data_root, "optim.epochs": spec.max_epochs, **spec.overrides,
                 **spec.space.trial_overrides(config)}
    return apply_overrides(recipe(spec.recipe, spec.dataset), overrides)


def train_driver(config: dict[str, Any]) -> None:
    """One Tune trial: build and fit a ``TorchTrainer`` whose rank 0 logs into the trial's MLflow child run."""
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = SweepSpec(**config["_sweep"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(spec, config)
    settings = spec.platform()
    cl = tracking.client(settings.tracking_uri)
    label = config.get("variant") or trial_id
    run_id = tracking.get_or_create_run(
        cl, spec.experiment_id, f"sweep/{spec.name}/{spec.dataset}/{trial_id}", f"{spec.dataset}-{label}",
        parent_run_id=spec.parent_run_id,
        tags={"stmi.sweep": spec.name, "stmi.dataset": spec.dataset, "stmi.trial_id": trial_id,
              **({"stmi.variant": config["variant"]} if config.get("variant") else {})})
    logger = tracking.RunLogger(run_id, settings.tracking_uri)
    starts = int(logger.tags().get("stmi.driver_starts", "0")) + 1
    logger.set_tags({"stmi.driver_starts": starts})  # > 1: the trial was resumed (never for finished trials)
    # The trial's own values now (visible even if it is stopped before a worker starts); the workers add the rest
    # of the resolved config, with what the data decides (num_classes, num_cameras).
    flat = flatten(cfg)
    logger.log_params({k: flat[k] for k in spec.space.trial_overrides(config)})
    try:
        fit(cfg, f"{spec.name}-{spec.dataset}-{trial_id}", settings=settings, run_id=run_id, workers=spec.workers,
            cpus_per_worker=spec.cpus_per_worker, gpus_per_worker=spec.gpus_per_worker,
            max_failures=spec.max_failures, callbacks=[TuneReportCallback()])
    except ray.train.TrainingFailedError as e:
        logger.terminate("FAILED")
        raise RuntimeError(f"trial {trial_id} failed: {failure_message(e)}") from None
    logger.terminate("FINISHED")


# --------------------------------------------------------------------------------------------------- sweep level
def build_tuner(spec: SweepSpec, num_samples: int, max_concurrent: int, grace_period: int, seed: int,
                resume: bool) -> Any:
    """The Tune experiment of one dataset: Optuna (or a grid) + ASHA on the validation metric."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    ss = spec.space
    settings = spec.platform()
    trainable = ray.tune.with_resources(train_driver, {"CPU": TRIAL_DRIVER_CPUS})
    storage_path = f"{settings.ray_storage_path}/sweeps/{spec.name}"
    fs = settings.storage_filesystem()
    exp_path = f"{storage_path}/{spec.dataset}"
    param_space: dict[str, Any] = {"_sweep": dataclasses.asdict(spec)}
    if resume and ray.tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        print(f"[{spec.dataset}] resuming the Tune experiment at s3://{exp_path}", flush=True)
        return ray.tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                      param_space=param_space, storage_filesystem=fs)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.max_epochs,
                              grace_period=min(grace_period, spec.max_epochs), reduction_factor=2)
    if ss.kind == "grid":
        param_space["variant"] = ray.tune.grid_search(list(ss.variants))
        search_alg = None
        num_samples = 1
    else:
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        start = ss.start or [_recipe_point(spec, ss)]
        search_alg = OptunaSearch(space=ss.optuna_distributions(), metric=ss.metric, mode=ss.mode,
                                  points_to_evaluate=start, sampler=TPESampler(seed=seed),
                                  study_name=f"{spec.name}-{spec.dataset}")
    reporter = ray.tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "loss", "val_mAP": "val mAP", "best_val_mAP": "best val mAP"},
        parameter_columns={k: k.split(".")[-1] for k in ss.params} if ss.kind == "optuna" else ["variant"],
        max_report_frequency=30, sort_by_metric=True)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(metric=ss.metric, mode=ss.mode, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                        trial_dirname_creator=lambda t: t.trial_id),
        run_config=ray.tune.RunConfig(name=spec.dataset, storage_path=storage_path, storage_filesystem=fs,
                                      failure_config=ray.tune.FailureConfig(max_failures=1),
                                      progress_reporter=reporter),
    )


def _recipe_point(spec: SweepSpec, ss: Any) -> dict[str, Any]:
    """The recipe's own values of the searched fields (the paper's values for the six hyperparameters)."""
    flat = flatten(recipe(spec.recipe, spec.dataset))
    point = {}
    for name, p in ss.params.items():
        v = flat[name]
        if p.type != "choice":
            v = min(max(v, p.low), p.high)
        point[name] = v
    return point


def node_loader_plan(nodes: list[dict[str, float]], gpus_per_worker: float) -> tuple[float, int]:
    """``(CPUs per training worker, loader workers)`` that use a GPU node's CPUs: each training worker gets its
    share of the node's CPUs (the node's CPUs over the workers its GPUs hold, less the trial driver's share), one
    CPU for the training process and the rest, up to :data:`MAX_LOADER_WORKERS`, for its loader workers. The
    smallest GPU node decides (a trial may land on any). Without GPU nodes (or workers): 2 loader workers.

    Args:
        nodes: the alive nodes' resources (``[n["Resources"] for n in ray.nodes() if n["Alive"]]``).
    """
    shares = [r.get("CPU", 0.0) / (r["GPU"] / gpus_per_worker) for r in nodes
              if gpus_per_worker and r.get("GPU", 0.0) >= gpus_per_worker]
    if not shares:
        return 3.0, 2
    loader = int(max(0, min(MAX_LOADER_WORKERS, math.floor(min(shares) - TRIAL_DRIVER_CPUS) - 1)))
    return float(loader + 1), loader


def default_max_concurrent(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many trials the cluster holds at once (from ``ray.cluster_resources()``)."""
    import ray

    res = ray.cluster_resources()
    per_trial_cpu = workers * cpus_per_worker + TRIAL_DRIVER_CPUS
    n = int(res.get("CPU", 1) // per_trial_cpu) if per_trial_cpu else 1
    if gpus_per_worker:
        n = min(n, int(res.get("GPU", 0) // (workers * gpus_per_worker)))
    if n < 1:
        raise SystemExit(f"the cluster ({dict(res)}) cannot hold one trial of {workers} worker(s) x "
                         f"{cpus_per_worker} CPU / {gpus_per_worker} GPU (+{TRIAL_DRIVER_CPUS} CPU for the driver): "
                         "lower --cpus-per-worker/--workers-per-trial or add nodes")
    return n


def finish_dataset(spec: SweepSpec, results: Any, metric: str, mode: str) -> dict[str, Any] | None:
    """After Tune: trial statuses in MLflow, Optuna plots and the summary on the parent, the champion model."""
    ss = spec.space
    cl = tracking.client(spec.settings["tracking_uri"])
    parent = tracking.RunLogger(spec.parent_run_id, spec.settings["tracking_uri"])
    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path).name
        run = tracking.find_run(cl, spec.experiment_id, f"sweep/{spec.name}/{spec.dataset}/{trial_id}")
        reached_end = m.get("training_iteration", 0) >= spec.max_epochs
        status = "FAILED" if r.error is not None else "FINISHED" if reached_end else "KILLED"
        if run is not None and run.info.status != status:
            tracking.RunLogger(run.info.run_id, spec.settings["tracking_uri"]).terminate(status)
        row = {"trial_id": trial_id, "status": status, "run_id": run.info.run_id if run else "",
               "epochs": m.get("training_iteration", 0)}
        row.update({k: r.config.get(k) for k in ss.params} if ss.kind == "optuna" else
                   {"variant": r.config.get("variant")})
        for k in ("best_val_mAP", "best_epoch", "test_mAP", "test_R1", "test_R5", "test_R10"):
            row[k] = m.get(k)
        rows.append(row)
    _log_summary(parent, rows, ss, metric, mode)
    scored = [r for r in rows if _finite(r.get(metric)) and r["status"] != "FAILED" and r["run_id"]]
    if not scored:
        why = next((failure_message(r.error) for r in results if r.error is not None), None)
        print(f"[{spec.dataset}] no trial produced {metric}: nothing to register"
              + (f"; the first failure: {why}" if why else ""), flush=True)
        return None
    best = (max if mode == "max" else min)(scored, key=lambda r: r[metric])
    parent.log_params({f"best.{k}": best[k] for k in (list(ss.params) or ["variant"]) if k in best})
    parent.log_params({"best.trial_id": best["trial_id"], "best.run_id": best["run_id"]})
    parent.log_metrics({f"best_{k}": best[k] for k in ("best_val_mAP", "test_mAP", "test_R1", "test_R5", "test_R10")
                        if _finite(best.get(k))})
    best["model_version"] = str(_register_best(spec, best["run_id"], parent))
    return best


def _register_best(spec: SweepSpec, trial_run_id: str, parent: tracking.RunLogger) -> int:
    """The best trial's exported weights as the pyfunc on the parent run, registered as ``stmi-<dataset>@champion``."""
    from orchestration import registry  # MLflow's pyfunc machinery: only where a model is registered

    trial = tracking.RunLogger(trial_run_id, spec.settings["tracking_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = trial.download_artifact(f"{EXPORT_DIR}/{EXPORT_FILE}", tmp)
        return registry.register_champion(ckpt, spec.dataset, parent, source_run_id=trial_run_id).version


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _log_summary(parent: Any, rows: list[dict[str, Any]], ss: Any, metric: str, mode: str) -> None:
    """Summary table (MLflow table + CSV) and Optuna's importance and history plots on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        keys = list(rows[0]) if rows else ["trial_id"]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        parent.log_artifact(path, "summary")
        parent.log_table({k: [r.get(k) for r in rows] for k in keys}, "summary/trials.json")
        if ss.kind != "optuna":
            return
        try:
            for name, fig_path in _optuna_plots(rows, ss, metric, mode, Path(tmp)).items():
                parent.log_artifact(fig_path, "optuna")
        except Exception as e:  # plots never fail a sweep
            log.warning("optuna plots not logged: %s", e)


def _optuna_plots(rows: list[dict[str, Any]], ss: Any, metric: str, mode: str, out: Path) -> dict[str, Path]:
    """Rebuild the study from the trial rows (works after a resume too) and draw importance and history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = ss.optuna_distributions()
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for r in rows:
        if not _finite(r.get(metric)):
            continue
        params = {k: r[k] for k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[metric])))
    paths = {}
    if len(study.trials) >= 1:
        ax = ovm.plot_optimization_history(study, target_name=metric)
        paths["history"] = out / "optimization_history.png"
        ax.figure.savefig(paths["history"], dpi=110, bbox_inches="tight")
        plt.close("all")
    if len(study.trials) >= 2:
        try:
            ax = ovm.plot_param_importances(study, target_name=metric)
            paths["importance"] = out / "param_importances.png"
            ax.figure.savefig(paths["importance"], dpi=110, bbox_inches="tight")
        except (RuntimeError, ValueError) as e:  # e.g. all trials equal: importance undefined
            log.warning("importance plot skipped: %s", e)
        plt.close("all")
    return paths


# --------------------------------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python orchestration/sweep.py",
        description="Search STMI's hyperparameters with Ray Tune + Optuna (+ ASHA) on one or more datasets; runs, "
                    "metrics and models go to MLflow (S3 artifacts); the best trial per dataset is registered as "
                    "stmi-<dataset>@champion. With no arguments: the demo (synthetic data, tiny model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="defaults for everything below: demo (synthetic data, tiny model, minutes on 2 CPUs) or "
                        "paper (ViT-B-16, the real datasets under --data-root)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--data-root", help="folder holding RGBNT201/, RGBNT100/, MSVR310/ (required for paper; the "
                                       "demo generates synthetic data on first use)")
    p.add_argument("--search-space", help="search_spaces/NAME.yaml, NAME, or a path (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every trial, repeatable: --set model.pretrained=/models/ViT-B-16.pt")
    p.add_argument("--missing", choices=MISSING_CHOICES, help="shortcut for --set eval.missing=...: every trial's "
                   "final test also runs the missing-modality protocols (topreid: six settings, any2any: 49, all)")
    p.add_argument("--num-samples", type=int, help="trials per dataset (Optuna); a grid runs each variant once")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that ASHA does not stop")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers per trial")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per training worker (default: the preset's; paper: "
                   "from the GPU nodes' CPUs, with data.num_workers to match)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--max-concurrent", type=int, help="concurrent trials (default: what the cluster holds)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per trial")
    p.add_argument("--name", help="sweep name (MLflow experiment stmi-<name>, storage path); default preset-time")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name after an interruption")
    p.add_argument("--seed", type=int, default=1111, help="Optuna sampler seed")
    PlatformSettings.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit code."""
    raw = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(raw)
    preset = PRESETS[args.preset]
    if args.preset == "demo":
        print("STMI sweep: running the DEMO preset (synthetic data, tiny random-init model, a few trials per dataset)"
              + ("" if raw else "; see --help for the paper preset and real datasets"), flush=True)
    else:
        print(f"STMI sweep: preset {args.preset}", flush=True)
    _quiet_logging()
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)

    try:
        ss = load_search_space(args.search_space)
        overrides = _parse_overrides(args.overrides + ([f"eval.missing={args.missing}"] if args.missing else []))
        for dataset in args.datasets if args.data_root else ():
            check_data_root(dataset, str(Path(args.data_root).expanduser().absolute()))
        settings = PlatformSettings.from_env(args)
        settings.check_storage()
        if args.preset == "paper" and not args.data_root:
            raise SettingsError("--data-root is required for the paper preset (the folder holding RGBNT201/ ...)")
        if args.resume and not args.name:
            raise SettingsError("--resume needs --name of the sweep to continue")
    except (SearchSpaceError, SettingsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cl = tracking.client(settings.tracking_uri)
    experiment = f"stmi-{name}"
    exists = tracking.find_experiment(cl, experiment) is not None
    if exists and not args.resume:
        print(f"error: sweep {name!r} exists (MLflow experiment {experiment!r}); pass --resume to continue it or "
              "choose another --name", file=sys.stderr)
        return 2
    exp_id = tracking.get_or_create_experiment(cl, experiment)
    print(f"sweep {name!r}: MLflow experiment {experiment!r} at {settings.tracking_uri}; search space {ss.path.name} "
          f"({ss.kind}); datasets {', '.join(args.datasets)}", flush=True)

    resume = "ray job submit -- python orchestration/sweep.py " + shlex.join(
        [*raw, *([] if args.name else ["--name", name]), *([] if args.resume else ["--resume"])])
    current: list[tracking.RunLogger] = []  # the dataset's parent run while its Tune experiment runs

    def runs_to_stop() -> Iterator[tracking.RunLogger]:  # the parent first: the stop leaves 3 s for all of it
        parents = list(current)
        yield from parents
        for p in parents:
            for run_id in tracking.running_children(cl, exp_id, p.run_id):
                yield tracking.RunLogger(run_id, settings.tracking_uri)

    import ray

    ray.init(ignore_reinit_error=True)
    tracking.reap_before_start(settings.tracking_uri, exp_id)  # runs a dead driver left RUNNING end KILLED
    if args.cpus_per_worker == "node":  # the paper preset: size the loaders by the GPU nodes' CPUs
        args.cpus_per_worker, loader = node_loader_plan([n["Resources"] for n in ray.nodes() if n.get("Alive")],
                                                        args.gpus_per_worker)
        overrides.setdefault("data.num_workers", loader)
        print(f"{args.cpus_per_worker:g} CPU(s) per training worker, {overrides['data.num_workers']} loader "
              f"worker(s) (from the cluster's nodes)", flush=True)
    stop = StopHandler(resume, runs_to_stop, defer=True).install()  # after ray.init, which sets its own handler
    max_concurrent = args.max_concurrent or default_max_concurrent(args.workers_per_trial, args.cpus_per_worker,
                                                                   args.gpus_per_worker)
    summary = {}
    failed = False
    try:
        for dataset in args.datasets:
            data_root = _data_root(args, dataset)
            max_epochs = args.max_epochs or recipe(args.recipe, dataset).optim.epochs
            parent_key = f"sweep/{name}/{dataset}"
            parent_id = tracking.get_or_create_run(cl, exp_id, parent_key, dataset,
                                                   tags={"stmi.sweep": name, "stmi.dataset": dataset,
                                                         "stmi.role": "parent"})
            parent = tracking.RunLogger(parent_id, settings.tracking_uri)
            if parent.tags().get("stmi.sweep_done") == "true":
                print(f"[{dataset}] already finished in a previous run of this sweep: skipped", flush=True)
                continue
            current[:] = [parent]
            spec = SweepSpec(name=name, dataset=dataset, recipe=args.recipe, data_root=data_root,
                             search_space=str(ss.path), max_epochs=max_epochs, workers=args.workers_per_trial,
                             cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                             max_failures=args.max_failures, experiment_id=exp_id, parent_run_id=parent_id,
                             overrides=overrides,
                             settings={"s3_endpoint": settings.s3_endpoint, "bucket": settings.bucket,
                                       "prefix": settings.prefix, "tracking_uri": settings.tracking_uri})
            parent.log_params({"sweep.name": name, "sweep.preset": args.preset, "sweep.search_space": ss.path.name,
                               "sweep.num_samples": args.num_samples, "sweep.max_epochs": max_epochs,
                               "sweep.workers_per_trial": args.workers_per_trial, "sweep.seed": args.seed,
                               "sweep.max_concurrent": max_concurrent})
            parent.log_artifact(ss.path, "search_space")
            note = sweep_note(name, args, dataset, ss, list(raw))
            parent.set_tags({"mlflow.note.content": note})
            print(f"[{dataset}] {args.num_samples if ss.kind == 'optuna' else len(ss.variants)} trial(s), up to "
                  f"{max_epochs} epochs each, {max_concurrent} at a time", flush=True)
            tuner = build_tuner(spec, args.num_samples, max_concurrent, args.grace_period, args.seed, args.resume)
            results = tuner.fit()
            if stop.stopped:  # Tune may return from an interrupt instead of raising: nothing is finished then
                raise KeyboardInterrupt
            best = finish_dataset(spec, results, ss.metric, ss.mode)
            current.clear()
            if best is None:
                parent.terminate("FAILED")
                failed = True
                continue
            summary[dataset] = best
            parent.set_tags({"stmi.sweep_done": "true", "mlflow.note.content": note + champion_note(best)})
            parent.terminate("FINISHED")
            print(f"[{dataset}] best trial {best['trial_id']}: val mAP {best['best_val_mAP']:.4f}, test mAP "
                  f"{_fmt(best.get('test_mAP'))}, R1 {_fmt(best.get('test_R1'))}; registered stmi-{dataset} version "
                  f"{best['model_version']} as @champion", flush=True)
        write_report(name, cl)
        print(f"sweep {name!r} done: " + ", ".join(f"{d}: val mAP {b['best_val_mAP']:.4f}" for d, b in summary.items()),
              flush=True)
    except KeyboardInterrupt:
        if stop.stopped:  # Tune has unwound (and saved its state): now the MLflow runs
            stop.end_runs()
            return 143  # 128 + SIGTERM: `ray job stop`
        raise
    return 1 if failed else 0


def sweep_note(name: str, args: argparse.Namespace, dataset: str, ss: Any, argv: list[str]) -> str:
    """The parent run's description (``mlflow.note.content``, Markdown): command, datasets, search space."""
    params = ", ".join(f"`{p}`" for p in ss.params) if ss.kind == "optuna" else f"{len(ss.variants)} variants"
    return (f"**Sweep `{name}`**, dataset **{dataset}** (of {', '.join(args.datasets)}).\n\n"
            f"- command: `python orchestration/sweep.py {shlex.join(argv)}`\n"
            f"- preset `{args.preset}`, recipe `{args.recipe}`, search space `{ss.path.name}` ({ss.kind}: {params}), "
            f"{args.num_samples if ss.kind == 'optuna' else len(ss.variants)} trial(s), selection on "
            f"`{ss.metric}` ({ss.mode})\n"
            f"- report: `python -m orchestration.report --sweep {name}`\n")


def champion_note(best: dict[str, Any]) -> str:
    """The champion's line of the parent's description."""
    return (f"- champion: trial `{best['trial_id']}` (run `{best['run_id']}`), val mAP {best['best_val_mAP']:.4f}, "
            f"test mAP {_fmt(best.get('test_mAP'))}, R1 {_fmt(best.get('test_R1'))}; registered version "
            f"{best.get('model_version', '?')}\n")


def write_report(name: str, cl: Any) -> None:
    """The sweep's report (``orchestration.report``), logged to its parent runs; a report that fails never fails
    the sweep (its runs are all logged: ``python -m orchestration.report --sweep NAME`` makes it again)."""
    from orchestration.report import build_report

    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = build_report(name, tmp, cl)
            print(f"report logged to the parent runs (report/{Path(paths['markdown']).name}); again with "
                  f"`python -m orchestration.report --sweep {name} --out DIR`", flush=True)
    except Exception as e:  # noqa: BLE001 - reporting is a view of logged runs, not part of them
        log.warning("the sweep report was not written: %s: %s", type(e).__name__, e)


def _quiet_logging() -> None:
    """Our INFO lines; libraries' (open_clip, MLflow) warnings only. Tune's compact table (see build_tuner)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("stmi").setLevel(logging.INFO)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter honours our column selection
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    try:
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)
    except ImportError:
        pass


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.K=8", ...]`` -> checked overrides (an unknown field or a wrong type fails before anything starts)."""
    flat = parse_assignments(items)
    checked = flatten(apply_overrides(STMIConfig(), flat))
    return {k: checked[k] for k in flat}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if _finite(v) else "n/a"


def _data_root(args: argparse.Namespace, dataset: str) -> str:
    if args.data_root:
        return str(Path(args.data_root).expanduser().absolute())
    print(f"[{dataset}] synthetic demo data (generated on first use)...", flush=True)
    return str(ensure_demo_dataset(dataset))


if __name__ == "__main__":
    # Run the importable module's main so Ray pickles orchestration.sweep functions by reference, not __main__.
    from orchestration.sweep import main as _main

    sys.exit(_main())
