"""One epoch of STMI training, the optimiser and schedule, seeding and exact checkpoints; framework-agnostic.

Everything a training worker needs that is not about distribution or tracking: ``orchestration.train`` wraps these
in Ray Train (DDP, checkpoints on S3) and MLflow, and tests call them directly. No Ray or MLflow import here.

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
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from stmi.config import LossConfig, OptimConfig, STMIConfig, to_dict

CHECKPOINT_FORMAT = 1
_NO_DECAY_NAME_PARTS = ("sfm_alpha", "sfm_beta", "logit_scale")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


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


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def model_inputs(batch: dict[str, Any], device: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """(images, keyword arguments) of ``STMI.forward`` from a ``TripletDataset`` batch (docs/ARCHITECTURE.md)."""
    from stmi.data.batch_transforms import prepare_batch  # cached-path batches: uint8 -> augmented, on device

    batch = prepare_batch(batch, device)
    imgs = [_to(batch[k], device) for k in ("rgb", "nir", "tir")]
    kw: dict[str, Any] = {}
    if batch.get("mask") is not None:
        kw["mask"] = _to(batch["mask"], device)
        if batch.get("has_mask") is not None:
            kw["has_mask"] = torch.as_tensor(batch["has_mask"]).to(device, dtype=torch.bool)
    if batch.get("text") is not None:
        kw["text"] = _to(batch["text"], device)
    if batch.get("camid") is not None:
        kw["camid"] = torch.as_tensor(batch["camid"]).to(device, dtype=torch.long)
    return imgs, kw


def train_one_epoch(model: nn.Module, loader: Iterable[dict[str, Any]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss_cfg: LossConfig,
                    device: torch.device | str, epoch: int, amp: bool = False, grad_clip: float | None = None,
                    log_every: int = 0, progress: bool = True, max_steps: int | None = None,
                    log_fn: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
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
