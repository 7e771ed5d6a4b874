"""Paired transforms, the P x K identity sampler (DDP shards, determinism) and ``build_loaders`` on synthetic data."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmi.config import STMIConfig, apply_overrides
from stmi.data import CLIP_MEAN, CLIP_STD, PairedTransform, RandomIdentitySampler, build_loaders
from stmi.data.batch_transforms import prepare_batch
from stmi.data.synth import make_synthetic

# ------------------------------------------------------------------------------------------------ transforms

H, W = 32, 16
MARKERS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))  # a different colour per modality


def _marked(size: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[list[Image.Image], Image.Image]:
    """Three grey frames with a coloured square at ``box`` (x0, y0, x1, y1) and a mask of the same square."""
    w, h = size
    ims = []
    for c in MARKERS:
        a = np.full((h, w, 3), 128, np.uint8)
        a[box[1]:box[3], box[0]:box[2]] = c
        ims.append(Image.fromarray(a))
    m = np.zeros((h, w), np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    return ims, Image.fromarray(m)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


def _marker_pixels(x: torch.Tensor, channel: int) -> torch.Tensor:
    """Where the modality's marker colour survives: its channel high, the others low."""
    u = _unnormalize(x)
    others = [c for c in range(3) if c != channel]
    return (u[channel] > 0.75) & (u[others].max(0).values < 0.25)


def test_flip_and_crop_keep_images_and_mask_aligned() -> None:
    ims, mask = _marked((W, H), (2, 5, 7, 12))  # off-centre, so a flip or shift moves it
    t = PairedTransform((H, W), train=True, flip_p=0.5, pad=6, erasing_p=0.0)
    flips, shifts = 0, set()
    for seed in range(12):
        (rgb, nir, tir), m = t(ims, mask, generator=torch.Generator().manual_seed(seed))
        assert m is not None and m.shape == (1, H, W) and set(m.unique().tolist()) <= {0.0, 1.0}
        fg = m[0].bool()
        for k, x in enumerate((rgb, nir, tir)):
            assert torch.equal(_marker_pixels(x, k), fg), (seed, k)
        ys, xs = torch.nonzero(fg, as_tuple=True)
        if len(xs):
            flips += int(xs.float().mean() > W / 2)
            shifts.add((int(ys.min()), int(xs.min())))
    assert flips > 0 and len(shifts) > 3  # the geometry really varied


def test_resize_keeps_alignment() -> None:
    ims, mask = _marked((2 * W, 2 * H), (4, 10, 14, 24))
    (rgb, _, _), m = PairedTransform((H, W), train=False)(ims, mask)
    assert m is not None
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 11, 2, 6)
    red = _unnormalize(rgb)[0]
    assert red[5:12, 2:7].min() > 0.9 and red[m[0] == 0].max() < 0.9


def test_random_erasing_is_per_modality_and_spares_the_mask() -> None:
    ims, mask = _marked((W, H), (2, 5, 7, 12))
    t = PairedTransform((H, W), train=True, flip_p=0.0, pad=0, erasing_p=1.0)
    (rgb, nir, tir), m = t(ims, mask, generator=torch.Generator().manual_seed(0))
    (rgb0, nir0, tir0), m0 = PairedTransform((H, W), train=False)(ims, mask)
    changed = [(a != b).any(0) for a, b in ((rgb, rgb0), (nir, nir0), (tir, tir0))]
    assert all(c.any() for c in changed)
    assert not torch.equal(changed[0], changed[1]) or not torch.equal(changed[1], changed[2])
    assert torch.equal(m, m0)


def test_eval_transform_is_deterministic() -> None:
    ims, mask = _marked((W, H), (2, 5, 7, 12))
    t = PairedTransform((H, W), train=False)
    a, b = t(ims, mask), t(ims, mask)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------ sampler

PIDS = [p for p in range(10) for _ in range(3 + p % 4)] + [10, 10]  # id 10 has 2 images (< K)


def _batches(s: RandomIdentitySampler) -> list[list[int]]:
    idx = list(s)
    assert len(idx) == len(s) and len(idx) % s.per_rank == 0
    return [idx[i:i + s.per_rank] for i in range(0, len(idx), s.per_rank)]


def test_sampler_yields_p_by_k_batches() -> None:
    s = RandomIdentitySampler(PIDS, batch_size=12, num_instances=4, seed=3)
    batches = _batches(s)
    assert len(batches) >= 3
    for b in batches:
        counts = Counter(PIDS[i] for i in b)
        assert len(counts) == 3 and set(counts.values()) == {4}
    # an id with fewer than K images is sampled with replacement: its 2 images fill a group of 4
    samplers = [RandomIdentitySampler(PIDS, 12, 4, seed=e) for e in range(5)]
    used_10 = [[i for i in s2 if PIDS[i] == 10] for s2 in samplers]
    assert any(used_10)
    assert all(len(u) in (0, 4) and set(u) <= {len(PIDS) - 2, len(PIDS) - 1} for u in used_10)


def test_sampler_is_deterministic_and_epoch_dependent() -> None:
    a = RandomIdentitySampler(PIDS, 12, 4, seed=5)
    b = RandomIdentitySampler(PIDS, 12, 4, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(RandomIdentitySampler(PIDS, 12, 4, seed=6)) != list(RandomIdentitySampler(PIDS, 12, 4, seed=5))


def test_ddp_shards_are_disjoint_and_rebuild_the_global_batch() -> None:
    single = RandomIdentitySampler(PIDS, 16, 4, seed=1)
    ranks = [RandomIdentitySampler(PIDS, 16, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        g, r0, r1 = _batches(single), _batches(ranks[0]), _batches(ranks[1])
        assert len(r0) == len(r1) == len(g) > 0
        for gb, a, b in zip(g, r0, r1):
            assert len(a) == len(b) == 8
            assert not {PIDS[i] for i in a} & {PIDS[i] for i in b}
            assert sorted(a + b) == sorted(gb)


def test_sampler_errors_name_the_fields() -> None:
    with pytest.raises(ValueError, match=r"cfg\.data\.batch_size.*cfg\.data\.num_instances"):
        RandomIdentitySampler(PIDS, 72, 8, world_size=2)  # 36 per worker is not a multiple of 8
    with pytest.raises(ValueError, match="divisible"):
        RandomIdentitySampler(PIDS, 9, 3, world_size=2)
    with pytest.raises(ValueError, match="11 identities"):
        RandomIdentitySampler(PIDS, 48, 4)


# ------------------------------------------------------------------------------------------------ loaders


@pytest.fixture(scope="module", autouse=True)
def _frame_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The loaders' frame cache (``cfg.data.cache``, on by default) goes to a temporary folder, not ~/.cache."""
    old = os.environ.get("STMI_CACHE_DIR")
    os.environ["STMI_CACHE_DIR"] = str(tmp_path_factory.mktemp("frame_cache"))
    yield
    if old is None:
        os.environ.pop("STMI_CACHE_DIR", None)
    else:
        os.environ["STMI_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_9_c0001_9")
    for ds in ("rgbnt201", "msvr310"):
        make_synthetic(ds, out, ids=12, seed=0, images_per_id=6, cameras=3)
    return out


def _cfg(root: Path, dataset: str = "rgbnt201", **over: object) -> STMIConfig:
    base = {"data.dataset": dataset, "data.root": str(root), "data.batch_size": 6, "data.num_instances": 2,
            "data.num_workers": 0, "data.val_fraction": 0.25, "model.image_size": (32, 16), "optim.seed": 7}
    base.update(over)
    return apply_overrides(STMIConfig(), base)


def _has_valid_match(q, gallery, by_scene: bool) -> bool:  # noqa: ANN001
    key = (lambda t: t.sceneid) if by_scene else (lambda t: t.camid)
    return any(g.pid == q.pid and key(g) != key(q) for g in gallery)


@pytest.mark.parametrize("dataset", ["rgbnt201", "msvr310"])
def test_build_loaders_validation_split(synth_root: Path, dataset: str) -> None:
    cfg = _cfg(synth_root, dataset)
    ld = build_loaders(cfg, tokenizer=None)
    train_ids = {t.pid for t in ld.train_records}
    val_ids = {t.pid for t in ld.val_query_records}
    assert len(val_ids) == 2 and not train_ids & val_ids  # round(0.25 * 8 training ids)
    assert {t.pid for t in ld.val_gallery_records} == val_ids
    assert ld.num_classes == len(train_ids) == 6 and ld.uses_scenes == (dataset == "msvr310")
    by_scene = ld.uses_scenes
    assert all(_has_valid_match(q, ld.val_gallery_records, by_scene) for q in ld.val_query_records)
    assert len(ld.val_query_records) + len(ld.val_gallery_records) + len(ld.train_records) == 8 * 6
    assert ld.num_cameras == 3 and ld.train_records == sorted(ld.train_records, key=lambda t: t.name)
    again = build_loaders(cfg, tokenizer=None)
    assert [t.name for t in again.val_query_records] == [t.name for t in ld.val_query_records]
    other = build_loaders(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, seed=8)), None)
    assert other.val_query_records != ld.val_query_records or other.val_gallery_records != ld.val_gallery_records


@pytest.mark.parametrize("cache", [True, False])
def test_train_loader_batches_and_ranks(synth_root: Path, cache: bool) -> None:
    def tok(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), 0, 0, 0] for t in texts])

    ld = build_loaders(_cfg(synth_root, **{"data.batch_size": 8, "data.cache": cache}), tok)
    batch = next(iter(ld.train))
    assert ("frames" in batch) == cache  # the cached path's uint8 frames become images on the device:
    batch = prepare_batch(batch, "cpu")  # stmi.engine.model_inputs does this step
    assert batch["rgb"].shape == (8, 3, 32, 16) and batch["mask"].shape == (8, 1, 32, 16)
    assert batch["text"].shape == (8, 4) and batch["has_mask"].all() and batch["has_caption"].all()
    assert batch["pid"].max() < ld.num_classes and Counter(batch["pid"].tolist()).most_common(1)[0][1] == 2
    assert batch["mask"].sum() > 0 and (batch["sceneid"] == -1).all()
    r1 = build_loaders(_cfg(synth_root, **{"data.batch_size": 8, "data.cache": cache}), tok, rank=1, world_size=2)
    assert r1.train.batch_size == 4 and len(r1.train_sampler) * 2 == len(ld.train_sampler)
    q = next(iter(ld.query))
    assert ld.gallery is ld.query and q["pid"].min() >= 9  # raw pids on the test side (test ids are 9..12)


def test_select_on_test_and_no_validation(synth_root: Path) -> None:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ld = build_loaders(_cfg(synth_root, **{"data.select_on_test": True}), None)
    assert any("TEST" in str(x.message) for x in w)
    assert ld.val_query is ld.query and ld.val_gallery is ld.gallery and ld.num_classes == 8
    ld0 = build_loaders(_cfg(synth_root, **{"data.val_fraction": 0.0}), None)
    assert ld0.val_query is None and ld0.val_gallery is None and ld0.num_classes == 8
