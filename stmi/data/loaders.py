"""``build_loaders``: the train, validation and test DataLoaders of a run from its config.

Model selection never looks at the test set (a fault of the anchors' code, docs/datasets.md): a fraction
``cfg.data.val_fraction`` of the training identities is held out, deterministically from ``cfg.optim.seed``, and split
into a validation query and gallery by :func:`split_validation`. ``cfg.data.select_on_test`` reproduces the anchors'
habit instead (the validation loaders are the test loaders, with a warning).

Training pids are relabelled to 0..C-1 (``Loaders.pid_to_label``) for the classifiers; evaluation loaders keep the
raw pids. The evaluation loaders are not sharded by rank (evaluate on one rank). RGBNT201's query and gallery are the
same test set: ``Loaders.gallery is Loaders.query`` then, so an evaluator can extract the features once.

``cfg.data.cache`` (default on) serves every loader from the decoded-frame cache (``stmi.data.frame_cache``: each
split decoded once per node and input size, memory-mapped by all workers and trials) through
``stmi.data.cached_dataset.CachedTripletDataset``: training batches carry uint8 ``frames`` + ``erase`` boxes, which
``stmi.engine.model_inputs`` turns into normalised, erased images on the device
(``stmi.data.batch_transforms.prepare_batch``); evaluation batches are already normalised. Off, the loaders read the
image files per item through ``TripletDataset`` (the original path).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from stmi.config import STMIConfig
from stmi.data.cached_dataset import CachedTripletDataset, collate_batch
from stmi.data.layouts import DatasetError, Triplet, load_dataset
from stmi.data.sampler import RandomIdentitySampler
from stmi.data.triplet_dataset import Tokenizer, TripletDataset

log = logging.getLogger("stmi.data")


def _valid_val_split(records: Sequence[Triplet], by_scene: bool) -> tuple[list[Triplet], list[Triplet]]:
    """One identity's records -> (queries, gallery) by the rule of :func:`split_validation`."""
    group = (lambda t: t.sceneid) if by_scene else (lambda t: t.camid)
    firsts: dict[object, Triplet] = {}
    gallery: list[Triplet] = []
    for t in records:
        if group(t) in firsts:
            gallery.append(t)
        else:
            firsts[group(t)] = t
    queries = []
    for g, t in firsts.items():
        if any(group(x) != g for x in gallery):
            queries.append(t)
        else:
            gallery.append(t)
    gallery.sort(key=lambda t: t.name)
    return queries, gallery


def split_validation(records: Sequence[Triplet], fraction: float, seed: int, by_scene: bool = False
                     ) -> tuple[list[Triplet], list[Triplet], list[Triplet]]:
    """Hold out ``fraction`` of the training identities as a validation query/gallery.

    Rule: an identity is eligible when it can yield a valid query: for each of its cameras (MSVR310: scenes, whose
    matches the evaluator removes) its first image in name order is a query candidate and every other image goes to
    the gallery; a candidate is kept as a query only if the gallery holds an image of its identity from another
    camera (scene), else it joins the gallery. ``round(fraction x #identities)`` (at least 1) eligible identities are
    drawn with ``numpy.random.default_rng(seed)``; fewer if fewer are eligible (with a warning).

    Returns:
        (train records, validation query, validation gallery), each sorted by name.

    Raises:
        DatasetError: no identity is eligible (every identity seen by a single camera / scene).
    """
    by_pid: dict[int, list[Triplet]] = {}
    for t in records:
        by_pid.setdefault(t.pid, []).append(t)
    splits = {pid: _valid_val_split(ts, by_scene) for pid, ts in sorted(by_pid.items())}
    eligible = [pid for pid, (q, _) in splits.items() if q]
    n_val = max(1, int(round(fraction * len(by_pid))))
    if not eligible:
        raise DatasetError(f"cannot hold out validation identities: no training identity has images from two "
                           f"{'scenes' if by_scene else 'cameras'}; set cfg.data.val_fraction to 0")
    if n_val > len(eligible):
        warnings.warn(f"cfg.data.val_fraction={fraction} asks for {n_val} validation identities but only "
                      f"{len(eligible)} have images from two {'scenes' if by_scene else 'cameras'}; using those",
                      stacklevel=2)
        n_val = len(eligible)
    rng = np.random.default_rng(seed)
    held = {eligible[i] for i in rng.permutation(len(eligible))[:n_val]}
    train = [t for t in records if t.pid not in held]
    vq = sorted((t for pid in held for t in splits[pid][0]), key=lambda t: t.name)
    vg = sorted((t for pid in held for t in splits[pid][1]), key=lambda t: t.name)
    return train, vq, vg


@dataclass
class Loaders:
    """Everything a training run needs from the data side."""

    train: DataLoader
    val_query: DataLoader | None
    val_gallery: DataLoader | None
    query: DataLoader
    gallery: DataLoader
    num_classes: int
    """Training identities after the validation hold-out (``cfg.model.num_classes``)."""
    num_cameras: int
    """max 0-based camera id + 1 over all splits (``cfg.model.num_cameras`` for SIE)."""
    uses_scenes: bool
    """MSVR310: pass scene ids to the evaluator (same-id same-scene removal)."""
    train_sampler: RandomIdentitySampler
    """Call ``train_sampler.set_epoch(e)`` before each epoch."""
    train_records: list[Triplet] = field(default_factory=list)
    val_query_records: list[Triplet] = field(default_factory=list)
    val_gallery_records: list[Triplet] = field(default_factory=list)
    query_records: list[Triplet] = field(default_factory=list)
    gallery_records: list[Triplet] = field(default_factory=list)
    pid_to_label: dict[int, int] = field(default_factory=dict)
    missing_captions: dict[str, int] = field(default_factory=dict)
    """Triplets without a caption per split (they get the empty caption); log them."""
    selects_on_test: bool = False
    cache_paths: list[str] = field(default_factory=list)
    """Folders of the frame caches the loaders read (empty when ``cfg.data.cache`` is off)."""


def build_loaders(cfg: STMIConfig, tokenizer: Tokenizer | None, rank: int = 0, world_size: int = 1) -> Loaders:
    """Read ``cfg.data.dataset`` under ``cfg.data.root`` and build its loaders.

    Args:
        cfg: the run's config (data fields, ``model.image_size``, ``optim.seed``).
        tokenizer: ``list[str] -> LongTensor`` (the model's ``tokenize``) or None (items carry no ``text``).
        rank, world_size: the train loader yields this rank's share of every P x K batch, of size
            ``cfg.data.batch_size // world_size``.

    Raises:
        DatasetError: bad dataset files (path named). ValueError: batch size / num_instances / world size mismatch.
        stmi.data.frame_cache.CacheError: the frame cache folder is unwritable or full (folder and fix named).
    """
    d = cfg.data
    splits = load_dataset(d.dataset, d.root)
    uses_scenes = splits.layout.uses_scenes
    train_records = splits.train
    vq: list[Triplet] = []
    vg: list[Triplet] = []
    if d.select_on_test:
        warnings.warn("cfg.data.select_on_test=True: the validation metric is the TEST metric, so model selection "
                      "sees the test set (the anchors' habit; results are optimistic and not comparable to a "
                      "held-out selection)", stacklevel=2)
    elif d.val_fraction > 0:
        train_records, vq, vg = split_validation(splits.train, d.val_fraction, cfg.optim.seed, uses_scenes)
    pid_to_label = {p: i for i, p in enumerate(sorted({t.pid for t in train_records}))}
    all_records = [*splits.train, *splits.query, *splits.gallery]
    num_cameras = max(t.camid for t in all_records) + 1
    missing = {"train": sum(t.caption is None for t in train_records),
               "val": sum(t.caption is None for t in [*vq, *vg]),
               "query": sum(t.caption is None for t in splits.query),
               "gallery": sum(t.caption is None for t in splits.gallery)}
    if any(missing.values()):
        log.warning("triplets without a caption (they use the empty caption): %s", missing)

    size = tuple(cfg.model.image_size)
    sampler = RandomIdentitySampler([t.pid for t in train_records], d.batch_size, d.num_instances,
                                    seed=cfg.optim.seed, rank=rank, world_size=world_size)
    common: dict = {"num_workers": d.num_workers, "pin_memory": torch.cuda.is_available(),
                    "persistent_workers": d.num_workers > 0}
    cache_paths: list[str] = []
    if d.cache:
        from stmi.data.frame_cache import ensure_cache

        caches: dict[int, object] = {}

        def cache_of(split: list[Triplet]):  # noqa: ANN202
            if id(split) not in caches:
                caches[id(split)] = ensure_cache(d.dataset, split, size, d.cache_dir, progress=sys.stderr.isatty())
                cache_paths.append(str(caches[id(split)].path))
            return caches[id(split)]

        train_cache, query_cache = cache_of(splits.train), cache_of(splits.query)
        gallery_cache = cache_of(splits.gallery)
        common["collate_fn"] = collate_batch
        train_ds: object = CachedTripletDataset(train_cache, train_records, True, tokenizer, d.flip_p, d.pad,
                                                d.erasing_p, relabel=pid_to_label)
        cache_for = {id(splits.query): query_cache, id(splits.gallery): gallery_cache}

        def eval_dataset(records: list[Triplet]) -> object:
            return CachedTripletDataset(cache_for.get(id(records), train_cache), records, False, tokenizer)
    else:
        train_ds = TripletDataset(train_records, size, True, tokenizer, d.flip_p, d.pad, d.erasing_p,
                                  relabel=pid_to_label)

        def eval_dataset(records: list[Triplet]) -> object:
            return TripletDataset(records, size, False, tokenizer)

    train = DataLoader(train_ds, batch_size=sampler.per_rank, sampler=sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(cfg.optim.seed + rank), **common)

    def eval_loader(records: list[Triplet]) -> DataLoader:
        return DataLoader(eval_dataset(records), batch_size=d.batch_size, shuffle=False, **common)

    query = eval_loader(splits.query)
    gallery = query if splits.gallery is splits.query else eval_loader(splits.gallery)
    if d.select_on_test:
        val_query, val_gallery = query, gallery
        vq, vg = splits.query, splits.gallery
    elif vq:
        val_query, val_gallery = eval_loader(vq), eval_loader(vg)
    else:
        val_query = val_gallery = None
    return Loaders(train=train, val_query=val_query, val_gallery=val_gallery, query=query, gallery=gallery,
                   num_classes=len(pid_to_label), num_cameras=num_cameras, uses_scenes=uses_scenes,
                   train_sampler=sampler, train_records=train_records, val_query_records=vq, val_gallery_records=vg,
                   query_records=splits.query, gallery_records=splits.gallery, pid_to_label=pid_to_label,
                   missing_captions=missing, selects_on_test=d.select_on_test, cache_paths=cache_paths)
