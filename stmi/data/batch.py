"""The one conversion of a batch (the dict a ``TripletDataset`` loader yields) into ``STMI`` arguments.

Training (``stmi.engine.train_one_epoch``), feature extraction (``stmi.eval.extract_features``) and serving (the
MLflow pyfunc builds the same dict from request rows) all call :func:`model_inputs`, so the three cannot disagree on
which keys reach the model. It lives under ``stmi.data`` (the batch format is the dataset's) so that both
``stmi.eval`` and ``stmi.engine`` can use it without importing each other; ``stmi.engine.model_inputs`` is the same
function.

Modality dropout (``data.modality_dropout``; docs/design.md "Missing modalities") is applied to training batches by
:func:`drop_modalities`, before :func:`model_inputs`: it sets the batch's ``presence`` key, which ``model_inputs``
passes to the model like any other. :func:`draw_presence` states the exact distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MODALITIES = ("rgb", "nir", "tir")
"""The columns of ``presence``."""
_SUBSETS = torch.tensor([[(k >> (2 - m)) & 1 for m in range(3)] for k in range(7, 0, -1)], dtype=torch.bool)
"""The 7 non-empty kept subsets as (7, 3) bool rows, all three kept first."""


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def model_inputs(batch: dict[str, Any], device: torch.device | str,
                 use_camid: bool = True) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``(images, keyword arguments)`` of ``STMI.forward`` / ``STMI.embed`` from a batch (docs/ARCHITECTURE.md).

    Args:
        batch: ``rgb``/``nir``/``tir`` ``(B, 3, H, W)`` (or, from the frame cache, ``frames`` uint8 with ``erase``
            boxes, which :func:`stmi.data.batch_transforms.prepare_batch` turns into those on ``device``); optional
            ``mask`` ``(B, 1, H, W)`` with ``has_mask``
            ``(B,)``, ``text`` token ids, ``camid`` ``(B,)``, ``presence`` ``(B, 3)`` bool (columns rgb, nir, tir;
            False = that modality is absent, its frame is not used: ``STMI.forward``). Absent or None keys are not
            passed to the model.
        use_camid: pass ``camid`` (the SIE term); evaluation may switch it off.
    """
    from stmi.data.batch_transforms import prepare_batch  # cached-path batches: uint8 -> augmented, on the device

    device = torch.device(device)
    batch = prepare_batch(batch, device)
    imgs = [_to(batch[k], device) for k in ("rgb", "nir", "tir")]
    kw: dict[str, Any] = {}
    if batch.get("mask") is not None:
        kw["mask"] = _to(batch["mask"], device)
        if batch.get("has_mask") is not None:
            kw["has_mask"] = torch.as_tensor(batch["has_mask"]).to(device, dtype=torch.bool)
    if batch.get("text") is not None:
        kw["text"] = _to(batch["text"], device)
    if use_camid and batch.get("camid") is not None:
        kw["camid"] = torch.as_tensor(batch["camid"]).to(device, dtype=torch.long)
    if batch.get("presence") is not None:
        kw["presence"] = torch.as_tensor(batch["presence"]).to(device, dtype=torch.bool)
    return imgs, kw


def draw_presence(n: int, rates: Sequence[float], available: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Which modalities of ``n`` samples are kept by modality dropout: ``(n, 3)`` bool, columns rgb, nir, tir.

    The distribution, per sample with available modalities A (``available``'s row; all three when None): each
    modality m in A is dropped independently with probability ``rates[m]``, conditioned on at least one being kept.
    So the kept set S (a non-empty subset of A) has probability

        P(S) = prod_{m in A, m not in S} r_m * prod_{m in S} (1 - r_m) / (1 - prod_{m in A} r_m),

    which is what redrawing until one modality survives gives (with A = all three, modality m is absent with
    probability ``(r_m - r_1 r_2 r_3) / (1 - r_1 r_2 r_3)``). A sample whose available modalities all have rate 1
    (the denominator 0) keeps A. Unavailable modalities stay absent.

    One uniform number per sample is drawn from ``generator`` (default: torch's global CPU generator, which
    ``stmi.engine.seed_everything`` seeds and the training checkpoints save), so a run is reproducible and resumes
    exactly; the kept set is the categorical inverse CDF of that number over the 7 subsets in a fixed order.

    Raises:
        ValueError: a rate outside [0, 1] or not three of them, or ``available`` of the wrong shape or with an empty row.
    """
    r = torch.as_tensor([float(x) for x in rates], dtype=torch.float64)
    if r.shape != (3,) or bool(((r < 0) | (r > 1)).any()):
        raise ValueError(f"modality dropout rates must be three probabilities in [0, 1] (rgb, nir, tir), got "
                         f"{list(rates)}; check data.modality_dropout and data.modality_dropout_scale")
    avail = torch.ones(n, 3, dtype=torch.bool) if available is None else torch.as_tensor(available).bool().cpu()
    if avail.shape != (n, 3):
        raise ValueError(f"available has shape {tuple(avail.shape)}, expected ({n}, 3)")
    if n and not bool(avail.any(dim=1).all()):
        raise ValueError("available: a sample has no modality to keep (every row needs one True)")
    s = _SUBSETS.unsqueeze(0)  # (1, 7, 3)
    a = avail.unsqueeze(1)  # (n, 1, 3)
    factor = torch.where(a, torch.where(s, 1.0 - r, r), torch.where(s, 0.0, 1.0).to(torch.float64))
    weight = factor.prod(dim=2)  # (n, 7): 0 for subsets that keep an unavailable modality
    total = weight.sum(dim=1, keepdim=True)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64) * total
    # subset k when cum[k-1] <= u < cum[k]: a zero-weight subset (flat cumulative sum) is never picked
    idx = (weight.cumsum(dim=1) <= u).sum(dim=1).clamp_max(len(_SUBSETS) - 1)
    pick = _SUBSETS[idx]
    bad = (total.squeeze(1) <= 0) | (pick & ~avail).any(dim=1)  # nothing can be dropped; or a rounding edge
    return torch.where(bad.unsqueeze(1), avail, pick)


def drop_modalities(batch: dict[str, Any], rates: Sequence[float] | None,
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """The training batch with modality dropout applied: its ``presence`` key set from :func:`draw_presence`.

    A batch that already says which modalities it has (``presence``) only loses present ones. With no rate above 0
    the batch is returned as it is and no random number is drawn, so a run without dropout is bit-identical to one
    from before the option existed. The batch size is that of ``pid`` (present in every training batch, cached or
    not).
    """
    if rates is None or not any(float(x) > 0 for x in rates):
        return batch
    n = int(np.asarray(batch["pid"]).reshape(-1).shape[0])
    given = batch.get("presence")
    presence = draw_presence(n, rates, None if given is None else torch.as_tensor(given), generator)
    return {**batch, "presence": presence}
