"""Augmentation on batches of cached uint8 frames: geometry in the loader workers, erasing + normalisation on device.

The cached path (``stmi.data.frame_cache``) stores each triplet as one ``(10, H, W)`` uint8 array already resized to
the run's input size: channels 0-2 RGB, 3-5 NIR, 6-8 TIR, 9 the mask in {0, 1} (zeros without a mask). A training
batch is built in three steps that, together, compute what :class:`stmi.data.transforms.PairedTransform` computes per
item:

1. :func:`draw_params` (worker, NumPy, vectorised over the batch): per triplet a flip, a pad + crop offset and, per
   modality, a random-erasing box; the same distributions as ``PairedTransform`` (flip with ``flip_p``, offsets
   uniform in ``[0, 2 pad]``, timm's ``pixel``-mode box: probability ``erasing_p``, area 2-33 %, log-uniform aspect
   0.3-3.3, up to 10 attempts).
2. :func:`apply_geometry` (worker): one strided copy per triplet from the memory-mapped cache into the batch, flip
   and shift at once, the zero border of the padding written explicitly. The mask is channel 9 of the same copy, so
   it gets exactly the images' geometry.
3. :func:`prepare_batch` (the training process, on the model's device, called by ``stmi.engine.model_inputs``):
   uint8 -> float, CLIP normalisation, and the erasing boxes filled with N(0, 1) noise per modality (train batches
   only; the mask is never erased). A batch without ``frames`` (today's ``TripletDataset`` path) passes through.

A training batch of the cached path therefore carries ``frames`` ``(B, 10, H, W)`` uint8, ``erase`` ``(B, 3, 4)``
int32 boxes ``(top, left, height, width)`` with ``height == 0`` for "no erasing", and its small fields (``pid``,
``camid``, ``text`` ...) as NumPy arrays; after
:func:`prepare_batch` it has the keys of a ``TripletDataset`` batch (``rgb``, ``nir``, ``tir``, ``mask``, ...).
Moving uint8 instead of float cuts the bytes through worker queues, pinned memory and the host-to-device copy by 4x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stmi.data.transforms import CLIP_MEAN, CLIP_STD

CHANNELS = 10
"""Cached channels per triplet: RGB (0-2), NIR (3-5), TIR (6-8), mask (9)."""
MODALITIES = ("rgb", "nir", "tir")
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10


@dataclass
class BatchParams:
    """Augmentation parameters of a batch of ``n`` triplets (see the module docstring)."""

    flip: np.ndarray
    """``(n,)`` bool: horizontal flip (applied before the crop, as ``PairedTransform``)."""
    dy: np.ndarray
    """``(n,)`` int: crop offset minus pad; output row ``y`` is (flipped) input row ``y + dy`` (zero outside)."""
    dx: np.ndarray
    """``(n,)`` int: the same for columns."""
    erase: np.ndarray
    """``(n, 3, 4)`` int32 ``(top, left, height, width)`` per modality; ``height == 0``: not erased."""

    @staticmethod
    def identity(n: int) -> BatchParams:
        """No flip, no shift, no erasing (evaluation)."""
        z = np.zeros(n, np.int64)
        return BatchParams(np.zeros(n, bool), z, z.copy(), np.zeros((n, 3, 4), np.int32))


def draw_params(n: int, rng: np.random.Generator, size: tuple[int, int], flip_p: float = 0.5, pad: int = 10,
                erasing_p: float = 0.5) -> BatchParams:
    """Draw the augmentation of ``n`` triplets at once (same distributions as ``PairedTransform``)."""
    h, w = int(size[0]), int(size[1])
    flip = rng.random(n) < flip_p if flip_p > 0 else np.zeros(n, bool)
    if pad > 0:
        dy = rng.integers(0, 2 * pad + 1, n) - pad
        dx = rng.integers(0, 2 * pad + 1, n) - pad
    else:
        dy = np.zeros(n, np.int64)
        dx = np.zeros(n, np.int64)
    erase = np.zeros((n, 3, 4), np.int32)
    if erasing_p > 0:
        on = rng.random((n, 3)) < erasing_p
        u_area = rng.random((n, 3, ERASE_ATTEMPTS))
        u_ratio = rng.random((n, 3, ERASE_ATTEMPTS))
        area = h * w * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u_area)
        lr0, lr1 = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
        r = np.exp(lr0 + (lr1 - lr0) * u_ratio)
        eh = np.round(np.sqrt(area * r)).astype(np.int64)  # round half to even, as Python's round
        ew = np.round(np.sqrt(area / r)).astype(np.int64)
        ok = (eh > 0) & (eh < h) & (ew > 0) & (ew < w)
        first = ok.argmax(axis=2)[..., None]
        eh = np.take_along_axis(eh, first, 2)[..., 0]
        ew = np.take_along_axis(ew, first, 2)[..., 0]
        on &= ok.any(axis=2)
        top = np.floor(rng.random((n, 3)) * (h - eh + 1)).astype(np.int64)
        left = np.floor(rng.random((n, 3)) * (w - ew + 1)).astype(np.int64)
        erase[..., 0] = np.where(on, top, 0)
        erase[..., 1] = np.where(on, left, 0)
        erase[..., 2] = np.where(on, eh, 0)
        erase[..., 3] = np.where(on, ew, 0)
    return BatchParams(flip=flip, dy=dy, dx=dx, erase=erase)


def apply_geometry(src: np.ndarray, rows: np.ndarray, params: BatchParams, out: np.ndarray) -> np.ndarray:
    """``out[b] = crop(flip(src[rows[b]]))`` for ``(N, C, H, W)`` uint8 ``src`` (e.g. a memory map).

    Equal to ``PairedTransform``'s ``x[:, ::-1]`` then ``np.pad(x, pad)[i:i + H, j:j + W]`` with ``dy = i - pad``,
    ``dx = j - pad``: the pixels shifted in from outside the image are 0.
    """
    _, _, h, w = src.shape
    for b, r in enumerate(rows):
        s = src[int(r)]
        if params.flip[b]:
            s = s[:, :, ::-1]
        dy, dx = int(params.dy[b]), int(params.dx[b])
        y0, y1 = max(0, -dy), min(h, h - dy)
        x0, x1 = max(0, -dx), min(w, w - dx)
        o = out[b]
        if dy or dx:
            o[:, :y0] = 0
            o[:, y1:] = 0
            o[:, y0:y1, :x0] = 0
            o[:, y0:y1, x1:] = 0
        if y1 > y0 and x1 > x0:
            o[:, y0:y1, x0:x1] = s[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        else:
            o[:] = 0
    return out


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it is allocated in shared memory, as ``default_collate``
    does, so handing the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


_F255 = 1.0 / 255.0


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize_frames(frames: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(B, 10, H, W)`` uint8 -> three contiguous ``(B, 3, H, W)`` float32 CLIP-normalised images and the
    ``(B, 1, H, W)`` float mask, on ``frames``' device.

    The float ops are ``PairedTransform``'s, in its order (``x * (1/255) - mean) / std`` in float32), so the results
    are bitwise equal to it.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != CHANNELS:
        raise ValueError(f"frames must be (B, {CHANNELS}, H, W) uint8, got {tuple(frames.shape)} {frames.dtype}")
    mean, std = _stats(frames.device)
    scale = torch.tensor(_F255, dtype=torch.float32, device=frames.device)
    imgs = []
    for k in range(3):
        x = frames[:, 3 * k:3 * k + 3].to(torch.float32, memory_format=torch.contiguous_format)
        imgs.append(x.mul_(scale).sub_(mean).div_(std))
    mask = frames[:, 9:10].to(torch.float32, memory_format=torch.contiguous_format)
    return imgs, mask


def erase_(imgs: list[torch.Tensor], boxes: torch.Tensor | np.ndarray, vectorized: bool | None = None,
           noise: dict[tuple[int, int], torch.Tensor] | None = None,
           generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Fill each modality's box with N(0, 1) noise, in place (timm ``pixel`` mode, after normalisation).

    Args:
        imgs: the three ``(B, 3, H, W)`` normalised images.
        boxes: ``(B, 3, 4)`` ``(top, left, height, width)``, ``height == 0`` = none (on any device).
        vectorized: one masked ``where`` over the whole batch (best on a GPU: three kernels instead of two per box)
            instead of one ``randn`` per box (best on a CPU: noise only where needed). Default: by device type.
        noise: ``{(b, modality): (3, h, w) tensor}`` to use instead of fresh noise (equivalence tests).
        generator: for the fresh noise (default: the device's global generator).
    """
    device = imgs[0].device
    if vectorized is None:
        vectorized = device.type != "cpu"
    if noise is not None:
        vectorized = False
    if vectorized:
        b_ = torch.as_tensor(boxes, device=device).to(torch.long)
        _, _, h, w = imgs[0].shape
        ys = torch.arange(h, device=device).view(1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, w)
        for k, x in enumerate(imgs):
            top, left, eh, ew = (b_[:, k, j].view(-1, 1, 1) for j in range(4))
            inside = (ys >= top) & (ys < top + eh) & (xs >= left) & (xs < left + ew)  # (B, H, W)
            z = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator)
            torch.where(inside.unsqueeze(1), z, x, out=x)
        return imgs
    arr = boxes.cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    for b, k in zip(*np.nonzero(arr[:, :, 2] > 0)):
        top, left, eh, ew = (int(v) for v in arr[b, k])
        z = noise[(int(b), int(k))] if noise is not None else torch.randn(
            (3, eh, ew), device=device, dtype=imgs[k].dtype, generator=generator)
        imgs[k][b, :, top:top + eh, left:left + ew] = z
    return imgs


def prepare_batch(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with model-ready ``rgb``/``nir``/``tir``/``mask`` on ``device`` (the device-side augmentation).

    A cached-path batch (``frames`` uint8) is moved to ``device`` as uint8, normalised there and, when it carries
    ``erase`` boxes (training), erased per modality; its NumPy fields become tensors (on the CPU, as a
    ``TripletDataset`` batch's); every other key is kept. A batch without ``frames`` is returned unchanged, so
    ``stmi.engine.model_inputs`` can call this on any batch.
    """
    frames = batch.get("frames")
    if frames is None:
        return batch
    device = torch.device(device)
    x = torch.as_tensor(frames).to(device, non_blocking=True)
    imgs, mask = normalize_frames(x)
    stamp = batch.get("frames_stamp")
    if stamp is not None:  # a worker's reused buffer (stmi.data.cached_dataset): were those this batch's frames?
        # Checked after the frames were read (a copy from pageable memory has read its source when .to returns; a
        # pinned batch is the pin thread's private copy, frames copied before the stamp).
        if int(stamp.numpy().view(np.int64)[0]) != int(batch["frames_gen"]):
            raise RuntimeError("the frames of this cached training batch were already overwritten by a later batch: "
                               "a batch of the cached training loader is valid until about "
                               "stmi.data.cached_dataset.POOL_BATCHES later batches are drawn from the same worker; "
                               "pass it to prepare_batch (or copy batch['frames']) before drawing more")
    if batch.get("erase") is not None:
        erase_(imgs, batch["erase"])
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()
           if k not in ("frames", "erase", "frames_stamp", "frames_gen")}
    out.update(rgb=imgs[0], nir=imgs[1], tir=imgs[2], mask=mask)
    return out
