"""The STMI training loop and what it is made of; framework-agnostic (no Ray, MLflow, Optuna or boto3 import).

The library owns the ML policy; ``orchestration.train`` only adds DDP, Ray's checkpoint storage and MLflow, through
:class:`Callback` s. The pieces, in the order a run uses them:

- :func:`prepare_run`: everything from a config: seed, tokenizer (:func:`build_tokenizer`, the one way captions are
  tokenised outside the model), loaders, the data-derived ``model.num_classes`` / ``model.num_cameras``, the model
  (optionally wrapped, e.g. in DDP), optimiser and schedule -> :class:`TrainingRun`.
- :func:`fit`: the epochs: :func:`train_one_epoch`, validation every ``optim.eval_every`` epochs and at the last,
  selection of the best (validation mAP) weights, the test of the selected weights after the last epoch (with the
  missing-modality protocols ``cfg.eval.missing`` names: :func:`evaluate_missing_split`), and the per-epoch
  :class:`Callback` hooks (checkpoint, report, log). Its state (:class:`FitState`) is saved and restored exactly by
  :func:`save_fit_checkpoint` / :func:`load_fit_checkpoint` (the files :data:`STATE_FILE` and :data:`BEST_FILE`).
- :func:`export_model` / :func:`load_exported`: the exported checkpoint ``{"state_dict", "config"}`` a run
  publishes (MLflow ``checkpoints/best.pt``) and serving loads: the one writer and the one reader of that format.

Choices the paper leaves open (documented where they are implemented):

- Optimiser: Adam (the anchors), two parameter families from ``STMI.parameter_groups()``: ``clip`` (the CLIP
  towers, lr ``optim.lr``) and ``head`` (everything new, lr ``optim.lr * optim.head_lr_mult``). Weight decay is
  Adam's L2 term (as the anchors) and is not applied to norms, biases, other 1-D parameters (class embedding,
  BN weights, hyperedge weights) nor to the SFM alpha/beta (whatever their shape): decaying a scale or an offset
  towards 0 changes what the layer computes instead of regularising it (open_clip's rule, plus alpha/beta).
- Schedule: linear warmup from ``warmup_factor * lr`` to ``lr`` over ``warmup_epochs``, then cosine down to
  ``min_lr`` at the end of ``epochs``; the same shape for both groups (the head group ends at
  ``min_lr * head_lr_mult``). It is evaluated per iteration (``scheduler.step()`` after every optimiser step,
  fractional epochs ``it / steps_per_epoch``), which is smoother than the anchors' per-epoch steps and equal to
  them at epoch boundaries; ``steps_per_epoch=1`` with one ``step()`` per epoch gives the per-epoch schedule.
- Precision: bf16 autocast on CUDA only (no GradScaler: bf16 has fp32's range); CPU runs in fp32.
- Modality dropout (``data.modality_dropout``, off by default and in the paper recipe): :func:`train_one_epoch`
  marks modalities of each training triplet absent (:func:`stmi.data.batch.drop_modalities`, the distribution in
  :func:`stmi.data.batch.draw_presence`) right before :func:`model_inputs`, in the training process: one draw per
  triplet from torch's global CPU generator, which :func:`seed_everything` seeds with ``optim.seed + rank`` and the
  checkpoints save, so deterministic runs stay deterministic, a resumed run draws what the uninterrupted one would,
  and the ranks of a DDP run drop different modalities. Evaluation never drops.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stmi.callbacks import Callback, EpochEnd, FitState
from stmi.config import LossConfig, ModelConfig, OptimConfig, STMIConfig, from_dict, to_dict
from stmi.data.batch import drop_modalities, model_inputs
from stmi.data.loaders import Loaders, build_loaders
from stmi.eval import evaluate, evaluate_features
from stmi.model import build_model

CHECKPOINT_FORMAT = 1
STATE_FILE = "state.pt"
"""Training checkpoint file (:func:`checkpoint_state` of model, optimiser, schedule, RNGs, history, best so far)."""
BEST_FILE = "best_model.pt"
"""The best weights so far (a plain state dict), next to :data:`STATE_FILE`."""
EXPORT_KEYS = ("state_dict", "config")
"""Keys of the exported checkpoint (:func:`export_model`)."""
__all__ = [
    "BEST_FILE", "Callback", "EpochEnd", "FitState", "STATE_FILE", "TrainingRun", "build_optimizer",
    "build_scheduler", "build_tokenizer", "checkpoint_state", "evaluate_missing_split", "evaluate_split",
    "export_model",
    "find_unused_parameters", "fit", "load_exported", "load_exported_model", "load_fit_checkpoint", "model_inputs",
    "prepare_run", "restore_state", "save_fit_checkpoint", "seed_everything", "train_one_epoch", "unwrap",
    "with_data_fields",
]
_NO_DECAY_NAME_PARTS = ("sfm_alpha", "sfm_beta", "logit_scale")


class random_state_kept:  # noqa: N801 - used as a context manager, like torch.random.fork_rng
    """Python's, NumPy's and torch's random states (the CPU's and ``device``'s when it is CUDA) put back on exit.

    For the untrained reference evaluation: a DataLoader draws its base seed from torch's generator each time it is
    iterated, so without this a run that evaluates the untrained model (every tracked run) trained on another random
    stream than the same config and seed run without it (measured: best validation mAP 0.195 vs 0.229 on the demo).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = dev if dev.type == "cuda" and torch.cuda.is_available() else None

    def __enter__(self) -> random_state_kept:
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                       torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None)
        return self

    def __exit__(self, *exc: object) -> None:
        py, npy, cpu, cuda = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.cuda)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # The math attention kernel: flash / memory-efficient / cuDNN SDPA backward passes use atomics.
        for name in ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp"):
            getattr(torch.backends.cuda, name, lambda _: None)(False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / compile wrapper (``.module`` / ``._orig_mod``), else the model itself."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or any(s in name for s in _NO_DECAY_NAME_PARTS)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Adam:
    """Adam over ``model.parameter_groups()`` with per-group lr and weight decay (see the module docstring).

    Param groups carry ``name`` (``clip``, ``clip_no_decay``, ``head``, ``head_no_decay``) and ``family``
    (``clip`` | ``head``) so loggers can report each lr. A model without ``parameter_groups`` is one ``clip``
    family. Frozen parameters are left out.
    """
    m = unwrap(model)
    names = {id(p): n for n, p in m.named_parameters()}
    families = m.parameter_groups() if hasattr(m, "parameter_groups") else {
        "clip": [p for p in m.parameters() if p.requires_grad]}
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []
    for family, params in families.items():
        lr = cfg.lr * (1.0 if family == "clip" else cfg.head_lr_mult)
        decay = [p for p in params if p.requires_grad and not _no_decay(names.get(id(p), ""), p)]
        no_decay = [p for p in params if p.requires_grad and _no_decay(names.get(id(p), ""), p)]
        for p in params:
            if id(p) in seen:
                raise ValueError(f"parameter {names.get(id(p), '?')} is in two parameter groups of the model")
            seen.add(id(p))
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "name": family,
                           "family": family})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{family}_no_decay",
                           "family": family})
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameter")
    return torch.optim.Adam(groups, lr=cfg.lr)


class WarmupCosine:
    """Multiplier of the base lr at iteration ``it``: linear warmup, then cosine to ``min_lr / lr``.

    A class (not a closure) so ``LambdaLR.state_dict()`` saves its fields with the checkpoint.
    """

    def __init__(self, cfg: OptimConfig, steps_per_epoch: int) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is the training loader empty?)")
        if cfg.lr <= 0:
            raise ValueError(f"cfg.optim.lr must be > 0, got {cfg.lr}")
        self.steps_per_epoch = steps_per_epoch
        self.warmup_epochs = cfg.warmup_epochs
        self.warmup_factor = cfg.warmup_factor
        self.epochs = cfg.epochs
        self.floor = cfg.min_lr / cfg.lr

    def __call__(self, it: int) -> float:
        e = it / self.steps_per_epoch
        if e < self.warmup_epochs:
            return self.warmup_factor + (1.0 - self.warmup_factor) * e / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min(max((e - self.warmup_epochs) / span, 0.0), 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine, stepped once per optimiser step (see the module docstring)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg, steps_per_epoch))


def train_one_epoch(model: nn.Module, loader: Iterable[dict[str, Any]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss_cfg: LossConfig,
                    device: torch.device | str, epoch: int, amp: bool = False, grad_clip: float | None = None,
                    log_every: int = 0, progress: bool = True, max_steps: int | None = None,
                    log_fn: Callable[[int, dict[str, float]], None] | None = None,
                    modality_dropout: Sequence[float] | None = None) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``.

    Args:
        model: STMI (or its DDP wrapper) returning ``STMIOutput``.
        loader: training loader; its sampler's ``set_epoch(epoch)`` is called first when it has one, so the P x K
            batches of an epoch are the same whether the epoch runs fresh or after a restart.
        scheduler: stepped after every optimiser step (None: constant lr).
        amp: bf16 autocast, honoured on CUDA only.
        grad_clip: max global gradient norm, or None.
        log_every: call ``log_fn(step, running means)`` every this many steps (0: never).
        progress: a tqdm bar on stderr.
        max_steps: stop after this many steps (smoke tests, benchmarks).
        modality_dropout: per-modality drop probabilities (rgb, nir, tir; ``DataConfig.modality_dropout_rates()``)
            applied to every batch (module docstring); None or all 0: none, and no random number is drawn.

    Returns:
        Mean of each loss term (``G_ce``, ``G_tri``, ...) and of ``loss`` (the total) over the epoch, ``lr`` and
        ``lr_head`` (of the last step), ``steps``, ``triplets`` (this rank), ``time_s`` and ``triplets_per_s``.

    Raises:
        FloatingPointError: the loss became NaN/inf (names the epoch, step and lr: lower ``optim.lr``).
        ValueError: the loader yielded no batch.
    """
    from stmi.losses import stmi_loss

    device = torch.device(device)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    model.train()
    use_amp = amp and device.type == "cuda"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, torch.Tensor] = {}
    steps = triplets = 0
    lr = lr_head = optimizer.param_groups[0]["lr"]
    it = loader
    if progress:
        from tqdm import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        it = tqdm(loader, desc=f"epoch {epoch}", total=total, leave=False, unit="batch")
    t0 = time.perf_counter()
    for batch in it:
        batch = drop_modalities(batch, modality_dropout)
        imgs, kw = model_inputs(batch, device)
        pids = torch.as_tensor(batch["pid"]).to(device, dtype=torch.long)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(*imgs, **kw)
            loss, terms = stmi_loss(out, pids, loss_cfg)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {epoch}, step {steps} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                f"lower optim.lr or set optim.grad_clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        lr_head = next((g["lr"] for g in optimizer.param_groups if g.get("family") == "head"), lr)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for k, v in {"loss": loss.detach(), **terms}.items():
            sums[k] = sums[k] + v.float() if k in sums else v.float().clone()
        steps += 1
        triplets += imgs[0].shape[0]
        if log_fn is not None and log_every and steps % log_every == 0:
            log_fn(steps, {k: float(v) / steps for k, v in sums.items()})
        if progress:
            it.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.2e}")  # type: ignore[union-attr]
        if max_steps is not None and steps >= max_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    if steps == 0:
        raise ValueError("train_one_epoch: the training loader yielded no batch (the P x K sampler needs at least "
                         "batch_size / num_instances identities with num_instances images each)")
    res = {k: float(v) / steps for k, v in sums.items()}
    res.update(lr=float(lr), lr_head=float(lr_head), steps=float(steps), triplets=float(triplets), time_s=dt,
               triplets_per_s=triplets / dt if dt > 0 else float("nan"))
    return res


# --------------------------------------------------------------------------------------------------------------
# Exact checkpoints (model, optimiser, schedule, sampler epoch, RNG states, config)


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) RNG states, as tensors and plain types (``torch.load`` weights_only safe).

    ``generator``: also the state of a specific generator (e.g. the train DataLoader's, which seeds its workers).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].cpu())


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None, sampler_epoch: int, epoch: int,
                     cfg: STMIConfig, generator: torch.Generator | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to continue a run exactly, as a dict for ``torch.save``.

    Args:
        model: the model (a DDP wrapper is unwrapped, so the weights load into a plain model too).
        sampler_epoch: the sampler epoch the next epoch must use (usually ``epoch + 1``).
        epoch: the last COMPLETED epoch (0-based); :func:`restore_state` returns ``epoch + 1``, the next to run.
        cfg: the resolved config, stored as a plain dict (``stmi.config.from_dict`` reads it back).
        generator: the train DataLoader's generator, whose state decides the worker seeds of the next epoch.
        extra: caller's values (best metric so far, MLflow step ...), stored as given.

    The RNG states are captured when this is called: call it at the end of the epoch, before anything else
    draws random numbers, and the restored run draws the same numbers.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "sampler_epoch": int(sampler_epoch),
        "epoch": int(epoch),
        "config": to_dict(cfg),
        "rng": rng_state(generator),
        "extra": dict(extra or {}),
    }


def restore_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                  generator: torch.Generator | None = None, restore_rng: bool = True) -> int:
    """Load a :func:`checkpoint_state` dict into ``model`` / ``optimizer`` / ``scheduler`` and the RNGs.

    Returns:
        The epoch to run next (the stored completed epoch + 1).

    Raises:
        ValueError: not a checkpoint of this format, or its weights do not fit the model (names the mismatch).
    """
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"restore_state: not an STMI checkpoint of format {CHECKPOINT_FORMAT} (got keys "
                         f"{sorted(state)[:8] if isinstance(state, dict) else type(state).__name__})")
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"restore_state: the checkpoint's weights do not fit the model (was it saved with another "
                         f"model config?): {str(e).splitlines()[0]}") from None
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng") is not None:
        set_rng_state(state["rng"], generator)
    return int(state["epoch"]) + 1


# --------------------------------------------------------------------------------------------------------------
# The tokenizer and the exported checkpoint: one owner each


def build_tokenizer(cfg: ModelConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's CLIP tokenizer at the text tower's context length of ``cfg.clip_model``.

    What the loaders tokenise captions with (in their worker processes, so it is picklable) and what serving
    tokenises request captions with; the ids equal ``STMI.tokenize``'s (a test checks it). Built from the config,
    not the model, so the loaders can exist before the model (whose ``num_classes`` they decide).
    """
    from stmi.model.backbone import clip_tokenizer, text_context_length

    return clip_tokenizer(text_context_length(cfg.clip_model))


def export_model(weights: dict[str, torch.Tensor] | nn.Module, cfg: STMIConfig, path: str | Path) -> Path:
    """Write the exported checkpoint ``{"state_dict", "config"}``: the weights a run publishes and serving loads.

    Args:
        weights: a state dict, or a model (a DDP wrapper is unwrapped).
        cfg: the resolved config (with the data-derived ``num_classes`` / ``num_cameras``) the weights belong to.
    """
    state = unwrap(weights).state_dict() if isinstance(weights, nn.Module) else weights
    path = Path(path)
    torch.save({"state_dict": state, "config": to_dict(cfg)}, path)
    return path


def load_exported(path: str | Path) -> dict[str, Any]:
    """Read an :func:`export_model` file (``weights_only``, memory-mapped).

    Raises:
        ValueError: unreadable, or not an exported STMI checkpoint (names the keys found and what to pass).
    """
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read STMI checkpoint {path} ({first}); pass the checkpoints/best.pt artifact a "
                         f"training run wrote") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in EXPORT_KEYS):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an exported STMI checkpoint: expected keys 'state_dict' and 'config' "
                         f"(stmi.engine.export_model writes them), found {keys}")
    return ckpt


def load_exported_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, STMIConfig]:
    """The model of an exported checkpoint, in eval mode on ``device``, and its config.

    The model is built with ``pretrained=None``: the state dict holds every weight, and a serving host need not
    have the CLIP weights the run started from. The returned config says so too.
    """
    ckpt = load_exported(path)
    cfg = from_dict(ckpt["config"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    model = build_model(cfg.model)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the model its config describes: "
                         f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), cfg


# --------------------------------------------------------------------------------------------------------------
# A run: prepare it from a config, fit it with callbacks


@dataclasses.dataclass
class TrainingRun:
    """Everything :func:`fit` trains, built by :func:`prepare_run`."""

    cfg: STMIConfig
    """The resolved config: ``model.num_classes`` / ``model.num_cameras`` are the data's."""
    model: nn.Module
    """What the training step calls (a DDP wrapper in distributed runs); :attr:`core` is the plain STMI."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: Loaders
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    eval_shards: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict, repr=False)
    """This rank's evaluation loaders over its shard of each split (built on first use; distributed runs only)."""

    @property
    def core(self) -> nn.Module:
        """The model without its DDP / compile wrapper (evaluation, checkpoints)."""
        return unwrap(self.model)

    @property
    def is_main(self) -> bool:
        """Rank 0: it validates, tests, selects the best weights and writes checkpoints."""
        return self.rank == 0


def find_unused_parameters(cfg: STMIConfig) -> bool:
    """DDP's ``find_unused_parameters`` for this config: :func:`stmi.model.needs_find_unused_parameters`.

    Every configuration builds only parameters that reach the loss and keeps the rest in the graph with a zero
    gradient, so this is False (``tests/test_ddp_params.py`` checks every ablation); the flag would cost a graph
    traversal per step. Modality dropout does not change it: an absent modality is still encoded and masked, so
    its parameters get a zero gradient (``tests/test_missing_modalities_model.py``).
    """
    from stmi.model.network import needs_find_unused_parameters

    return needs_find_unused_parameters(cfg.model)


def with_data_fields(cfg: STMIConfig, loaders: Loaders) -> STMIConfig:
    """``cfg`` with ``model.num_classes`` (training identities) and ``model.num_cameras`` (0 without SIE) set from
    the loaded data, which decides them (the validation hold-out changes the identity count)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_classes=loaders.num_classes, num_cameras=loaders.num_cameras if cfg.model.use_sie else 0))


def prepare_run(cfg: STMIConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                wrap_model: Callable[[nn.Module, STMIConfig], nn.Module] | None = None) -> TrainingRun:
    """Seed, tokenizer, loaders (this rank's shard), model, optimiser and schedule from a config.

    Args:
        rank, world_size: this process's place in a distributed run (the P x K sampler shards by them); the seed
            is ``optim.seed + rank``.
        device: where the model lives.
        wrap_model: ``(model on device, resolved config) -> model`` (e.g. Ray's ``prepare_model`` for DDP with
            :func:`find_unused_parameters`); the optimiser is built over the wrapped model's parameters.

    Raises:
        DatasetError: the data is missing or malformed (names the path and the fix).
    """
    device = torch.device(device)
    seed_everything(cfg.optim.seed + rank, deterministic=cfg.optim.deterministic)
    if cfg.optim.deterministic and cfg.model.sfm_kernel != "explicit":  # the fused flex kernel is not deterministic
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sfm_kernel="explicit"))
    tokenizer = build_tokenizer(cfg.model)
    loaders = build_loaders(cfg, tokenizer, rank=rank, world_size=world_size)
    cfg = with_data_fields(cfg, loaders)
    model = build_model(cfg.model).to(device)
    if wrap_model is not None:
        model = wrap_model(model, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=len(loaders.train))
    return TrainingRun(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, loaders=loaders,
                       tokenizer=tokenizer, device=device, rank=rank, world_size=world_size)


def evaluate_split(run: TrainingRun, split: str) -> dict[str, Any] | None:
    """Evaluate ``run.core`` on ``"val"`` or ``"test"`` (query against gallery); see :func:`stmi.eval.evaluate`.

    The one place :func:`fit` evaluates. The test split is evaluated on the calling rank alone (the main rank, once,
    with the selected weights only it holds). Validation in a distributed run (``world_size > 1``) is called by
    every rank: each
    extracts the features of its contiguous shard of the split and they are all-gathered
    (:mod:`stmi.distributed_eval`), so extraction time falls with the world size; the main rank scores them and
    the other ranks get None. With one rank it is the plain :func:`stmi.eval.evaluate`.
    """
    loaders = run.loaders
    query, gallery = (loaders.val_query, loaders.val_gallery) if split == "val" else (loaders.query, loaders.gallery)
    if query is None or gallery is None:
        raise ValueError(f"evaluate_split: the run has no {split!r} split (data.val_fraction = 0?)")
    if run.world_size == 1 or split == "test":  # the final test runs once, on the main rank (it holds the weights)
        return evaluate(run.core, query, gallery, run.device, use_scenes=loaders.uses_scenes)
    from stmi.distributed_eval import extract_features_sharded, shard_loader

    def features(loader: Any) -> Any:
        key = (split, id(loader))
        if key not in run.eval_shards:  # built once per split, so its workers are started once
            run.eval_shards[key] = shard_loader(loader, run.rank, run.world_size)
        return extract_features_sharded(run.core, loader, run.device, run.rank, run.world_size,
                                        shard=run.eval_shards[key])

    qf = features(query)
    gf = qf if gallery is query else features(gallery)
    if not run.is_main:
        return None
    return evaluate_features(qf, gf, use_scenes=loaders.uses_scenes, device=run.device)


def evaluate_missing_split(run: TrainingRun, missing: str | None = None) -> dict[str, Any]:
    """The missing-modality protocols ``missing`` (default ``cfg.eval.missing``) on the test split, on the calling
    rank (the main one, with the selected weights, as the test): :func:`stmi.eval_missing.evaluate_missing`.

    Returns:
        ``{protocol: {setting: result}}``; what :func:`fit` puts under ``"missing"`` in the test result.
    """
    from stmi.eval_missing import evaluate_missing

    loaders = run.loaders
    return evaluate_missing(run.core, loaders.query, loaders.gallery, run.device,
                            missing=missing or run.cfg.eval.missing, use_scenes=loaders.uses_scenes,
                            absent=run.cfg.eval.missing_input)


def _from_main_rank(run: TrainingRun, flag: bool) -> bool:
    """The main rank's value of ``flag`` on every rank (a broadcast; gloo on CPU, NCCL on the GPU)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=run.device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def fit(run: TrainingRun, state: FitState | None = None, callbacks: Sequence[Callback] = (), *,
        evaluate_untrained: bool = False, progress: bool | None = None) -> FitState:
    """Train ``run`` from ``state.epoch`` to ``cfg.optim.epochs`` (see the module docstring for the policy).

    Per epoch: :func:`train_one_epoch`; validation every ``optim.eval_every`` epochs and at the last one (features
    extracted by every rank of a distributed run, scored on the main rank), the main rank keeping the weights of the
    best validation mAP (without a validation split: the last epoch's); after the last epoch the main rank tests the
    selected weights (:meth:`Callback.on_test_end`) and puts the trained weights back.
    Then :meth:`Callback.on_epoch_end` on every rank.

    Args:
        state: where to continue (from :func:`load_fit_checkpoint`); None: a fresh run.
        evaluate_untrained: on a fresh run, evaluate the untrained model first (:meth:`Callback.on_untrained`).
        progress: a tqdm bar per epoch; default: on the main rank when stderr is a terminal.

    Returns:
        The final state (``history``, ``best``, ``best_weights``).
    """
    state = state if state is not None else FitState()
    cfg = run.cfg
    has_val = run.loaders.val_query is not None
    if progress is None:
        progress = run.is_main and sys.stderr.isatty()
    if run.world_size > 1:  # validation is collective: every rank must agree on whether it happens
        evaluate_untrained = _from_main_rank(run, evaluate_untrained)
    val0 = None
    if evaluate_untrained and has_val and state.epoch == 0 and (run.is_main or run.world_size > 1):
        with random_state_kept(run.device):  # a run that evaluates it trains exactly as one that does not
            val0 = evaluate_split(run, "val")
    if val0 is not None:
        for cb in callbacks:
            cb.on_untrained(run, {"untrained_val_mAP": val0["mAP"], "untrained_val_R1": val0["R1"]})
    epochs = cfg.optim.epochs
    for epoch in range(state.epoch, epochs):
        last = epoch == epochs - 1
        run.loaders.train_sampler.set_epoch(epoch)
        stats = train_one_epoch(run.model, run.loaders.train, run.optimizer, run.scheduler, cfg.loss, run.device,
                                epoch, amp=cfg.optim.amp, grad_clip=cfg.optim.grad_clip, progress=progress,
                                modality_dropout=cfg.data.modality_dropout_rates())
        metrics: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if has_val and ((epoch + 1) % cfg.optim.eval_every == 0 or last) and (run.is_main or run.world_size > 1):
            val = evaluate_split(run, "val")  # every rank when distributed (sharded extraction), else the main one
        else:
            val = None
        if val is not None:
            metrics.update(val_mAP=val["mAP"], val_R1=val["R1"], val_R5=val["R5"])
            if val["mAP"] > state.best["val_mAP"]:
                state.best = {"val_mAP": val["mAP"], "val_R1": val["R1"], "epoch": epoch}
                state.best_weights = _cpu_copy(run.model)
        if run.is_main and not has_val:  # no validation split: the last epoch is the model
            state.best, state.best_weights = {"val_mAP": float("nan"), "epoch": epoch}, _cpu_copy(run.model)
        metrics.update(best_val_mAP=state.best["val_mAP"], best_epoch=state.best["epoch"])
        if last and run.is_main:
            metrics.update(_test_selected(run, state, callbacks))
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        state.epoch = epoch + 1
        end = EpochEnd(epoch=epoch, metrics=metrics, state=state, last=last)
        for cb in callbacks:
            cb.on_epoch_end(run, end)
    return state


def _test_selected(run: TrainingRun, state: FitState, callbacks: Sequence[Callback]) -> dict[str, float]:
    """Test metrics of the selected weights (swapped in for the test, then the trained weights back)."""
    current = _cpu_copy(run.model) if state.best_weights is not None else None
    if state.best_weights is not None:
        run.core.load_state_dict(state.best_weights)
    try:
        res = evaluate_split(run, "test")
        if run.cfg.eval.missing != "none":
            res["missing"] = evaluate_missing_split(run)
        for cb in callbacks:
            cb.on_test_end(run, res, state.best_weights if state.best_weights is not None else run.core.state_dict())
    finally:
        if current is not None:
            run.core.load_state_dict(current)
    return {"test_mAP": res["mAP"], "test_R1": res["R1"], "test_R5": res["R5"], "test_R10": res["R10"]}


def save_fit_checkpoint(run: TrainingRun, state: FitState, directory: str | Path) -> None:
    """Write :data:`STATE_FILE` (and :data:`BEST_FILE` once weights were selected) into ``directory``.

    Call it right after the epoch (in :meth:`Callback.on_epoch_end`): the RNG states are captured now, so the
    restored run draws the numbers the uninterrupted one would have.
    """
    directory = Path(directory)
    torch.save(checkpoint_state(run.model, run.optimizer, run.scheduler, sampler_epoch=state.epoch,
                                epoch=state.epoch - 1, cfg=run.cfg, generator=run.loaders.train.generator,
                                extra={"history": state.history, "best": state.best}), directory / STATE_FILE)
    if state.best_weights is not None:
        torch.save(state.best_weights, directory / BEST_FILE)


def load_fit_checkpoint(run: TrainingRun, directory: str | Path) -> FitState:
    """Restore ``run`` (model, optimiser, schedule, RNGs, loader generator) from :func:`save_fit_checkpoint`'s files.

    Raises:
        ValueError: the folder holds no STMI training checkpoint, or one of another model config.
    """
    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        raise ValueError(f"load_fit_checkpoint: {directory} has no {STATE_FILE} (not a checkpoint of stmi.engine.fit)")
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    next_epoch = restore_state(saved, run.model, run.optimizer, run.scheduler, generator=run.loaders.train.generator)
    best_weights = None
    if (directory / BEST_FILE).exists():
        best_weights = torch.load(directory / BEST_FILE, map_location="cpu", weights_only=True)
    return FitState(epoch=next_epoch, history=list(saved["extra"]["history"]), best=dict(saved["extra"]["best"]),
                    best_weights=best_weights)
