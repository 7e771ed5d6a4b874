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
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestration import selection, tracking
from orchestration.demo_data import ensure_demo_dataset
from orchestration.search_space import SearchSpace, SearchSpaceError, load_search_space
from orchestration.settings import PlatformSettings, SettingsError
from orchestration.train import (
    EPOCHS_TRAINED,
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

GRID_SEEDS = 1
"""Seeds per grid variant unless ``--seeds`` says otherwise (each variant once, with the recipe's seed)."""
CONFIRM_SEEDS = 3
"""Seeds per confirmed configuration unless ``--seeds`` says otherwise."""
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"recipe": "demo", "search_space": "demo", "num_samples": 2, "max_epochs": 4, "workers_per_trial": 1,
             "cpus_per_worker": 0.9, "gpus_per_worker": 0.0, "grace_period": 4, "confirm_top": 0, "confirm_seeds": 2},
    "paper": {"recipe": "paper", "search_space": "paper", "num_samples": 24, "max_epochs": None,
              "workers_per_trial": 1, "cpus_per_worker": "node", "gpus_per_worker": 1.0, "grace_period": 10,
              "confirm_top": 3, "confirm_seeds": CONFIRM_SEEDS},
}
"""``confirm_top`` / ``confirm_seeds``: the Optuna confirmation's defaults (``--confirm-top``, ``--seeds``). The demo
leaves it off to stay near 5 minutes on 2 CPUs (measured on an idle 2-CPU machine, stack start included: see the
README's "Measured"; 564 s with ``--confirm-top 1 --seeds 2`` at the former 20 identities and 3 epochs).
The demo trains the demo recipe's 4 epochs (``optim.epochs``; the budget ``benchmarks/ablation.py`` measures at).
Its grace period is its whole budget, so ASHA stops no trial: its two trials run at once, so a trial stopped
early frees a CPU for nobody, and with two trials ASHA's rung compares the second to report with the first, which
made the winner depend on which process started faster (measured: the same demo picked either trial of RGBNT201 on
two runs). Both train to the end and are compared at the same budget.
``cpus_per_worker: "node"``: CPUs per training worker and ``data.num_workers`` from the cluster's GPU nodes
(:func:`node_loader_plan`) unless ``--cpus-per-worker`` / ``--set data.num_workers=...`` say otherwise."""
SAMPLER_SEED = 1111
"""The Optuna sampler's seed unless ``--seed`` says otherwise."""
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
def trial_values(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The config overrides that make one trial what it is: the space's fixed values, then the variant (grid), the
    sampled values (Optuna) or the values of the search trial a confirmation re-runs; then its seed, if it has one
    (grid seeds and confirmations: ``config["seed"]``, the value of ``optim.seed``)."""
    values = config["_confirm"][config["confirm_of"]] if config.get("confirm_of") else config
    out = spec.space.trial_overrides(values)
    if config.get("seed") is not None:
        out["optim.seed"] = int(config["seed"])
    return out


def trial_config(spec: SweepSpec, config: dict[str, Any]) -> STMIConfig:
    """The resolved config of one trial: recipe, data root, epochs, ``--set``, then :func:`trial_values`."""
    overrides = {"data.root": spec.data_root, "optim.epochs": spec.max_epochs, **spec.overrides,
                 **trial_values(spec, config)}
    return apply_overrides(recipe(spec.recipe, spec.dataset), overrides)


def base_seed(spec: SweepSpec) -> int:
    """The seed every trial of the sweep has unless it is seeded: the recipe's ``optim.seed`` after ``--set`` and
    the space's ``fixed`` values (1111 in both recipes). ``--seeds`` counts up from it."""
    return apply_overrides(recipe(spec.recipe, spec.dataset), {**spec.overrides, **spec.space.fixed}).optim.seed


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
    confirm_of = config.get("confirm_of")
    label = confirm_of or config.get("variant") or trial_id
    if config.get("seed") is not None:  # seeded trials (grid --seeds > 1, confirmations): the seed in the name
        label = f"{label}-s{cfg.optim.seed}"
    tags = {"stmi.sweep": spec.name, "stmi.dataset": spec.dataset, "stmi.trial_id": trial_id,
            "stmi.seed": str(cfg.optim.seed),
            **({"stmi.variant": config["variant"]} if config.get("variant") else {}),
            **({"stmi.confirm_of": confirm_of, "stmi.role": "confirm"} if confirm_of else {})}
    # A confirmation is a trial of another Tune experiment: its own key, so its run never meets a search trial's.
    key = f"sweep/{spec.name}/{spec.dataset}/{'confirm/' if confirm_of else ''}{trial_id}"
    found = tracking.find_run(cl, spec.experiment_id, key)
    if found is not None and trained_to_the_end(found.data.metrics, found.info.status, spec.max_epochs):
        # Trained before a stop that came before Tune had saved the trial as done: Tune restarts it on --resume.
        # Its result is reported again from MLflow, nothing is trained a second time.
        ray.tune.report(replayed_result(found.data.metrics))
        if found.info.status != "FINISHED":
            tracking.RunLogger(found.info.run_id, settings.tracking_uri).terminate("FINISHED")
        print(f"trial {trial_id}: its run {found.info.run_id} had trained all {spec.max_epochs} epochs before the "
              "sweep stopped; its result is reported again, nothing is retrained", flush=True)
        return
    run_id = tracking.get_or_create_run(cl, spec.experiment_id, key, f"{spec.dataset}-{label}",
                                        parent_run_id=spec.parent_run_id, tags=tags)
    logger = tracking.RunLogger(run_id, settings.tracking_uri)
    starts = int(logger.tags().get("stmi.driver_starts", "0")) + 1
    logger.set_tags({"stmi.driver_starts": starts})  # > 1: the trial was resumed (never for finished trials)
    # The trial's own values now (visible even if it is stopped before a worker starts); the workers add the rest
    # of the resolved config, with what the data decides (num_classes, num_cameras).
    flat = flatten(cfg)
    logger.log_params({k: flat[k] for k in trial_values(spec, config)})
    train_name = f"{spec.name}-{spec.dataset}-{'confirm-' if confirm_of else ''}{trial_id}"
    try:
        fit(cfg, train_name, settings=settings, run_id=run_id, workers=spec.workers,
            cpus_per_worker=spec.cpus_per_worker, gpus_per_worker=spec.gpus_per_worker,
            max_failures=spec.max_failures, callbacks=[TuneReportCallback()])
    except ray.train.TrainingFailedError as e:
        logger.terminate("FAILED")
        raise RuntimeError(f"trial {trial_id} failed: {failure_message(e)}") from None
    logger.terminate("FINISHED")


def trained_to_the_end(metrics: dict[str, float], status: str, max_epochs: int) -> bool:
    """Whether a trial's MLflow run (latest ``metrics``, ``status``) holds the whole trained result: FINISHED, or
    its last epoch and the test of the selected weights logged (the driver stopped before it ended the run)."""
    return status == "FINISHED" or ("test_mAP" in metrics and metrics.get("epoch", -1) + 1 >= max_epochs)


def replayed_result(metrics: dict[str, float]) -> dict[str, float]:
    """The Tune result of a trial that trained to the end, from its MLflow run's latest metrics."""
    out = {k: v for k, v in metrics.items() if not k.startswith("system/")}
    out[EPOCHS_TRAINED] = int(metrics.get("epoch", -1)) + 1
    return out


# --------------------------------------------------------------------------------------------------- sweep level
def build_tuner(spec: SweepSpec, num_samples: int, max_concurrent: int, grace_period: int, seed: int,
                resume: bool, seeds: list[int] | None = None) -> Any:
    """The Tune experiment of one dataset: Optuna + ASHA on the validation metric, or a grid.

    A grid runs every variant to the end (no ASHA: each is a row of a table, and a row needs its full budget), with
    every seed of ``seeds`` when there are more than one (``optim.seed`` per trial; one seed: the recipe's).
    """
    import ray.tune

    ss = spec.space
    param_space: dict[str, Any] = {"_sweep": dataclasses.asdict(spec)}
    if ss.kind == "grid":  # the whole space before a restore: Tune checks that its keys are the stored ones
        param_space["variant"] = ray.tune.grid_search(list(ss.variants))
        if seeds and len(seeds) > 1:
            param_space["seed"] = ray.tune.grid_search(list(seeds))
    restored = _restore(spec, spec.dataset, param_space, resume)
    if restored is not None:
        return restored
    scheduler = None
    if ss.kind == "grid":
        search_alg = None
        num_samples = 1
    else:
        scheduler = early_stopping(spec.max_epochs, grace_period)
        search_alg = optuna_search(ss, ss.start or [recipe_point(spec.recipe, spec.dataset, ss)], seed,
                                   f"{spec.name}-{spec.dataset}")
    columns = {k: k.split(".")[-1] for k in ss.params} if ss.kind == "optuna" else {"variant": "variant"}
    if "seed" in param_space:
        columns["seed"] = "seed"
    return _tuner(spec, spec.dataset, param_space, columns, search_alg, scheduler, num_samples, max_concurrent)


def optuna_search(ss: SearchSpace, start: list[dict[str, Any]], seed: int, study_name: str) -> Any:
    """Tune's Optuna searcher of an Optuna search space: the ``start`` points first, then TPE draws (``seed``)."""
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=ss.optuna_distributions(), metric=ss.metric, mode=ss.mode, points_to_evaluate=start,
                        sampler=TPESampler(seed=seed), study_name=study_name)


def early_stopping(max_epochs: int, grace_period: int) -> Any:
    """ASHA on the epochs trained, or None when the grace period is the whole budget (it could stop no trial)."""
    if grace_period >= max_epochs:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=EPOCHS_TRAINED, max_t=max_epochs, grace_period=grace_period, reduction_factor=2)


def build_confirm_tuner(spec: SweepSpec, top: list[dict[str, Any]], seeds: list[int], max_concurrent: int,
                        resume: bool) -> Any:
    """The confirmation of one dataset's Optuna search: each configuration of ``top`` (search trial rows, see
    :func:`trial_rows`) trained again with every seed of ``seeds``, to the end (no ASHA, no search algorithm).

    Its own Tune experiment (``<dataset>-confirm`` beside the search's), so ``--resume`` continues it the same way.
    Each trial's config holds ``confirm_of`` (the search trial) and ``seed``; the values come from ``_confirm``.
    """
    import ray.tune

    ss = spec.space
    param_space: dict[str, Any] = {
        "_sweep": dataclasses.asdict(spec),
        "_confirm": {r["trial_id"]: {k: r[k] for k in ss.params} for r in top},
        "confirm_of": ray.tune.grid_search([r["trial_id"] for r in top]),
        "seed": ray.tune.grid_search(list(seeds)),
    }
    restored = _restore(spec, f"{spec.dataset}-confirm", param_space, resume)
    if restored is not None:
        return restored
    return _tuner(spec, f"{spec.dataset}-confirm", param_space, {"confirm_of": "re-run of", "seed": "seed"}, None,
                  None, 1, max_concurrent)


def _restore(spec: SweepSpec, experiment: str, param_space: dict[str, Any], resume: bool) -> Any | None:
    """With ``--resume``: the stored Tune experiment ``experiment`` of this sweep, continued; else None."""
    import ray.tune

    settings = spec.platform()
    fs = settings.storage_filesystem()
    exp_path = f"{settings.ray_storage_path}/sweeps/{spec.name}/{experiment}"
    if not (resume and ray.tune.Tuner.can_restore(exp_path, storage_filesystem=fs)):
        return None
    print(f"[{spec.dataset}] resuming the Tune experiment at s3://{exp_path}", flush=True)
    trainable = ray.tune.with_resources(train_driver, {"CPU": TRIAL_DRIVER_CPUS})
    return ray.tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space, storage_filesystem=fs)


def _tuner(spec: SweepSpec, experiment: str, param_space: dict[str, Any], columns: dict[str, str],
           search_alg: Any, scheduler: Any, num_samples: int, max_concurrent: int) -> Any:
    """A new Tune experiment ``experiment`` of this sweep (storage ``<ray storage>/sweeps/<sweep>/<experiment>``)."""
    import ray.tune

    ss = spec.space
    settings = spec.platform()
    trainable = ray.tune.with_resources(train_driver, {"CPU": TRIAL_DRIVER_CPUS})
    reporter = ray.tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "loss", "val_mAP": "val mAP", "best_val_mAP": "best val mAP"},
        parameter_columns=columns, max_report_frequency=30, sort_by_metric=True)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(metric=ss.metric, mode=ss.mode, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                        trial_dirname_creator=lambda t: t.trial_id),
        run_config=ray.tune.RunConfig(name=experiment, storage_path=f"{settings.ray_storage_path}/sweeps/{spec.name}",
                                      storage_filesystem=settings.storage_filesystem(),
                                      failure_config=ray.tune.FailureConfig(max_failures=1),
                                      progress_reporter=reporter),
    )


def recipe_point(recipe_name: str, dataset: str, ss: SearchSpace) -> dict[str, Any]:
    """The recipe's own values of the searched fields (the paper's values for the six hyperparameters), clipped to
    the space's ranges."""
    flat = flatten(recipe(recipe_name, dataset))
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


def trial_rows(spec: SweepSpec, results: Any, confirm: bool = False) -> list[dict[str, Any]]:
    """After Tune: one row per trial of a Tune experiment (the search's, or ``confirm``: the confirmation's), with
    its MLflow run ended as Tune's outcome says (FINISHED: trained the full budget; KILLED: stopped early)."""
    ss = spec.space
    cl = tracking.client(spec.settings["tracking_uri"])
    base = base_seed(spec)
    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path).name
        key = f"sweep/{spec.name}/{spec.dataset}/{'confirm/' if confirm else ''}{trial_id}"
        run = tracking.find_run(cl, spec.experiment_id, key)
        reached_end = m.get(EPOCHS_TRAINED, 0) >= spec.max_epochs
        status = "FAILED" if r.error is not None else "FINISHED" if reached_end else "KILLED"
        if run is not None and run.info.status != status:
            tracking.RunLogger(run.info.run_id, spec.settings["tracking_uri"]).terminate(status)
        confirm_of = r.config.get("confirm_of") or ""
        values = r.config["_confirm"][confirm_of] if confirm_of else r.config
        row = {"trial_id": trial_id, "status": status, "run_id": run.info.run_id if run else "",
               "epochs": m.get(EPOCHS_TRAINED, 0), "phase": "confirm" if confirm else "search",
               "confirm_of": confirm_of, "seed": int(r.config.get("seed", base))}
        row.update({k: values.get(k) for k in ss.params} if ss.kind == "optuna" else
                   {"variant": values.get("variant")})
        for k in ("best_val_mAP", "best_epoch", "test_mAP", "test_R1", "test_R5", "test_R10"):
            row[k] = m.get(k)
        rows.append(row)
    return rows


def confirmation_candidates(spec: SweepSpec, rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The search trials whose configurations a confirmation re-runs: the top ``k`` by the validation metric."""
    ss = spec.space
    return selection.top_configurations(rows, list(ss.params), ss.metric, ss.mode, k)


def finish_dataset(spec: SweepSpec, rows: list[dict[str, Any]], confirm_rows: list[dict[str, Any]] | None = None,
                   results: Any = None) -> dict[str, Any] | None:
    """After Tune: the summary and Optuna plots on the parent, the champion chosen and registered.

    The champion (``orchestration.selection``): with a confirmation (``confirm_rows`` not None), the confirmed
    configuration with the best mean validation metric over its confirmation seeds; for a grid, the variant with the
    best mean over its seeds; for an Optuna search without confirmation, the best trial. The registered model is the
    champion configuration's run with the best validation metric. The parent records every compared
    configuration's mean and std (metrics ``config.<label>.<metric>_mean`` / ``_std``, the table
    ``summary/configurations.json``) and the champion's (``champion.<metric>_mean`` / ``_std``, ``champion.n``).
    """
    ss = spec.space
    metric, mode = ss.metric, ss.mode
    params = list(ss.params) or ["variant"]
    parent = tracking.RunLogger(spec.parent_run_id, spec.settings["tracking_uri"])
    _log_summary(parent, rows + (confirm_rows or []), ss, metric, mode)
    if confirm_rows is not None:
        groups = selection.group_rows(confirm_rows, params, metric)
        compared = "confirmation"
    elif ss.kind == "grid":
        groups = selection.group_rows(rows, params, metric)
        compared = "grid"
    else:  # one trial per configuration: the best trial, also one ASHA stopped early (as the search compared them)
        groups = selection.group_rows(rows, params, metric, statuses=("FINISHED", "KILLED"))
        compared = ""
    champ = selection.champion(groups, metric, mode)
    if champ is None:
        why = next((failure_message(r.error) for r in (results or []) if r.error is not None), None)
        what = "no confirmation run" if compared == "confirmation" else "no trial"
        print(f"[{spec.dataset}] {what} produced {metric}: nothing to register"
              + (f"; the first failure: {why}" if why else ""), flush=True)
        return None
    best = dict(champ.best_row(metric, mode))
    best["champion"] = champ.summary()
    best["compared"] = compared
    if compared:
        ranked = selection.rank(groups, metric, mode)
        best["configurations"] = [g.summary() for g in ranked]
        _log_configurations(parent, ranked, champ, params, metric)
    parent.log_params({f"best.{k}": best[k] for k in params if k in best})
    parent.log_params({"best.trial_id": best["trial_id"], "best.run_id": best["run_id"],
                       **({"best.confirm_of": best["confirm_of"]} if best.get("confirm_of") else {})})
    parent.log_metrics({f"best_{k}": best[k] for k in ("best_val_mAP", "test_mAP", "test_R1", "test_R5", "test_R10")
                        if _finite(best.get(k))})
    best["model_version"] = str(_register_best(spec, best["run_id"], parent, champion_selection(best, metric)))
    return best


def _log_configurations(parent: tracking.RunLogger, ranked: list[selection.ConfigResult],
                        champ: selection.ConfigResult, params: list[str], metric: str) -> None:
    """Mean and std per compared configuration on the parent run: metrics, an MLflow table and a CSV."""
    metrics: dict[str, float] = {}
    for g in ranked:
        name = _metric_name(g.label)
        for m in (metric, "test_mAP"):
            if _finite(g.mean(m)):
                metrics[f"config.{name}.{m}_mean"] = g.mean(m)
                metrics[f"config.{name}.{m}_std"] = g.std(m)
    for m in selection.SUMMARY_METRICS:
        if _finite(champ.mean(m)):
            metrics[f"champion.{m}_mean"] = champ.mean(m)
            metrics[f"champion.{m}_std"] = champ.std(m)
    metrics["champion.n"] = float(len(champ.rows))
    parent.log_metrics(metrics)
    table = [{**g.summary(), "champion": g is champ} for g in ranked]
    keys = list(table[0])
    parent.log_table({k: [r.get(k) for r in table] for k in keys}, "summary/configurations.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "configurations.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(table)
        parent.log_artifact(path, "summary")


def _metric_name(label: str) -> str:
    """A configuration's label as a part of an MLflow metric name (letters, digits, ``_ - .`` only)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def champion_selection(best: dict[str, Any], metric: str) -> str:
    """One sentence on how the champion was chosen (the registered version's description and the parent's note)."""
    c = best["champion"]
    if not best.get("compared"):
        return f"Selected as the search's best trial on {metric} (one seed per configuration)."
    what = (f"re-run of search trial `{best['confirm_of']}`" if best.get("confirm_of") else
            f"variant `{best.get('variant')}`")
    return (f"Configuration ({what}) selected by its MEAN {metric} over {c['n']} seed(s) ({c['seeds']}): "
            f"{c[f'{metric}_mean']:.4f} ± {c[f'{metric}_std']:.4f} (test mAP {_fmt(c['test_mAP_mean'])} ± "
            f"{_fmt(c['test_mAP_std'])}, never used to choose); these weights are its seed {best['seed']}, the best "
            f"of them on {metric}.")


def _register_best(spec: SweepSpec, trial_run_id: str, parent: tracking.RunLogger, selection_note: str = "") -> int:
    """The best trial's exported weights as the pyfunc on the parent run, registered as ``stmi-<dataset>@champion``."""
    from orchestration import registry  # MLflow's pyfunc machinery: only where a model is registered

    trial = tracking.RunLogger(trial_run_id, spec.settings["tracking_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = trial.download_artifact(f"{EXPORT_DIR}/{EXPORT_FILE}", tmp)
        return registry.register_champion(ckpt, spec.dataset, parent, source_run_id=trial_run_id,
                                          selection=selection_note).version


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
        if not _finite(r.get(metric)) or r.get("phase") == "confirm":  # the study is the search's trials only
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
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped; at least "
                   "--max-epochs: no early stopping (default: paper 10, demo 3 = its budget)")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers per trial")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per training worker (default: the preset's; paper: "
                   "from the GPU nodes' CPUs, with data.num_workers to match)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--max-concurrent", type=int, help="concurrent trials (default: what the cluster holds)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per trial")
    p.add_argument("--name", help="sweep name (MLflow experiment stmi-<name>, storage path); default preset-time")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name after an interruption")
    p.add_argument("--seed", type=int, default=SAMPLER_SEED, help="Optuna sampler seed (the training seeds: --seeds)")
    sel = p.add_argument_group(
        "selection over seeds",
        "A configuration is compared by its MEAN validation mAP over training seeds, not by its luckiest run. "
        "Seeds count up from the recipe's optim.seed (1111; --set optim.seed=S moves it). The champion "
        "(stmi-<dataset>@champion) is the configuration with the best mean validation mAP, and its registered "
        "weights are its seed with the best validation mAP; test metrics are reported, never used to choose. The "
        "parent run records mean and std per configuration (metrics config.<label>.*_mean/_std, champion.*, the "
        "table summary/configurations.json, its description).")
    sel.add_argument("--seeds", type=int, metavar="N",
                     help="training seeds per compared configuration. A grid search space (the ablation) runs every "
                          "variant with N seeds (optim.seed, +1, ...; default %d); an Optuna search re-runs each of "
                          "its --confirm-top configurations with N new seeds (optim.seed+1 ... +N, so the search "
                          "trial's own lucky seed is not averaged in; default: the preset's, demo %s, paper %s)"
                          % (GRID_SEEDS, PRESETS["demo"]["confirm_seeds"], PRESETS["paper"]["confirm_seeds"]))
    sel.add_argument("--confirm-top", type=int, metavar="K",
                     help="after an Optuna search, re-run its K best configurations by validation mAP with --seeds "
                          "seeds each (a second Tune experiment <dataset>-confirm, resumable like the search; its "
                          "runs are tagged stmi.confirm_of=<search trial>, stmi.seed) and choose the champion among "
                          "them by mean; 0: no confirmation, the best search trial is the champion (default: the "
                          "preset's; demo %s, paper %s)" % (PRESETS["demo"]["confirm_top"],
                                                            PRESETS["paper"]["confirm_top"]))
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
    explicit = {k for k in ("seeds", "confirm_top") if getattr(args, k) is not None}
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
        n_seeds, confirm_top = check_selection(ss, args.seeds, args.confirm_top, args.confirm_seeds, explicit)
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
                               "sweep.max_concurrent": max_concurrent, "sweep.seeds": n_seeds,
                               "sweep.confirm_top": confirm_top})
            parent.log_artifact(ss.path, "search_space")
            note = sweep_note(name, args, dataset, ss, list(raw), n_seeds, confirm_top)
            parent.set_tags({"mlflow.note.content": note})
            seeds = selection.seed_list(base_seed(spec), n_seeds)
            trials = args.num_samples if ss.kind == "optuna" else len(ss.variants) * n_seeds
            print(f"[{dataset}] {trials} trial(s)" + (f" ({len(ss.variants)} variants x seeds "
                                                      f"{', '.join(map(str, seeds))})"
                                                      if ss.kind == "grid" and n_seeds > 1 else "")
                  + f", up to {max_epochs} epochs each, {max_concurrent} at a time"
                  + (f"; ASHA may stop a trial after {args.grace_period} epoch(s)"
                     if ss.kind == "optuna" and args.grace_period < max_epochs else "; no early stopping"), flush=True)
            tuner = build_tuner(spec, args.num_samples, max_concurrent, args.grace_period, args.seed, args.resume,
                                seeds=seeds if ss.kind == "grid" else None)
            results = tuner.fit()
            if stop.stopped:  # Tune may return from an interrupt instead of raising: nothing is finished then
                raise KeyboardInterrupt
            rows = trial_rows(spec, results)
            confirm_rows = None
            if confirm_top:
                top = confirmation_candidates(spec, rows, confirm_top)
                if top:
                    cseeds = selection.seed_list(base_seed(spec), n_seeds, offset=1)
                    print(f"[{dataset}] confirmation: the {len(top)} best configuration(s) (search trials "
                          f"{', '.join(r['trial_id'] for r in top)}) again with seeds {', '.join(map(str, cseeds))}, "
                          f"{max_epochs} epochs each", flush=True)
                    confirm = build_confirm_tuner(spec, top, cseeds, max_concurrent, args.resume)
                    results = confirm.fit()
                    if stop.stopped:
                        raise KeyboardInterrupt
                    confirm_rows = trial_rows(spec, results, confirm=True)
            best = finish_dataset(spec, rows, confirm_rows, results)
            current.clear()
            if best is None:
                parent.terminate("FAILED")
                failed = True
                continue
            summary[dataset] = best
            parent.set_tags({"stmi.sweep_done": "true", "mlflow.note.content": note + champion_note(best)})
            parent.terminate("FINISHED")
            if best.get("compared"):
                c = best["champion"]
                print(f"[{dataset}] champion {c['label']}: mean val mAP {c['best_val_mAP_mean']:.4f} ± "
                      f"{c['best_val_mAP_std']:.4f} over {c['n']} seed(s) (test mAP {_fmt(c['test_mAP_mean'])} ± "
                      f"{_fmt(c['test_mAP_std'])}); of the {len(best['configurations'])} compared, by mean val mAP: "
                      + ", ".join(f"{g['label']} {g['best_val_mAP_mean']:.4f} ± {g['best_val_mAP_std']:.4f}"
                                  for g in best["configurations"]), flush=True)
            print(f"[{dataset}] registered trial {best['trial_id']} (seed {best['seed']}): val mAP "
                  f"{best['best_val_mAP']:.4f}, test mAP {_fmt(best.get('test_mAP'))}, R1 {_fmt(best.get('test_R1'))}; "
                  f"stmi-{dataset} version {best['model_version']} as @champion", flush=True)
        write_report(name, cl)
        print(f"sweep {name!r} done: " + ", ".join(f"{d}: val mAP {b['best_val_mAP']:.4f}" for d, b in summary.items()),
              flush=True)
    except KeyboardInterrupt:
        if stop.stopped:  # Tune has unwound (and saved its state): now the MLflow runs
            stop.end_runs()
            return 143  # 128 + SIGTERM: `ray job stop`
        raise
    return 1 if failed else 0


def check_selection(ss: SearchSpace, seeds: int | None, confirm_top: int, confirm_seeds: int,
                    explicit: set[str]) -> tuple[int, int]:
    """``(seeds per compared configuration, configurations to confirm)`` for this search space, or
    :class:`SettingsError` naming the fix when the flags ask for something the space cannot do.

    Args:
        seeds: ``--seeds`` (None: the default for the space's kind).
        confirm_top: ``--confirm-top`` or the preset's.
        confirm_seeds: the preset's seeds per confirmed configuration.
        explicit: which of ``seeds`` / ``confirm_top`` the command line gave.
    """
    if seeds is not None and seeds < 1:
        raise SettingsError(f"--seeds {seeds}: need at least 1 seed per configuration")
    if confirm_top < 0:
        raise SettingsError(f"--confirm-top {confirm_top}: need 0 (no confirmation) or more configurations")
    if ss.kind == "grid":
        if "confirm_top" in explicit and confirm_top:
            raise SettingsError(f"--confirm-top: {ss.path.name} is a grid, which has no search to confirm; it runs "
                                "every variant --seeds N times (drop --confirm-top, or pass --seeds N)")
        return seeds or GRID_SEEDS, 0
    if not confirm_top and "seeds" in explicit and seeds and seeds > 1:
        raise SettingsError(f"--seeds {seeds} has nothing to seed: an Optuna search trains each configuration once "
                            "and --confirm-top 0 turns the confirmation off (pass --confirm-top K to re-run the K "
                            "best configurations with the seeds)")
    return seeds or confirm_seeds, confirm_top


def sweep_note(name: str, args: argparse.Namespace, dataset: str, ss: Any, argv: list[str], n_seeds: int = 1,
               confirm_top: int = 0) -> str:
    """The parent run's description (``mlflow.note.content``, Markdown): command, datasets, search space, how the
    champion is selected."""
    params = ", ".join(f"`{p}`" for p in ss.params) if ss.kind == "optuna" else f"{len(ss.variants)} variants"
    trials = args.num_samples if ss.kind == "optuna" else len(ss.variants) * n_seeds
    if ss.kind == "grid":
        how = f"every variant with {n_seeds} seed(s); champion: the best mean `{ss.metric}`"
    elif confirm_top:
        how = (f"the {confirm_top} best configuration(s) re-run with {n_seeds} new seed(s) each; champion: the best "
               f"mean `{ss.metric}` over those seeds")
    else:
        how = f"no confirmation (`--confirm-top 0`); champion: the best single trial on `{ss.metric}`"
    return (f"**Sweep `{name}`**, dataset **{dataset}** (of {', '.join(args.datasets)}).\n\n"
            f"- command: `python orchestration/sweep.py {shlex.join(argv)}`\n"
            f"- preset `{args.preset}`, recipe `{args.recipe}`, search space `{ss.path.name}` ({ss.kind}: {params}), "
            f"{trials} trial(s), selection on `{ss.metric}` ({ss.mode}); test metrics are never used to choose\n"
            f"- selection: {how}\n"
            f"- report: `python -m orchestration.report --sweep {name}`\n")


def champion_note(best: dict[str, Any]) -> str:
    """The champion's lines of the parent's description: the registered run, how it was chosen and, when
    configurations were compared over seeds, their mean ± std (best first)."""
    metric = selection.SUMMARY_METRICS[0]
    out = (f"- champion: trial `{best['trial_id']}` (run `{best['run_id']}`, seed {best.get('seed', '?')}), val mAP "
           f"{best['best_val_mAP']:.4f}, test mAP {_fmt(best.get('test_mAP'))}, R1 {_fmt(best.get('test_R1'))}; "
           f"registered version {best.get('model_version', '?')}\n")
    if not best.get("compared"):
        return out
    out += f"- {champion_selection(best, metric)}\n\n"
    out += "| configuration | n | seeds | val mAP (mean ± std) | test mAP (mean ± std) |\n|---|---|---|---|---|\n"
    for g in best["configurations"]:
        mark = " **(champion)**" if g["label"] == best["champion"]["label"] else ""
        out += (f"| {g['label']}{mark} | {g['n']} | {g['seeds']} | {_fmt(g[f'{metric}_mean'])} ± "
                f"{_fmt(g[f'{metric}_std'])} | {_fmt(g['test_mAP_mean'])} ± {_fmt(g['test_mAP_std'])} |\n")
    return out


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
    root = str(ensure_demo_dataset(dataset))  # made on first use
    print(f"[{dataset}] synthetic demo data: {root}", flush=True)
    return root


if __name__ == "__main__":
    # Run the importable module's main so Ray pickles orchestration.sweep functions by reference, not __main__.
    from orchestration.sweep import main as _main

    sys.exit(_main())
