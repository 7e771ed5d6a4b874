"""One STMI training run on Ray Train (DDP), checkpoints on S3, metrics in MLflow.

Three levels, as Ray's own examples: :func:`train_fn_per_worker` runs on every DDP rank; :func:`fit` builds and fits a
``TorchTrainer`` (called by :func:`main` for a single run and by a Tune trial driver in ``sweep.py``); :func:`main`
is the command line.

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
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stmi.config import DATASETS, STMIConfig, apply_overrides, flatten, from_dict, parse_assignments, to_dict

log = logging.getLogger("stmi.train")
STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"


# --------------------------------------------------------------------------------------------------- worker level
def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The training loop on every DDP rank.

    Args:
        config: ``{"stmi": <to_dict(STMIConfig)>, "run_id": <MLflow run id or None>, "tracking_uri": ...}``.
    """
    import ray.train
    import ray.train.torch
    import torch

    from stmi.data import build_loaders
    from stmi.engine import (
        build_optimizer,
        build_scheduler,
        checkpoint_state,
        restore_state,
        seed_everything,
        train_one_epoch,
    )
    from stmi.eval import evaluate
    from stmi.model import build_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["stmi"])
    device = ray.train.torch.get_device()
    seed_everything(cfg.optim.seed + rank)

    tokenizer = _tokenizer(cfg)
    loaders = build_loaders(cfg, tokenizer, rank=rank, world_size=world)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_classes=loaders.num_classes, num_cameras=loaders.num_cameras if cfg.model.use_sie else 0))
    model = build_model(cfg.model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(core, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=len(loaders.train))

    start_epoch, history, best = 0, [], {"val_mAP": -1.0, "epoch": -1}
    best_weights: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            start_epoch = restore_state(state, core, optimizer, scheduler, generator=loaders.train.generator)
            history, best = state["extra"]["history"], state["extra"]["best"]
            if (Path(d) / BEST_FILE).exists():
                best_weights = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
        log.info("rank %d resumed from %s at epoch %d", rank, checkpoint.path, start_epoch)

    tracker = _rank0_tracker(config, rank)
    if tracker is not None:
        tracker.log_params({**flatten(cfg), "train.world_size": world, "train.device": str(device)})
        if history:
            filled = tracker.log_history(history)
            if filled:
                log.info("filled %d epoch(s) missing in MLflow from the checkpoint's history", filled)
        tracker.start_system_metrics()

    val_loaders = (loaders.val_query, loaders.val_gallery) if loaders.val_query is not None else None
    amp = cfg.optim.amp and device.type == "cuda"
    if tracker is not None and checkpoint is None:
        tracker.set_tags({"stmi.missing_captions": loaders.missing_captions,
                          "stmi.selects_on_test": loaders.selects_on_test})
        logged = tracker.client.get_run(tracker.run_id).data.metrics
        if val_loaders is not None and "untrained_val_mAP" not in logged:  # the reference point for "learnt"
            val0 = evaluate(core, *val_loaders, device, use_scenes=loaders.uses_scenes)
            tracker.log_metrics({"untrained_val_mAP": val0["mAP"], "untrained_val_R1": val0["R1"]})
    if tracker is not None and checkpoint is not None:
        tracker.set_tags({"stmi.resumed_from_epoch": start_epoch - 1})
    epochs = cfg.optim.epochs
    try:
        for epoch in range(start_epoch, epochs):
            loaders.train_sampler.set_epoch(epoch)
            stats = train_one_epoch(model, loaders.train, optimizer, scheduler, cfg.loss, device, epoch, amp=amp,
                                    progress=rank == 0 and sys.stderr.isatty())
            metrics: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
            last = epoch == epochs - 1
            if rank == 0 and val_loaders is not None and ((epoch + 1) % cfg.optim.eval_every == 0 or last):
                val = evaluate(core, *val_loaders, device, use_scenes=loaders.uses_scenes)
                metrics.update(val_mAP=val["mAP"], val_R1=val["R1"], val_R5=val["R5"])
                if val["mAP"] > best["val_mAP"]:
                    best = {"val_mAP": val["mAP"], "val_R1": val["R1"], "epoch": epoch}
                    best_weights = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
            if rank == 0 and val_loaders is None:  # no validation split: the last epoch is the model
                best_weights = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
                best = {"val_mAP": float("nan"), "epoch": epoch}
            metrics.update(best_val_mAP=best["val_mAP"], best_epoch=best["epoch"])
            if last and rank == 0:
                metrics.update(_final_test(core, best_weights, loaders, cfg, device, tracker))
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    state = checkpoint_state(core, optimizer, scheduler, sampler_epoch=epoch + 1, epoch=epoch, cfg=cfg,
                                             generator=loaders.train.generator,
                                             extra={"history": history, "best": best})
                    torch.save(state, Path(tmp) / STATE_FILE)
                    if best_weights is not None:
                        torch.save(best_weights, Path(tmp) / BEST_FILE)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"epoch_{epoch:04d}")
                if tracker is not None:  # after the checkpoint is persisted: see the module docstring
                    tracker.log_epoch(epoch, metrics)
            else:
                ray.train.report(metrics)
    finally:
        if tracker is not None:
            tracker.stop_system_metrics()


def _tokenizer(cfg: STMIConfig) -> Any:
    """The CLIP tokenizer at the text tower's context length (the loaders tokenise captions in their workers)."""
    import open_clip

    from stmi.model import backbone  # noqa: F401 - registers stmi-tiny

    text_cfg = (open_clip.get_model_config(cfg.model.clip_model) or {}).get("text_cfg", {})
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def _rank0_tracker(config: dict[str, Any], rank: int) -> Any:
    if rank != 0 or not config.get("run_id"):
        return None
    from orchestration.tracking import RunLogger

    return RunLogger(config["run_id"], config.get("tracking_uri"))


def _final_test(core: Any, best_weights: dict[str, Any] | None, loaders: Any, cfg: STMIConfig, device: Any,
                tracker: Any) -> dict[str, float]:
    """Test metrics of the best (validation-selected) weights; artifacts to MLflow. Rank 0 only."""
    from stmi.eval import evaluate

    if best_weights is not None:
        current = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
        core.load_state_dict(best_weights)
    res = evaluate(core, loaders.query, loaders.gallery, device, use_scenes=loaders.uses_scenes)
    out = {"test_mAP": res["mAP"], "test_R1": res["R1"], "test_R5": res["R5"], "test_R10": res["R10"]}
    if tracker is not None:
        tracker.log_metrics(out)
        _log_run_artifacts(tracker, res, loaders, cfg, best_weights if best_weights is not None else core.state_dict())
    if best_weights is not None:
        core.load_state_dict(current)
    return out


def _log_run_artifacts(tracker: Any, res: dict[str, Any], loaders: Any, cfg: STMIConfig,
                       weights: dict[str, Any]) -> None:
    """Resolved config, CMC curve, retrieval picture, best checkpoint. Failures of plots never fail the run."""
    import torch

    from stmi import plots

    tracker.log_dict(to_dict(cfg), "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            plots.plot_cmc(res["cmc"], Path(tmp) / "cmc_curve.png", title=f"{cfg.data.dataset} test CMC")
            tracker.log_artifact(Path(tmp) / "cmc_curve.png", "plots")
            if res.get("top10") is not None:
                plots.plot_retrieval(loaders.query_records, loaders.gallery_records, res["top10"],
                                     Path(tmp) / "retrieval_top10.png", query_indices=res.get("vis_queries"))
                tracker.log_artifact(Path(tmp) / "retrieval_top10.png", "plots")
        except Exception as e:  # a plot must not lose the run
            log.warning("plots not logged: %s", e)
        torch.save({"state_dict": weights, "config": to_dict(cfg)}, Path(tmp) / "best.pt")
        tracker.log_artifact(Path(tmp) / "best.pt", "checkpoints")


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
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    if local_storage:
        storage = {"storage_path": str(Path(local_storage).absolute())}
    else:
        storage = {"storage_path": settings.ray_storage_path, "storage_filesystem": settings.storage_filesystem()}
    trainer = TorchTrainer(
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
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": settings.worker_env()} if settings is not None else None,
        ),
    )
    return trainer.fit()


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
    p.add_argument("--workers", type=int, default=1, help="DDP workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    p.add_argument("--name", help="run name (deterministic: the same name resumes the run); default derived")
    p.add_argument("--experiment", default="stmi-train", help="MLflow experiment")
    from orchestration.settings import PlatformSettings

    PlatformSettings.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("stmi").setLevel(logging.INFO)
    args = parser().parse_args(argv)
    from orchestration import tracking
    from orchestration.settings import PlatformSettings, SettingsError
    from stmi.config import ConfigError

    try:
        overrides = list(args.overrides) + ([f"optim.epochs={args.epochs}"] if args.epochs else [])
        cfg = build_config(args.recipe, args.dataset, args.data_root, overrides)
        settings = PlatformSettings.from_env(args)
        settings.check_storage()
    except (ConfigError, SettingsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = _ensure_demo_data(cfg)
    name = args.name or f"{cfg.recipe}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cl = tracking.client(settings.tracking_uri)
    exp_id = tracking.get_or_create_experiment(cl, args.experiment)
    run_id = tracking.get_or_create_run(cl, exp_id, f"train/{name}", name,
                                        tags={"stmi.dataset": cfg.data.dataset, "stmi.recipe": cfg.recipe})
    print(f"MLflow run {run_id} in experiment {args.experiment!r} at {settings.tracking_uri}", flush=True)
    import ray

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    status = "FAILED"
    try:
        result = fit(cfg, name, settings=settings, run_id=run_id, workers=args.workers,
                     cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                     max_failures=args.max_failures)
        status = "FINISHED" if result.error is None else "FAILED"
        m = result.metrics or {}
        print(f"done: best val mAP {m.get('best_val_mAP', float('nan')):.4f} (epoch {m.get('best_epoch')}), "
              f"test mAP {m.get('test_mAP', float('nan')):.4f} R1 {m.get('test_R1', float('nan')):.4f}")
        return 0 if result.error is None else 1
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.RunLogger(run_id, settings.tracking_uri).terminate(status)


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
