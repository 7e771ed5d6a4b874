"""``TripletDataset``: decoded, transformed triplets as the dicts the model and the engine consume.

Item keys (docs/ARCHITECTURE.md): ``rgb``, ``nir``, ``tir`` ``(3, H, W)`` normalised; ``mask`` ``(1, H, W)`` in
{0, 1} (zeros when the triplet has none); ``has_mask`` bool; ``text`` token ids ``(context_length,)`` (only when a
tokenizer is given; a triplet without a caption is tokenised as ``""``, docs/design.md "Captions"); ``has_caption``
bool; ``pid`` (relabelled when ``relabel`` is given), ``camid`` (0-based), ``sceneid`` (-1 when the dataset has none)
and ``index`` (position in ``records``).

A file that cannot be decoded raises :class:`DatasetError` naming the path. Inside a DataLoader worker PyTorch
re-raises the same exception type in the main process, so training stops with the path in the message instead of a
PIL traceback deep inside a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from stmi.data.layouts import DatasetError, Triplet
from stmi.data.transforms import PairedTransform

Tokenizer = Callable[[list[str]], torch.Tensor]


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Fully decode an image (so a truncated JPEG fails here, not later) and convert it to ``mode``."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise DatasetError(f"image file {path} is missing; re-copy it or remove the triplet "
                           f"(python -m stmi.data check lists all such files)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot decode image {path} ({e}): the file is corrupt or not an image; re-copy it from "
                           f"the original dataset or remove the triplet") from None


def load_frames(t: Triplet) -> list[Image.Image]:
    """The RGB, NIR and TIR frames of a triplet (RGBNT100: the three thirds of its side-by-side file)."""
    if t.frames is None:
        return [open_image(p) for p in (t.rgb, t.nir, t.tir)]
    im = open_image(t.rgb)
    w, h = im.size
    if w % 3 != 0:
        raise DatasetError(f"{t.rgb} is {w}x{h}: a packed RGBNT100 file holds three frames side by side (width a "
                           f"multiple of 3, e.g. 768x128); re-export it")
    fw = w // 3
    return [im.crop((f * fw, 0, (f + 1) * fw, h)) for f in t.frames]


def load_mask(t: Triplet, frame_size: tuple[int, int]) -> Image.Image | None:
    """The triplet's mask as an ``L`` image, checked to have the size ``(W, H)`` of one modality frame."""
    if t.mask is None:
        return None
    try:
        with Image.open(t.mask) as im:
            im.load()
            m = im.convert("L")
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read mask {t.mask} ({e}); regenerate it (python -m stmi.preprocess masks) "
                           f"or delete it") from None
    if m.size != frame_size:
        raise DatasetError(f"mask {t.mask} is {m.size[0]}x{m.size[1]} but the frames of {t.rgb} are "
                           f"{frame_size[0]}x{frame_size[1]} (W x H); a mask must have the size of one modality frame: "
                           f"regenerate it")
    return m


class TripletDataset(Dataset):
    """Triplets read from disk and transformed (paired geometry, per-modality erasing).

    Args:
        records: the triplets (``stmi.data.layouts.read_split`` or a loader's record list).
        image_size: output (H, W) (``cfg.model.image_size``).
        train: training augmentation (flip, pad + crop, erasing); False = resize + normalise.
        tokenizer: ``list[str] -> LongTensor (n, context_length)``, e.g. ``STMI.tokenize``; None omits ``text``.
        flip_p, pad, erasing_p: augmentation (``cfg.data``).
        relabel: map raw pid -> class index (training); None keeps raw pids (evaluation).
    """

    def __init__(self, records: Sequence[Triplet], image_size: tuple[int, int], train: bool,
                 tokenizer: Tokenizer | None = None, flip_p: float = 0.5, pad: int = 10, erasing_p: float = 0.5,
                 relabel: dict[int, int] | None = None) -> None:
        self.records = list(records)
        self.transform = PairedTransform(image_size, train, flip_p=flip_p, pad=pad, erasing_p=erasing_p)
        self.tokenizer = tokenizer
        self.relabel = relabel

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        t = self.records[index]
        frames = load_frames(t)
        mask = load_mask(t, frames[0].size)
        (rgb, nir, tir), m = self.transform(frames, mask)
        h, w = self.transform.size
        item: dict[str, Any] = {
            "rgb": rgb, "nir": nir, "tir": tir,
            "mask": m if m is not None else torch.zeros(1, h, w),
            "has_mask": m is not None,
            "has_caption": t.caption is not None,
            "pid": self.relabel[t.pid] if self.relabel is not None else t.pid,
            "camid": t.camid,
            "sceneid": t.sceneid if t.sceneid is not None else -1,
            "index": index,
        }
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([t.caption or ""])[0]
        return item
