"""P x K identity sampler (batch-hard triplet loss needs K images of each of P identities per batch), DDP-aware.

The epoch's batches are built exactly as the reference ``RandomIdentitySampler``: each identity's images are
shuffled (an identity with fewer than K images is sampled with replacement up to K) and cut into groups of K (an
incomplete last group is dropped); then, while at least P identities still have groups, P of them are drawn at
random and each gives its next group. Under DDP the batches are built once for the global batch (P_global =
world_size x P_rank identities) from the same seed and epoch on every rank, and rank r takes the r-th slice of P_rank
identities: the ranks see disjoint identities in a step and together reproduce the single-process batch
composition. Everything is drawn from ``numpy.random.default_rng([seed, epoch])``, so an epoch is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class RandomIdentitySampler(Sampler[int]):
    """Flat indices for a DataLoader with ``batch_size = per_rank_batch`` and ``drop_last=True``.

    Args:
        pids: identity of each record (any hashable ints).
        batch_size: the global batch over all ranks (``cfg.data.batch_size``).
        num_instances: K, images per identity in a batch (``cfg.data.num_instances``).
        seed: base seed (``cfg.optim.seed``); epoch ``e`` uses ``[seed, e]``.
        rank, world_size: this process's slice.

    Raises:
        ValueError: the batch does not split into ranks and groups of K, or there are fewer identities than P.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_instances < 1:
            raise ValueError(f"cfg.data.num_instances must be >= 1, got {num_instances}")
        if batch_size % world_size != 0:
            raise ValueError(f"cfg.data.batch_size ({batch_size}) must be divisible by the number of training workers "
                             f"({world_size}); change cfg.data.batch_size or the worker count")
        per_rank = batch_size // world_size
        if per_rank == 0 or per_rank % num_instances != 0:
            raise ValueError(f"the per-worker batch cfg.data.batch_size // world_size = {batch_size} // {world_size} = "
                             f"{per_rank} must be a positive multiple of cfg.data.num_instances ({num_instances}); "
                             f"change cfg.data.batch_size or cfg.data.num_instances")
        self.batch_size = batch_size
        self.per_rank = per_rank
        self.num_instances = num_instances
        self.p_rank = per_rank // num_instances
        self.p_global = self.p_rank * world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index_by_pid: dict[int, list[int]] = {}
        for i, p in enumerate(pids):
            self.index_by_pid.setdefault(int(p), []).append(i)
        if len(self.index_by_pid) < self.p_global:
            raise ValueError(f"the training split has {len(self.index_by_pid)} identities but a step needs "
                             f"P = cfg.data.batch_size / cfg.data.num_instances = {self.p_global}; lower "
                             f"cfg.data.batch_size or cfg.data.num_instances")
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next ``__iter__`` yields (call it before each epoch, as DDP samplers)."""
        self.epoch = int(epoch)

    def global_batches(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's global batches, each a list of ``P_global`` groups of K record indices (one identity each)."""
        rng = np.random.default_rng([self.seed, epoch])
        k = self.num_instances
        groups: dict[int, list[list[int]]] = {}
        for pid in sorted(self.index_by_pid):
            idxs = np.asarray(self.index_by_pid[pid])
            idxs = rng.choice(idxs, size=k, replace=True) if len(idxs) < k else rng.permutation(idxs)
            groups[pid] = [idxs[j:j + k].tolist() for j in range(0, len(idxs) - k + 1, k)]
        avail = sorted(groups)
        batches: list[list[list[int]]] = []
        while len(avail) >= self.p_global:
            chosen = rng.choice(len(avail), size=self.p_global, replace=False)
            pids = [avail[c] for c in chosen]
            batches.append([groups[p].pop(0) for p in pids])
            avail = [p for p in avail if groups[p]]
        return batches

    def _rank_indices(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            lo, hi = self.rank * self.p_rank, (self.rank + 1) * self.p_rank
            flat = [i for b in self.global_batches(self.epoch) for g in b[lo:hi] for i in g]
            self._cache = (self.epoch, flat)
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices())

    def __len__(self) -> int:
        return len(self._rank_indices())
