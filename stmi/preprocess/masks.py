"""``python -m stmi.preprocess masks``: one foreground mask per triplet, in the format of docs/datasets.md "Masks".

Masks go to ``<dataset dir>/masks/<split folder>/<stem of the RGB file>.png``: single-channel PNG of one modality
frame's size, 0 = background, 255 = foreground. The run is resumable: an existing mask is kept unless
``overwrite``, and each mask is written to a temporary file then renamed, so an interrupted run never leaves a
half-written mask that the next run would skip. A triplet where no foreground is found gets no mask file (the model
then uses plain attention for it (docs/design.md "SFM") instead of an all-background mask that would suppress
everything) and is listed in the summary by path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stmi.data.layouts import Triplet, load_dataset, mask_path
from stmi.data.triplet_dataset import load_frames
from stmi.preprocess.sam2_predictor import Sam2Segmenter, check_sam2, mask_box
from stmi.preprocess.thermal import ThermalParams, thermal_mask

METHODS = ("thermal", "sam2")


@dataclass
class MaskSummary:
    """What a masks run did."""

    written: int = 0
    skipped: int = 0
    """Masks that already existed and were kept (resume)."""
    fractions: list[float] = field(default_factory=list)
    """Foreground share of each mask written."""
    no_foreground: list[Path] = field(default_factory=list)
    """RGB paths of triplets where no foreground was found (no mask written)."""

    @property
    def mean_fraction(self) -> float:
        """Mean foreground share of the masks written (0 when none)."""
        return float(np.mean(self.fractions)) if self.fractions else 0.0

    def format(self) -> str:
        """A human-readable report (printed by the command)."""
        lines = [
            f"masks written: {self.written}",
            f"masks skipped (already present; --overwrite to redo): {self.skipped}",
            f"mean foreground fraction of written masks: {self.mean_fraction:.3f}",
            f"triplets with no foreground found (no mask written): {len(self.no_foreground)}",
        ]
        lines += [f"  {p}" for p in self.no_foreground]
        return "\n".join(lines)


def unique_triplets(dataset: str, root: str | Path) -> tuple[Path, list[Triplet]]:
    """The dataset dir and every triplet once (RGBNT201's test split is both query and gallery)."""
    splits = load_dataset(dataset, root)
    seen: set[tuple[str, str]] = set()
    out = []
    for t in (*splits.train, *splits.query, *splits.gallery):
        key = (t.split_folder, t.name)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return splits.root, out


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a boolean mask as an 8-bit 0/255 PNG, atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


def make_segmenter(
    method: str, checkpoint: str | Path | None = None, sam2_config: str | None = None, device: str = "cpu",
    sam2_image: str = "rgb", params: ThermalParams | None = None,
) -> Callable[[list[np.ndarray]], np.ndarray]:
    """A function (rgb, nir, tir frames as arrays) -> boolean mask for ``method``.

    Raises:
        ValueError: unknown method.
        Sam2Unavailable: ``sam2`` without its package or checkpoint (raised before any image is read).
    """
    if method == "thermal":
        return lambda frames: thermal_mask(frames[2], frames[1], params)
    if method == "sam2":
        check_sam2(checkpoint, sam2_config)
        segment = Sam2Segmenter(checkpoint, sam2_config, device)
        index = {"rgb": 0, "nir": 1, "tir": 2}[sam2_image]

        def sam2_mask(frames: list[np.ndarray]) -> np.ndarray:
            box = mask_box(thermal_mask(frames[2], frames[1], params))
            if box is None:
                return np.zeros(frames[0].shape[:2], dtype=bool)
            return segment(frames[index], box)

        return sam2_mask
    raise ValueError(f"unknown mask method {method!r}; choose one of {list(METHODS)}")


def run_masks(
    dataset: str, root: str | Path, method: str = "thermal", overwrite: bool = False,
    checkpoint: str | Path | None = None, sam2_config: str | None = None, device: str = "cpu",
    sam2_image: str = "rgb", params: ThermalParams | None = None, progress: bool = True,
) -> MaskSummary:
    """Write the masks of every triplet of a dataset; see the module docstring.

    Raises:
        DatasetError: the dataset cannot be read (the message names the path).
        Sam2Unavailable: ``method="sam2"`` without its package or checkpoint.
    """
    segment = make_segmenter(method, checkpoint, sam2_config, device, sam2_image, params)
    droot, triplets = unique_triplets(dataset, root)
    summary = MaskSummary()
    for t in tqdm(triplets, desc=f"masks ({method})", unit="triplet", disable=not progress):
        out = mask_path(droot, t.split_folder, t.name)
        if out.exists() and not overwrite:
            summary.skipped += 1
            continue
        frames = [np.asarray(f) for f in load_frames(t)]
        mask = segment(frames)
        if not mask.any():
            summary.no_foreground.append(t.rgb)
            if out.exists():  # --overwrite: a stale mask must not survive a run that found nothing
                out.unlink()
            continue
        write_mask(out, mask)
        summary.written += 1
        summary.fractions.append(float(mask.mean()))
    return summary
