"""SAM2 masks prompted with the box of the thermal mask (the paper used SAM2; its prompts are not published).

The ``sam2`` package and its checkpoint are optional (``pip install 'stmi[sam2]'`` plus a checkpoint file the user
downloads): :func:`check_sam2` reports everything that is missing in one message before any image is read.
Why a thermal box: SAM2 needs a prompt to know which object a ReID crop is about, and the warm region of the TIR
frame is a reliable, weight-free localisation of it; SAM2 then refines the boundary on the chosen frame.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


class Sam2Unavailable(RuntimeError):
    """The sam2 method cannot run: the package, the checkpoint or its config is missing (message says which)."""


def infer_config(checkpoint: Path) -> str:
    """The SAM2 model config shipped inside the ``sam2`` package that matches an official checkpoint name.

    ``sam2.1_hiera_large.pt`` -> ``configs/sam2.1/sam2.1_hiera_l.yaml``, ``sam2_hiera_small.pt`` ->
    ``configs/sam2/sam2_hiera_s.yaml``. Other names need ``--sam2-config``.
    """
    m = re.fullmatch(r"(sam2(?:\.1)?)_hiera_(tiny|small|base_plus|large)", checkpoint.stem)
    if not m:
        raise Sam2Unavailable(
            f"cannot tell the SAM2 model size from the checkpoint name {checkpoint.name!r}; pass --sam2-config "
            f"(e.g. configs/sam2.1/sam2.1_hiera_l.yaml for a large SAM2.1 checkpoint)"
        )
    version, size = m.groups()
    return f"configs/{version}/{version}_hiera_{_SIZES[size]}.yaml"


def check_sam2(checkpoint: str | Path | None, config: str | None = None) -> tuple[Path, str]:
    """Validate the sam2 method's requirements; return ``(checkpoint path, config name)``.

    Raises:
        Sam2Unavailable: listing every missing piece (package -> ``pip install 'stmi[sam2]'``; ``--checkpoint``
            not given or not a file).
    """
    problems = []
    if importlib.util.find_spec("sam2") is None:
        problems.append("the 'sam2' package is not installed: pip install 'stmi[sam2]'")
    ckpt: Path | None = None
    if checkpoint is None:
        problems.append(
            "no SAM2 checkpoint given: pass --checkpoint PATH to a local file such as sam2.1_hiera_large.pt "
            "(downloaded from the SAM2 release page; nothing is downloaded automatically)"
        )
    else:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            problems.append(f"SAM2 checkpoint {ckpt} does not exist or is not a file: fix --checkpoint")
    if problems:
        raise Sam2Unavailable("--method sam2 cannot run:\n  - " + "\n  - ".join(problems))
    assert ckpt is not None
    return ckpt, config or infer_config(ckpt)


class Sam2Segmenter:
    """A SAM2 image predictor that turns (image, box) into a boolean mask."""

    def __init__(self, checkpoint: str | Path | None, config: str | None = None, device: str = "cpu") -> None:
        ckpt, cfg = check_sam2(checkpoint, config)
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        try:
            model = build_sam2(cfg, str(ckpt), device=device)
        except Exception as exc:  # hydra / state-dict errors: name the files involved
            raise Sam2Unavailable(
                f"cannot build SAM2 from config {cfg!r} and checkpoint {ckpt}: {exc}; check that they match "
                f"(--sam2-config)"
            ) from exc
        self.predictor = SAM2ImagePredictor(model)

    def __call__(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Mask of the object inside ``box`` = (x0, y0, x1, y1) on an (H, W, 3) uint8 RGB image."""
        import torch

        with torch.inference_mode():
            self.predictor.set_image(image)
            masks, _, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32), multimask_output=False)
        return np.asarray(masks[0]) > 0


def mask_box(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int] | None:
    """The bounding box (x0, y0, x1, y1) of a boolean mask grown by ``margin`` of its size, None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape
    dy = int(round(margin * (ys.max() - ys.min() + 1)))
    dx = int(round(margin * (xs.max() - xs.min() + 1)))
    return (max(0, xs.min() - dx), max(0, ys.min() - dy), min(w - 1, xs.max() + dx), min(h - 1, ys.max() + dy))
