"""``CachedTripletDataset``: whole batches from the decoded-frame cache (``stmi.data.frame_cache``).

The DataLoader calls :meth:`CachedTripletDataset.__getitems__` with the sampler's indices of one batch (PyTorch's
batched fetch), so a worker assembles the batch with one strided copy per triplet from the memory map and no
per-item collation; :func:`collate_batch` passes it through. Training batches carry ``frames`` uint8, the
``erase`` boxes and their small fields as NumPy arrays; :func:`stmi.data.batch_transforms.prepare_batch` turns them
into normalised, erased images and tensors on the model's device (``stmi.engine.model_inputs`` calls it).
Evaluation batches are normalised here already (so any
consumer of ``rgb`` / ``nir`` / ``tir`` works unchanged) and get no augmentation.

Randomness: each training batch draws one 63-bit seed from torch's generator (the global one, which the DataLoader
seeds per worker as for ``TripletDataset``) and its parameters from ``numpy.random.default_rng(seed)``, so the
augmentation is reproducible under the same seeds and worker count, and a checkpoint's RNG states resume it.
Captions are tokenised once, when the dataset is built, not per item per epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stmi.data.batch_transforms import (
    CHANNELS,
    BatchParams,
    apply_geometry,
    draw_params,
    empty_batch,
    normalize_frames,
    prepare_batch,
)
from stmi.data.frame_cache import FrameCache
from stmi.data.layouts import Triplet

Tokenizer = Any
POOL_BATCHES = 6
"""Shared-memory frame buffers per loader worker, reused in turn (see ``CachedTripletDataset._buffer``)."""


def tokenize_captions(records: Sequence[Triplet], tokenizer: Tokenizer | None, chunk: int = 1024
                      ) -> torch.Tensor | None:
    """``(N, context_length)`` token ids of the records' captions (``""`` for none), tokenised once."""
    if tokenizer is None:
        return None
    texts = [t.caption or "" for t in records]
    parts = [tokenizer(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    return torch.cat(parts) if parts else None


class CachedTripletDataset(Dataset):
    """Triplets served from a :class:`~stmi.data.frame_cache.FrameCache`, batch at a time.

    Args:
        cache: the opened cache of the split the records come from.
        records: the triplets (the split or a subset: validation, training after the hold-out).
        train: training augmentation (flip, pad + crop here, erasing on device); False = normalisation only.
        tokenizer: ``list[str] -> LongTensor``; the captions are tokenised here once. None omits ``text``.
        flip_p, pad, erasing_p: augmentation (``cfg.data``).
        relabel: raw pid -> class index (training); None keeps raw pids.
    """

    def __init__(self, cache: FrameCache, records: Sequence[Triplet], train: bool, tokenizer: Tokenizer | None = None,
                 flip_p: float = 0.5, pad: int = 10, erasing_p: float = 0.5,
                 relabel: dict[int, int] | None = None) -> None:
        self.cache = cache
        self.records = list(records)
        self.rows = cache.rows_of(self.records)
        self.train = train
        self.size = tuple(int(v) for v in cache.manifest["image_size"])
        self.flip_p, self.pad, self.erasing_p = flip_p, pad, erasing_p
        self.text = tokenize_captions(self.records, tokenizer)
        pids = [relabel[t.pid] if relabel is not None else t.pid for t in self.records]
        self.pid = torch.tensor(pids, dtype=torch.long)
        self.camid = torch.tensor([t.camid for t in self.records], dtype=torch.long)
        self.sceneid = torch.tensor([t.sceneid if t.sceneid is not None else -1 for t in self.records],
                                    dtype=torch.long)
        self.has_mask = torch.tensor([t.mask is not None for t in self.records], dtype=torch.bool)
        self.has_caption = torch.tensor([t.caption is not None for t in self.records], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.records)

    def params(self, n: int) -> BatchParams:
        """This batch's augmentation (training), drawn as the module docstring says."""
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
        return draw_params(n, np.random.default_rng(seed), self.size, self.flip_p, self.pad, self.erasing_p)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        n, (h, w) = len(idx), self.size
        frames, stamp, gen = self._buffer((n, CHANNELS, h, w)) if self.train else (empty_batch((n, CHANNELS, h, w)),
                                                                                    None, 0)
        params = self.params(n) if self.train else BatchParams.identity(n)
        apply_geometry(self.cache.frames, self.rows[idx], params, frames.numpy())
        ti = torch.from_numpy(idx)
        batch: dict[str, Any] = {
            "has_mask": self.has_mask[ti], "has_caption": self.has_caption[ti], "pid": self.pid[ti],
            "camid": self.camid[ti], "sceneid": self.sceneid[ti], "index": ti,
        }
        if self.text is not None:
            batch["text"] = self.text[ti]
        if self.train:
            # Small fields travel as NumPy arrays, pickled inline: every tensor leaving a worker costs a shared-memory
            # segment and a file-descriptor pass, which for these few bytes is most of the batch's cost.
            # prepare_batch makes them tensors again.
            batch = {k: v.numpy() for k, v in batch.items()}
            batch["frames"] = frames
            if stamp is not None:  # after "frames": pin_memory copies in this order, so the stamp is checked last
                batch["frames_stamp"] = stamp
                batch["frames_gen"] = np.int64(gen)
            batch["erase"] = params.erase
        else:
            imgs, mask = normalize_frames(frames)
            batch.update(rgb=imgs[0], nir=imgs[1], tir=imgs[2], mask=mask)
        return batch

    def _buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(frames buffer, stamp, generation) for the next training batch.

        In a DataLoader worker the buffers are a ring of :data:`POOL_BATCHES` shared-memory segments reused batch
        after batch: allocating and zero-faulting a fresh segment per batch (what ``default_collate`` does) costs
        more than the batch copy itself. A slot is rewritten only ``POOL_BATCHES`` batches later, when the
        DataLoader (``prefetch_factor`` batches in flight per worker) and a training loop (the current batch) have
        long let go of it; the 8-byte stamp in front of the frames, written before them, lets
        :func:`stmi.data.batch_transforms.prepare_batch` detect a batch kept longer than that (an error, never
        silently changed frames). In the main process (0 workers) a plain tensor is returned.
        """
        info = torch.utils.data.get_worker_info()
        if info is None:
            return empty_batch(shape), None, 0
        pool = self.__dict__.get("_pool")
        if pool is None or pool["pid"] != os.getpid():
            pool = self.__dict__["_pool"] = {"pid": os.getpid(), "slots": [None] * POOL_BATCHES, "count": 0,
                                             "worker": info.id}
        pool["count"] += 1
        k = pool["count"] % POOL_BATCHES
        numel = math.prod(shape)
        slot = pool["slots"][k]
        if slot is None or slot[0].shape != shape:
            storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(8 + numel, device="cpu")
            frames = torch.empty(0, dtype=torch.uint8).set_(storage, 8, shape)
            stamp = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (8,))
            slot = pool["slots"][k] = (frames, stamp)
        gen = (pool["worker"] + 1) << 40 | pool["count"]
        slot[1].numpy().view(np.int64)[0] = gen
        return slot[0], slot[1], gen

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_pool"}

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item in ``TripletDataset``'s format (normalised, erased on the CPU when training)."""
        b = self.__getitems__([index])
        if self.train:
            b = prepare_batch(b, "cpu")
        item = {k: v[0] for k, v in b.items()}
        for k in ("has_mask", "has_caption", "pid", "camid", "sceneid", "index"):
            item[k] = item[k].item()
        return item


def collate_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's ``collate_fn`` for :class:`CachedTripletDataset`: the batch is already assembled."""
    return batch
