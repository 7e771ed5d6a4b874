"""The one conversion of a batch (the dict a ``TripletDataset`` loader yields) into ``STMI`` arguments.

Training (``stmi.engine.train_one_epoch``), feature extraction (``stmi.eval.extract_features``) and serving (the
MLflow pyfunc builds the same dict from request rows) all call :func:`model_inputs`, so the three cannot disagree on
which keys reach the model. It lives under ``stmi.data`` (the batch format is the dataset's) so that both
``stmi.eval`` and ``stmi.engine`` can use it without importing each other; ``stmi.engine.model_inputs`` is the same
function.
"""

from __future__ import annotations

from typing import Any

import torch


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
