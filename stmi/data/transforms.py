"""Paired transforms: one geometry for the three modalities and the mask, photometric noise per modality.

The mask says which pixels are foreground in every modality (docs/datasets.md "Masks"), so a flip or crop applied to
the images and not to the mask would teach SFM the wrong tokens. The geometric steps therefore run once on a stack of
the three images and the mask; random erasing (an occlusion augmentation) then runs independently per modality and
never touches the mask, which keeps describing the true object. The steps and defaults follow the anchors' recipe
(docs/design.md "Training recipe"): bicubic resize, horizontal flip, zero pad + random crop, random erasing in timm's
``pixel`` mode (normal noise after normalisation, area 2-33 %, aspect 0.3-3.3), CLIP mean/std normalisation.

Randomness comes from ``torch``'s generator (the global one unless one is passed), which DataLoader seeds per worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""open_clip's OPENAI_DATASET_MEAN (copied so this module does not import open_clip)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""open_clip's OPENAI_DATASET_STD."""


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """``(C, H, W)`` float in [0, 1] (``L`` images give one channel)."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255.0)


_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(1, 1, 3)
_STD = np.asarray(CLIP_STD, dtype=np.float32).reshape(1, 1, 3)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std normalisation of a ``(3, H, W)`` tensor in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def erase_box(h: int, w: int, p: float, generator: torch.Generator | None = None,
              area: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3)
              ) -> tuple[int, int, int, int] | None:
    """timm's ``RandomErasing(mode="pixel", max_count=1)`` box: with probability ``p`` (top, left, height, width)."""
    if p <= 0 or torch.rand((), generator=generator).item() >= p:
        return None
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        a = h * w * (area[0] + (area[1] - area[0]) * torch.rand((), generator=generator).item())
        r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand((), generator=generator).item())
        eh, ew = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, (), generator=generator))
            left = int(torch.randint(0, w - ew + 1, (), generator=generator))
            return top, left, eh, ew
    return None


def resize_stack(images: Sequence[Image.Image], mask: Image.Image | None, size: tuple[int, int]) -> np.ndarray:
    """The frames resized to ``size`` (H, W) bicubic, and the mask nearest + binarised, stacked ``(H, W, 3n [+1])``.

    The one resize of the pipeline: :class:`PairedTransform` and the decoded-frame cache
    (``stmi.data.frame_cache``) both call it, so cached frames are exactly what the transform would compute.
    """
    h, w = int(size[0]), int(size[1])
    parts = [np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC)) for im in images]
    if mask is not None:
        m = np.asarray(mask.convert("L").resize((w, h), Image.NEAREST))
        parts.append((m > 0).astype(np.uint8)[:, :, None])
    return np.concatenate(parts, axis=2)


class PairedTransform:
    """Resize (+ flip, pad + crop, erasing when training) three modality images and their mask together.

    The work is done on uint8 / float32 NumPy arrays (single-threaded by design: a DataLoader runs many of these in
    parallel, and torch's intra-op threads on small tensors only contend with the training process for cores).

    Args:
        image_size: output (H, W), ``cfg.model.image_size``.
        train: training augmentation on; off = resize and normalise only (evaluation).
        flip_p: horizontal flip probability (``cfg.data.flip_p``).
        pad: zero padding before the random crop back to ``image_size`` (``cfg.data.pad``).
        erasing_p: random-erasing probability, drawn independently per modality (``cfg.data.erasing_p``).
    """

    def __init__(self, image_size: tuple[int, int], train: bool, flip_p: float = 0.5, pad: int = 10,
                 erasing_p: float = 0.5) -> None:
        self.size = (int(image_size[0]), int(image_size[1]))
        self.train = train
        self.flip_p = flip_p
        self.pad = pad
        self.erasing_p = erasing_p

    def __call__(self, images: Sequence[Image.Image], mask: Image.Image | None = None,
                 generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Return the normalised ``(3, H, W)`` images and the ``(1, H, W)`` mask in {0, 1} (or None)."""
        h, w = self.size
        x = resize_stack(images, mask, self.size)  # (H, W, 3 * n [+ 1]) uint8: one geometry for everything
        if self.train:
            if self.flip_p > 0 and torch.rand((), generator=generator).item() < self.flip_p:
                x = x[:, ::-1]
            if self.pad > 0:
                p = self.pad
                i = int(torch.randint(0, 2 * p + 1, (), generator=generator))
                j = int(torch.randint(0, 2 * p + 1, (), generator=generator))
                x = np.pad(x, ((p, p), (p, p), (0, 0)))[i:i + h, j:j + w]
        out = []
        for k in range(len(images)):
            im = (x[:, :, 3 * k:3 * k + 3].astype(np.float32) * np.float32(1 / 255) - _MEAN) / _STD
            im = np.ascontiguousarray(im.transpose(2, 0, 1))
            box = erase_box(h, w, self.erasing_p, generator) if self.train else None
            if box is not None:
                top, left, eh, ew = box
                noise = torch.randn((3, eh, ew), generator=generator).numpy()
                im[:, top:top + eh, left:left + ew] = noise
            out.append(torch.from_numpy(im))
        mt = None
        if mask is not None:
            mt = torch.from_numpy(np.ascontiguousarray(x[:, :, -1:].transpose(2, 0, 1)).astype(np.float32))
        return out, mt
