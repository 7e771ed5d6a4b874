"""What :func:`stmi.engine.fit` hands its callbacks: the loop's state, the end of an epoch, and the hooks.

Kept apart from ``stmi.engine`` (and free of torch imports) so that a platform can define its callbacks in a module
that its command line imports without paying for torch: ``orchestration.train`` does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from stmi.engine import TrainingRun


@dataclasses.dataclass
class FitState:
    """What :func:`stmi.engine.fit` carries from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0
    """The next epoch to run."""
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    """Numeric metrics of every completed epoch (MLflow fills steps it lacks from this after a restart)."""
    best: dict[str, float] = dataclasses.field(default_factory=lambda: {"val_mAP": -1.0, "epoch": -1})
    """``val_mAP``, ``val_R1`` and ``epoch`` of the selected weights."""
    best_weights: dict[str, torch.Tensor] | None = None
    """The selected weights (CPU copies) on the main rank, or None before the first selection."""


@dataclasses.dataclass
class EpochEnd:
    """What :meth:`Callback.on_epoch_end` receives."""

    epoch: int
    metrics: dict[str, Any]
    """``epoch``, ``train_*`` (of :func:`stmi.engine.train_one_epoch`), ``val_mAP/R1/R5`` when validated,
    ``best_val_mAP``, ``best_epoch``, and ``test_mAP/R1/R5/R10`` after the last epoch (main rank)."""
    state: FitState
    """The state after this epoch (``state.epoch == epoch + 1``)."""
    last: bool


class Callback:
    """Per-epoch hooks of :func:`stmi.engine.fit` (no-ops here; override what you need). Called in list order."""

    def on_untrained(self, run: TrainingRun, metrics: dict[str, float]) -> None:
        """Main rank, before the first epoch of a fresh run, when ``fit(..., evaluate_untrained=True)``: the untrained
        model's ``untrained_val_mAP`` / ``untrained_val_R1`` (the reference point for "learnt")."""

    def on_test_end(self, run: TrainingRun, result: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        """Main rank, last epoch, before :meth:`on_epoch_end`: the full test result (``cmc``, ``top10`` ...) of
        the selected ``weights`` (loaded in ``run.core`` during the call); with ``cfg.eval.missing`` set, also
        ``result["missing"]`` = ``{protocol: {setting: result}}`` (:func:`stmi.eval_missing.evaluate_missing`)."""

    def on_epoch_end(self, run: TrainingRun, end: EpochEnd) -> None:
        """Every rank, after every epoch (checkpoint with :func:`stmi.engine.save_fit_checkpoint`, report, log)."""
