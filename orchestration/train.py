"""One STMI training run on Ray Train (DDP), checkpoints on S3, metrics in MLflow.

Three levels, as Ray's own examples: :func:`train_fn_per_worker` runs on every DDP rank; :func:`fit` builds and fits a
``TorchTrainer`` (called by :func:`main` for a single run and by a Tune trial driver in ``sweep.py``); :func:`main`
is the command line. The training loop itself (validation cadence, best-weights selection, the final test,
checkpoint contents) is :func:`stmi.engine.fit`; this module adds DDP, Ray's checkpoint storage and MLflow to it
through two callbacks, :class:`RayReport` and :class:`MlflowLog`.

Fault tolerance: every epoch rank 0 writes a checkpoint (model, optimizer, scheduler, sampler epoch, RNG states,
config, the epoch-metric history and the best weights so far) through Ray's storage to S3. When a worker dies Ray
Train restarts the group from the last checkpoint; the worker loads it and goes on from the next epoch. MLflow
stays consistent because the run is created by the driver (which survives worker failures), epoch metrics are
logged only after their checkpoint is persisted, steps already on the server are never logged again, and steps in
the checkpoint's history that the server lacks are filled in on restore.

Example:
    python orchestration/train.py --dataset rgbnt201 --data-root /data --recipe paper --workers 4 --gpus-per-worker 1
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestration import tracking
from orchestration.settings import PlatformSettings, SettingsError
from orchestration.tracking import RunLogger
from stmi import provenance
from stmi.callbacks import Callback, EpochEnd
from stmi.config import (
    DATASETS,
    ConfigError,
    STMIConfig,
    apply_overrides,
    field_types,
    flatten,
    from_dict,
    parse_assignments,
    to_dict,
)

if TYPE_CHECKING:
    from stmi.engine import TrainingRun

MISSING_CHOICES: tuple[str, ...] = typing.get_args(field_types()["eval.missing"])
"""``--missing`` values: those of the config field ``eval.missing``."""
# stmi.engine (torch, open_clip) is imported where it runs, in the workers, so --help and argument errors are instant.
log = logging.getLogger("stmi.train")
EXPORT_DIR, EXPORT_FILE = "checkpoints", "best.pt"
"""Where a run's exported best weights (``stmi.engine.export_model``) go in MLflow: ``checkpoints/best.pt``."""


# --------------------------------------------------------------------------------------------------- worker level
def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The training loop on every DDP rank: :func:`stmi.engine.fit` with Ray checkpoints/reports and MLflow logging.

    Args:
        config: ``{"stmi": <to_dict(STMIConfig)>, "run_id": <MLflow run id or None>, "tracking_uri": ...}``.
    """
    import ray.train
    import ray.train.torch

    from stmi import engine

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def ddp(model: Any, cfg: STMIConfig) -> Any:
        kwargs = {"find_unused_parameters": engine.find_unused_parameters(cfg)}
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs)

    run = engine.prepare_run(from_dict(config["stmi"]), rank=rank, world_size=world,
                             device=ray.train.torch.get_device(), wrap_model=ddp)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = engine.load_fit_checkpoint(run, d)
        log.info("rank %d resumed from %s at epoch %d", rank, checkpoint.path, state.epoch)
    callbacks: list[Callback] = [RayReport()]
    tracker = RunLogger(config["run_id"], config.get("tracking_uri")) if rank == 0 and config.get("run_id") else None
    if tracker is not None:
        tracker.log_params({**flatten(run.cfg), "train.world_size": world, "train.device": str(run.device)})
        if state is not None:
            filled = tracker.log_history(state.history)
            if filled:
                log.info("filled %d epoch(s) missing in MLflow from the checkpoint's history", filled)
            tracker.set_tags({"stmi.resumed_from_epoch": state.epoch - 1})
        else:
            tracker.set_tags({"stmi.missing_captions": run.loaders.missing_captions,
                              "stmi.selects_on_test": run.loaders.selects_on_test,
                              **provenance.run_tags(str(run.device), world)})
            tracker.log_dict(to_dict(run.cfg), "config.json")  # again at the test: the re-runnable config
            log_data_inputs(tracker, run.cfg)
        tracker.start_system_metrics()
        callbacks.append(MlflowLog(tracker))
    try:
        engine.fit(run, state, callbacks,
                   evaluate_untrained=tracker is not None and "untrained_val_mAP" not in tracker.metrics())
    finally:
        if tracker is not None:
            tracker.stop_system_metrics()


def log_data_inputs(tracker: RunLogger, cfg: STMIConfig) -> None:
    """The fingerprint of each split the run reads, as MLflow dataset inputs and tags (``RunLogger``)."""
    from stmi.data import load_dataset
    from stmi.data.fingerprint import fingerprint_dataset

    splits = load_dataset(cfg.data.dataset, cfg.data.root)
    tracker.log_data_fingerprints(fingerprint_dataset(splits), source=str(splits.root), name=cfg.data.dataset)


MISSING_TABLE = "eval/missing_modalities.json"
"""The MLflow table of the missing-modality protocols (one row per setting) a run with ``eval.missing`` logs."""


def log_missing(tracker: RunLogger, missing: dict[str, Any]) -> None:
    """The missing-modality results of the final test (``{protocol: {setting: result}}``) as metrics
    ``test_missing/<protocol>/<setting>/<metric>`` and the table :data:`MISSING_TABLE`, through ``RunLogger``."""
    from stmi.eval_missing import missing_metrics, missing_table

    tracker.log_metrics(missing_metrics(missing))
    tracker.log_table(missing_table(missing), MISSING_TABLE)


EPOCHS_TRAINED = "epochs_trained"
"""The key :class:`RayReport` adds to each epoch's report: epochs trained so far. A sweep's Tune progress (ASHA's
``time_attr``, a trial's FINISHED/KILLED outcome) reads it, not Tune's ``training_iteration``, which counts the
reports of one driver start and so restarts at 1 when a resumed trial continues from its Train checkpoint."""


class RayReport(Callback):
    """Every epoch: rank 0 reports its metrics with the checkpoint (through Ray's storage), other ranks without."""

    def on_epoch_end(self, run: TrainingRun, end: EpochEnd) -> None:
        import ray.train

        from stmi.engine import save_fit_checkpoint

        metrics = {**end.metrics, EPOCHS_TRAINED: end.epoch + 1}
        if not run.is_main:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_fit_checkpoint(run, end.state, tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{end.epoch:04d}")


class MlflowLog(Callback):
    """Rank 0's MLflow logging: the untrained reference, test metrics and artifacts, and each epoch's metrics AFTER
    its checkpoint is persisted (so it comes after :class:`RayReport` in the callback list; module docstring)."""

    def __init__(self, tracker: RunLogger) -> None:
        self.tracker = tracker

    def on_untrained(self, run: TrainingRun, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics)

    def on_test_end(self, run: TrainingRun, result: dict[str, Any], weights: dict[str, Any]) -> None:
        """Test metrics (and the missing-modality table, :func:`log_missing`), resolved config, CMC curve, retrieval
        picture, exported best weights.

        Logged before the last epoch's checkpoint, so a crash in between redoes the epoch and logs them again.
        A failing plot never fails the run."""
        from stmi import plots
        from stmi.engine import export_model

        cfg, loaders = run.cfg, run.loaders
        self.tracker.log_metrics({f"test_{k}": result[k] for k in ("mAP", "R1", "R5", "R10")})
        if result.get("missing"):
            log_missing(self.tracker, result["missing"])
        self.tracker.log_dict(to_dict(cfg), "config.json")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                plots.plot_cmc(result["cmc"], Path(tmp) / "cmc_curve.png", title=f"{cfg.data.dataset} test CMC")
                self.tracker.log_artifact(Path(tmp) / "cmc_curve.png", "plots")
                if result.get("top10") is not None:
                    plots.plot_retrieval(loaders.query_records, loaders.gallery_records, result["top10"],
                                         Path(tmp) / "retrieval_top10.png", query_indices=result.get("vis_queries"))
                    self.tracker.log_artifact(Path(tmp) / "retrieval_top10.png", "plots")
            except Exception as e:  # a plot must not lose the run
                log.warning("plots not logged: %s", e)
            self.tracker.log_artifact(export_model(weights, cfg, Path(tmp) / EXPORT_FILE), EXPORT_DIR)

    def on_epoch_end(self, run: TrainingRun, end: EpochEnd) -> None:
        self.tracker.log_epoch(end.epoch, end.metrics)


# --------------------------------------------------------------------------------------------------- driver level
def fit(cfg: STMIConfig, run_name: str, *, settings: Any, run_id: str | None, workers: int = 1,
        cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, max_failures: int = 3,
        callbacks: list[Any] | None = None, local_storage: str | None = None) -> Any:
    """Build and fit the ``TorchTrainer`` for one run; returns Ray's ``Result``.

    Args:
        run_name: Ray run name; with the same storage path a second ``fit`` resumes the run.
        settings: ``PlatformSettings`` (S3 storage); ``local_storage`` (a folder) replaces S3 when given.
        run_id: The MLflow run rank 0 logs into (None: no MLflow).
        callbacks: Extra Ray Train ``UserCallback`` s (a Tune trial passes ``TuneReportCallback``).
    """
    import ray.train
    from ray.train.torch import TorchConfig

    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    if local_storage:
        storage = {"storage_path": str(Path(local_storage).absolute())}
    else:
        storage = {"storage_path": settings.ray_storage_path, "storage_filesystem": settings.storage_filesystem()}
    trainer = trainer_class()(
        train_fn_per_worker,
        train_loop_config={"stmi": to_dict(cfg), "run_id": run_id,
                           "tracking_uri": settings.tracking_uri if settings is not None else None},
        torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, **storage,
            # Worker errors (a failed checkpoint upload included) restart the group from the last checkpoint up to
            # max_failures times; controller errors that Ray can retry get the same budget. S3 outages do not
            # count: the storage filesystem retries until S3 answers (settings.RetryingFileSystemHandler).
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[no_retry_on_data_error(), *(callbacks or [])],
            worker_runtime_env={"env_vars": settings.worker_env()} if settings is not None else None,
        ),
    )
    return trainer.fit()


def trainer_class() -> type:
    """``TorchTrainer`` without Ray Data's set-up, which a trainer given no ``datasets`` (ours) never uses.

    Ray Train 2.60 starts a ``DatasetManager`` actor for every run, datasets or not, before the training function
    may start (its ``DatasetsCallback``): a new process importing Ray Data, in every sweep trial. With the preemption
    watcher off as well (``infra.local.stack.RayHead``), a grid sweep's first pair of trials reached its first step
    52 s instead of 63 s after Tune started, on 2 CPUs (the two were measured together, not apart). This subclass
    leaves that callback out when there are no datasets; everything else (backend, placement-group cleaner, working
    directory, metrics, user callbacks) is Ray's own list.
    ``_create_default_callbacks`` is private: ``tests/test_train_ray.py`` checks the list and, on a real run, that
    no ``DatasetManager`` is started, so a Ray upgrade that changes it fails there rather than silently.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class STMITrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return STMITrainer


def no_retry_on_data_error() -> Any:
    """A Ray Train callback that ends the run at once on a ``DatasetError`` in a worker instead of retrying it.

    A missing or corrupt file is the data's fault: a restart from the last checkpoint meets the same file, so
    ``max_failures`` restarts would only repeat it. Ray Train V2 retries every worker error and has no per-error
    policy; ``UserCallback.after_exception`` runs on the controller when it sees worker errors, before its failure
    decision, and an exception raised there ends the run as a non-retryable ``ControllerError`` that carries the
    message (tests/test_train_ray.py holds Ray to that).
    """
    from ray.train.v2.api.callback import UserCallback

    from stmi.data.layouts import DatasetError

    class NoRetryOnDataError(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for rank, error in sorted(worker_exceptions.items()):
                if isinstance(error, DatasetError):
                    raise DatasetError(f"rank {rank}: {error}")

    return NoRetryOnDataError()


def failure_message(error: BaseException) -> str:
    """One line for a failed run: a ``DatasetError``'s message (it names the file and the fix) when one caused it,
    else the first line of the innermost cause (Ray wraps errors in controller / task errors)."""
    from stmi.data.layouts import DatasetError

    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = getattr(e, "controller_failure", None) or getattr(e, "cause", None) or e.__cause__
    found = next((c for c in chain if isinstance(c, DatasetError)), chain[-1])
    lines = [ln.strip() for ln in str(found).splitlines() if ln.strip()]
    return lines[0] if lines else type(found).__name__


# --------------------------------------------------------------------------------------------------- command line
def build_config(recipe_name: str, dataset: str, data_root: str | None, overrides: list[str]) -> STMIConfig:
    """Recipe + data root + ``--set field=value`` overrides (checked against the config's types)."""
    from stmi.recipes import recipe

    cfg = recipe(recipe_name, dataset)
    flat: dict[str, Any] = {}
    if data_root:
        flat["data.root"] = str(Path(data_root).expanduser().absolute())
    flat.update(parse_assignments(overrides))
    return apply_overrides(cfg, flat)


def check_data_root(dataset: str, root: str) -> None:
    """Fail before any MLflow run is created or any worker starts when ``root`` holds no ``dataset`` folder.

    Raises:
        SettingsError: the folder is missing (or has the wrong case); the message names the path and the fix.
    """
    if not Path(root).is_dir():  # the common typo, answered without importing the data package (torch)
        raise SettingsError(f"--data-root {root} does not exist or is not a folder; pass the folder that contains "
                            f"the dataset folder (e.g. /data for /data/RGBNT201)")
    from stmi.data.layouts import DatasetError, dataset_dir

    try:
        dataset_dir(dataset, root)
    except DatasetError as e:
        raise SettingsError(f"--data-root {root}: {e}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python orchestration/train.py",
        description="Train STMI once on Ray Train (DDP) with checkpoints on S3 and tracking in MLflow. "
                    "Connects to the Ray cluster in $RAY_ADDRESS (as under `ray job submit`) or starts a local one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="rgbnt201")
    p.add_argument("--data-root", help="folder holding the dataset folder (e.g. /data for /data/RGBNT201); "
                                       "default: the recipe's (demo: synthetic data generated on first use)")
    p.add_argument("--recipe", default="demo", help="named recipe: paper | demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, repeatable: --set model.K=8 --set optim.lr=1e-5")
    p.add_argument("--epochs", type=int, help="shortcut for --set optim.epochs=N")
    p.add_argument("--missing", choices=MISSING_CHOICES, help="shortcut for --set eval.missing=...: the final test "
                   "also runs TOP-ReID's missing-modality protocol (six settings), MDReID's any-to-any grid (49), or "
                   "both, and logs a table of mAP / R1 per setting (default: the config's, none)")
    p.add_argument("--workers", type=int, default=1, help="DDP workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    p.add_argument("--name", help="run name (deterministic: the same name resumes the run); default derived")
    p.add_argument("--experiment", default="stmi-train", help="MLflow experiment")
    p.add_argument("--rerun", metavar="RUN", help="run a logged run again with its exact config: an MLflow run id or "
                   "models:/NAME@ALIAS (e.g. models:/stmi-rgbnt201@champion); the code version and data fingerprints "
                   "it recorded are compared with the current ones (a warning per difference); --set, --epochs and "
                   "--data-root still apply; the new run is tagged stmi.rerun_of")
    p.add_argument("--strict", action="store_true", help="with --rerun: refuse to run when code or data differ")
    PlatformSettings.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("stmi").setLevel(logging.INFO)
    args = parser().parse_args(argv)
    extra_tags: dict[str, str] = {}
    try:
        overrides = list(args.overrides) + ([f"optim.epochs={args.epochs}"] if args.epochs else []) + (
            [f"eval.missing={args.missing}"] if args.missing else [])
        settings = PlatformSettings.from_env(args)
        if args.rerun:
            cfg, extra_tags = _rerun_config(args, settings, overrides)
        else:
            cfg = build_config(args.recipe, args.dataset, args.data_root, overrides)
        if args.data_root or args.rerun:
            check_data_root(cfg.data.dataset, cfg.data.root)
        settings.check_storage()
    except (ConfigError, SettingsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = _ensure_demo_data(cfg)
    name = args.name or f"{cfg.recipe}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cl = tracking.client(settings.tracking_uri)
    exp_id = tracking.get_or_create_experiment(cl, args.experiment)
    run_id = tracking.get_or_create_run(cl, exp_id, f"train/{name}", name,
                                        tags={"stmi.dataset": cfg.data.dataset, "stmi.recipe": cfg.recipe,
                                              **extra_tags})
    print(f"MLflow run {run_id} in experiment {args.experiment!r} at {settings.tracking_uri}", flush=True)
    raw = list(sys.argv[1:] if argv is None else argv)
    resume = "ray job submit -- python orchestration/train.py " + shlex.join(
        raw if args.name else [*raw, "--name", name])
    import ray
    import ray.train

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    tracking.reap_before_start(settings.tracking_uri, exp_id)  # runs a dead driver left RUNNING end KILLED
    stop = StopHandler(resume, lambda: [RunLogger(run_id, settings.tracking_uri)]).install()  # after ray.init
    status = "FAILED"
    try:
        result = fit(cfg, name, settings=settings, run_id=run_id, workers=args.workers,
                     cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                     max_failures=args.max_failures)
        status = "FINISHED"
        m = result.metrics or {}
        print(f"done: best val mAP {m.get('best_val_mAP', float('nan')):.4f} (epoch {m.get('best_epoch')}), "
              f"test mAP {m.get('test_mAP', float('nan')):.4f} R1 {m.get('test_R1', float('nan')):.4f}")
        return 0
    except ray.train.TrainingFailedError as e:  # Ray has printed the workers' tracebacks; the reason comes last
        ray.shutdown()  # stops the forwarding of worker logs, which would otherwise print after the reason
        print(f"error: the run failed: {failure_message(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        status = "KILLED"
        if stop.stopped:
            return 143  # 128 + SIGTERM
        raise
    finally:
        if not stop.stopped:  # a stop already ended the run (first thing, within `ray job stop`'s 3 s)
            RunLogger(run_id, settings.tracking_uri).terminate(status)


def _rerun_config(args: argparse.Namespace, settings: PlatformSettings,
                  overrides: list[str]) -> tuple[STMIConfig, dict[str, str]]:
    """``--rerun``: the logged run's config (data root and ``--set`` overrides applied), the tags of the new run.

    Raises:
        SettingsError: the run cannot be found or rebuilt, or (``--strict``) its code or data differ.
    """
    from orchestration import rerun

    cl = tracking.client(settings.tracking_uri)
    try:
        src = rerun.resolve_run(cl, args.rerun)
        cfg = rerun.with_data_root(rerun.run_config(src, settings.tracking_uri), args.data_root)
        cfg = apply_overrides(cfg, parse_assignments(overrides))
        diffs = rerun.differences(src, cfg)
    except rerun.RerunError as e:
        raise SettingsError(f"--rerun {args.rerun}: {e}") from None
    for d in diffs:
        print(f"warning: --rerun {src.info.run_id}: {d}", file=sys.stderr)
    if diffs and args.strict:
        raise SettingsError(f"--rerun {src.info.run_id} --strict: {len(diffs)} difference(s) above; drop --strict to "
                            f"run anyway")
    if not diffs:
        print(f"rerun of {src.info.run_id}: same code version and data fingerprints", flush=True)
    return cfg, {rerun.RERUN_TAG: src.info.run_id, "stmi.rerun_differences": "; ".join(diffs)[:5000]}


class StopHandler:
    """``ray job stop`` sends SIGTERM to the job's processes and SIGKILL 3 s later (``RAY_JOB_STOP_WAIT_TIME_S``).

    On SIGTERM the MLflow runs ``runs()`` yields end KILLED (not FAILED) with the tag ``stmi.resume_command`` holding
    the command that continues them, and ``KeyboardInterrupt`` is raised in the main thread. A single run is ended
    first thing; a sweep (``defer=True``) first lets Tune unwind and save its experiment state, which is what
    ``--resume`` needs, then ends the runs (the parent first: on a loaded machine the 3 s may not cover every
    trial; a resumed sweep ends those itself).
    """

    def __init__(self, resume: str, runs: Callable[[], Iterable[RunLogger]], defer: bool = False) -> None:
        self.resume, self.runs, self.defer, self.stopped, self._ended = resume, runs, defer, False, False

    def install(self) -> StopHandler:
        """Install the handler; call it after ``ray.init``, which replaces any SIGTERM handler with ``sys.exit``."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def end_runs(self) -> None:
        """End the runs KILLED with the resume tag (once); ``defer=True`` callers call it after unwinding."""
        if self._ended:
            return
        self._ended = True
        try:
            for run in self.runs():
                run.set_tags({tracking.RESUME_TAG: self.resume})
                run.terminate("KILLED")
            print(f"stopped: the MLflow run(s) ended KILLED; continue with: {self.resume}", file=sys.stderr,
                  flush=True)
        except Exception as e:  # never mask the stop itself
            print(f"stopped; MLflow not updated ({e}); continue with: {self.resume}", file=sys.stderr, flush=True)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.stopped:
            return
        self.stopped = True
        if not self.defer:
            self.end_runs()
        raise KeyboardInterrupt


def _ensure_demo_data(cfg: STMIConfig) -> STMIConfig:
    """The demo recipe without a data root generates its synthetic dataset on first use (shared location)."""
    if cfg.data.root:
        return cfg
    from orchestration.demo_data import ensure_demo_dataset

    root = ensure_demo_dataset(cfg.data.dataset)
    return apply_overrides(cfg, {"data.root": str(root)})


if __name__ == "__main__":
    from orchestration.train import main as _main  # see sweep.py: pickle by reference

    sys.exit(_main())
