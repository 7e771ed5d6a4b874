"""Evaluation feature extraction sharded over the ranks of a ``torch.distributed`` group.

Each rank embeds one contiguous slice of the evaluation dataset (rank r gets records ``[r N / W, (r + 1) N / W)``)
and the slices are all-gathered in rank order, so every rank ends with the features of the whole split in dataset
order and the extraction time falls with the world size instead of rank 0 doing it all while the others wait.
Works with any backend (gloo on CPU, NCCL on GPUs); with ``world_size == 1`` no collective is called.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from stmi.eval import Features, extract_features

__all__ = ["extract_features_sharded", "gather_features", "shard_loader", "shard_range"]


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous record indices of ``rank``: sizes differ by at most one, earlier ranks get the extra."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: rank {rank} is not in a world of size {world_size}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """A loader over ``rank``'s contiguous shard of ``loader.dataset``, with the loader's batch size, collate
    function and workers (build it once per split and reuse it: each evaluation then skips the worker start-up)."""
    if world_size == 1:
        return loader
    ds = loader.dataset
    return DataLoader(Subset(ds, list(shard_range(len(ds), rank, world_size))), batch_size=loader.batch_size,
                      shuffle=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, persistent_workers=loader.num_workers > 0)


def _empty(dim: int) -> Features:
    z = np.zeros(0, dtype=np.int64)
    return Features(feats=torch.zeros(0, dim), pids=z, camids=z.copy(), sceneids=z.copy())


def gather_features(local: Features | None, world_size: int, device: torch.device | str = "cpu") -> Features:
    """All-gather every rank's :class:`Features` (``None`` for an empty shard) and concatenate them in rank order.

    ``device``: where the collective's tensors live (the rank's GPU with NCCL, the CPU with gloo). The result is on
    the CPU, as :func:`stmi.eval.extract_features` returns it.
    """
    if world_size == 1:
        if local is None:
            raise ValueError("gather_features: a single rank with no features (empty split?)")
        return local
    device = torch.device(device)
    n = 0 if local is None else local.feats.shape[0]
    dim = 0 if local is None else local.feats.shape[1]
    meta = torch.tensor([n, dim], dtype=torch.long, device=device)
    metas = [torch.zeros_like(meta) for _ in range(world_size)]
    dist.all_gather(metas, meta)
    sizes = [int(m[0]) for m in metas]
    dim = max(int(m[1]) for m in metas)
    if sum(sizes) == 0:
        raise ValueError("gather_features: no rank extracted any feature (empty split?)")
    if local is None:
        local = _empty(dim)
    pad = max(sizes)
    # One float block (features) and one int64 block (pid, camid, sceneid) per rank, padded to the largest shard.
    fl = torch.zeros(pad, dim, dtype=torch.float32, device=device)
    fl[:n] = local.feats.to(device)
    ints = torch.zeros(pad, 3, dtype=torch.long, device=device)
    ints[:n] = torch.from_numpy(np.stack([local.pids, local.camids, local.sceneids], axis=1)).to(device)
    fls = [torch.empty_like(fl) for _ in range(world_size)]
    intss = [torch.empty_like(ints) for _ in range(world_size)]
    dist.all_gather(fls, fl)
    dist.all_gather(intss, ints)
    feats = torch.cat([f[:s] for f, s in zip(fls, sizes)]).cpu()
    meta_all = torch.cat([i[:s] for i, s in zip(intss, sizes)]).cpu().numpy()
    return Features(feats=feats, pids=meta_all[:, 0].copy(), camids=meta_all[:, 1].copy(),
                    sceneids=meta_all[:, 2].copy())


def extract_features_sharded(model: torch.nn.Module, loader: DataLoader, device: torch.device | str, rank: int,
                             world_size: int, amp: bool = False, use_camid: bool = True,
                             shard: DataLoader | None = None) -> Features:
    """:func:`stmi.eval.extract_features` over ``rank``'s contiguous shard, all-gathered: every rank returns the
    features of the whole ``loader.dataset`` in dataset order (the same as one process extracting everything).

    Args:
        loader: the full evaluation loader (``shuffle=False``); its dataset is sharded.
        rank, world_size: of the default process group (world 1: no collective, the plain extraction).
        shard: a loader from :func:`shard_loader` built once, to reuse its workers across evaluations.
    """
    if world_size == 1:
        return extract_features(model, loader, device, amp=amp, use_camid=use_camid)
    part = shard if shard is not None else shard_loader(loader, rank, world_size)
    local = None
    if len(part.dataset) > 0:  # type: ignore[arg-type]
        local = extract_features(model, part, device, amp=amp, use_camid=use_camid)
    backend = dist.get_backend()
    comm_device: Any = torch.device(device) if backend == "nccl" else "cpu"
    return gather_features(local, world_size, comm_device)
