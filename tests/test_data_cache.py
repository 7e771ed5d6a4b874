"""Decoded-frame cache and batch augmentation (issue 13): equality with the decode path, invalidation, concurrent
builders, truncation and corruption, unwritable / full folders, DDP sharding, augmentation equivalence with
``PairedTransform``, bad files at build time, the ``cache`` command, and a short training run on the cached path."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmi.config import STMIConfig, apply_overrides
from stmi.data import DatasetError, TripletDataset, build_loaders, load_dataset
from stmi.data import frame_cache as fc
from stmi.data.__main__ import main as data_main
from stmi.data.batch_transforms import (
    BatchParams,
    apply_geometry,
    draw_params,
    erase_,
    normalize_frames,
    prepare_batch,
)
from stmi.data.cached_dataset import CachedTripletDataset
from stmi.data.synth import make_synthetic
from stmi.data.transforms import PairedTransform, erase_box, resize_stack
from stmi.data.triplet_dataset import load_frames, load_mask

SIZE = (32, 16)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    for ds in ("rgbnt201", "rgbnt100", "msvr310"):
        make_synthetic(ds, out, ids=12, seed=0, images_per_id=6, cameras=3)
    return out


@pytest.fixture
def root(synth: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic data (tests that touch files)."""
    dst = tmp_path / "data"
    shutil.copytree(synth / "RGBNT201", dst / "RGBNT201")
    return dst


def _decoded(t, size=SIZE) -> np.ndarray:  # noqa: ANN001
    frames = load_frames(t)
    x = resize_stack(frames, load_mask(t, frames[0].size), size).transpose(2, 0, 1)
    out = np.zeros((10, *size), np.uint8)
    out[:x.shape[0]] = x
    return out


# ------------------------------------------------------------------------------------------- cache contents


@pytest.mark.parametrize("dataset", ["rgbnt201", "rgbnt100", "msvr310"])
def test_cached_frames_equal_freshly_decoded_ones(synth: Path, tmp_path: Path, dataset: str) -> None:
    s = load_dataset(dataset, synth)
    cache = fc.ensure_cache(dataset, s.train, SIZE, tmp_path)
    assert cache.frames.shape == (len(s.train), 10, *SIZE) and isinstance(cache.frames, np.memmap)
    for i, t in enumerate(s.train):
        np.testing.assert_array_equal(cache.frames[i], _decoded(t), err_msg=t.name)
    meta = cache.manifest["records"]
    assert [m["name"] for m in meta] == [t.name for t in s.train]
    assert [(m["pid"], m["camid"], m["sceneid"], m["has_mask"]) for m in meta] == [
        (t.pid, t.camid, t.sceneid, t.mask is not None) for t in s.train]
    # evaluation items of the cached path are bitwise the decode path's
    ref = TripletDataset(s.query, SIZE, train=False)
    cached = CachedTripletDataset(fc.ensure_cache(dataset, s.query, SIZE, tmp_path), s.query, train=False)
    batch = cached.__getitems__(list(range(len(s.query))))
    for i in range(len(s.query)):
        item = ref[i]
        for k in ("rgb", "nir", "tir", "mask"):
            assert torch.equal(batch[k][i], item[k]), (i, k)
        for k in ("pid", "camid", "sceneid", "has_mask", "index"):
            assert batch[k][i].item() == item[k], (i, k)


def test_opening_is_cheap_and_pickling_does_not_copy_the_frames(synth: Path, tmp_path: Path) -> None:
    import pickle

    s = load_dataset("rgbnt201", synth)
    a = fc.ensure_cache("rgbnt201", s.train, SIZE, tmp_path)
    mtime = (a.path / "manifest.json").stat().st_mtime_ns
    b = fc.ensure_cache("rgbnt201", s.train, SIZE, tmp_path)
    assert b.path == a.path and (b.path / "manifest.json").stat().st_mtime_ns == mtime  # not rebuilt
    ds = CachedTripletDataset(b, s.train, train=True)
    assert len(pickle.dumps(ds)) < b.nbytes / 4  # workers get the path and map the file themselves
    assert ds.__getitems__([0])["frames"].shape == (1, 10, *SIZE)
    assert fc.ensure_cache("rgbnt201", s.train, (16, 8), tmp_path).path != a.path  # another input size


# ------------------------------------------------------------------------------------------- invalidation


def test_touched_or_replaced_file_gets_a_new_cache(root: Path, tmp_path: Path) -> None:
    cdir = tmp_path / "cache"
    s = load_dataset("rgbnt201", root)
    first = fc.ensure_cache("rgbnt201", s.train, SIZE, cdir)
    t = s.train[3]
    st = os.stat(t.nir)
    os.utime(t.nir, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    touched = fc.ensure_cache("rgbnt201", load_dataset("rgbnt201", root).train, SIZE, cdir)
    assert touched.path != first.path and not first.path.exists()  # the stale version is pruned
    np.testing.assert_array_equal(touched.frames, first.frames)

    a = np.asarray(Image.open(t.nir).convert("RGB"))
    Image.fromarray(255 - a).save(t.nir, quality=95)  # replaced content
    replaced = fc.ensure_cache("rgbnt201", load_dataset("rgbnt201", root).train, SIZE, cdir)
    assert replaced.path != touched.path
    np.testing.assert_array_equal(replaced.frames[3], _decoded(t))
    assert not np.array_equal(replaced.frames[3, 3:6], touched.frames[3, 3:6])
    np.testing.assert_array_equal(replaced.frames[4], touched.frames[4])
    assert sorted(p.name for p in cdir.iterdir() if p.is_dir()) == [replaced.path.name]


def _build_in_child(args: tuple[str, str, str]) -> str:
    root, cdir, marker = args
    real = fc._build

    def counting(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*a, **kw)

    fc._build = counting
    s = load_dataset("rgbnt201", root)
    return str(fc.ensure_cache("rgbnt201", s.train, SIZE, cdir).path)


def test_concurrent_builders_build_once_and_agree(synth: Path, tmp_path: Path) -> None:
    cdir, marker = tmp_path / "cache", tmp_path / "builds.txt"
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        paths = pool.map(_build_in_child, [(str(synth), str(cdir), str(marker))] * 3)
    assert len(set(paths)) == 1
    assert len(marker.read_text().split()) == 1  # one build; the others waited on the lock and opened it
    cache, why = fc.validate(Path(paths[0]), full=True)
    assert cache is not None, why
    assert not [p for p in cdir.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


# ------------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["truncate", "flip bytes", "no manifest"])
def test_truncated_or_corrupt_cache_is_detected_and_rebuilt(synth: Path, tmp_path: Path, damage: str) -> None:
    s = load_dataset("rgbnt201", synth)
    good = fc.ensure_cache("rgbnt201", s.train, SIZE, tmp_path)
    expect = np.array(good.frames)
    del good._frames
    path = good.path / "frames.npy"
    if damage == "truncate":
        with open(path, "rb+") as f:
            f.truncate(path.stat().st_size - 1000)
    elif damage == "flip bytes":
        with open(path, "rb+") as f:
            f.seek(path.stat().st_size - 500)  # inside the last row, which is always sampled
            b = f.read(16)
            f.seek(path.stat().st_size - 500)
            f.write(bytes(255 - x for x in b))
    else:
        (good.path / "manifest.json").unlink()
    assert fc.validate(good.path)[0] is None
    again = fc.ensure_cache("rgbnt201", s.train, SIZE, tmp_path)
    assert again.path == good.path
    np.testing.assert_array_equal(again.frames, expect)
    assert fc.validate(again.path, full=True)[0] is not None


def test_unwritable_or_full_cache_folder_is_a_clear_error(synth: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_dataset("rgbnt201", synth)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "cache"  # a folder below a regular file cannot be created, whoever we are
    with pytest.raises(fc.CacheError) as e:
        fc.ensure_cache("rgbnt201", s.train, SIZE, bad)
    msg = str(e.value)
    assert str(bad) in msg and "cfg.data.cache_dir" in msg and "STMI_CACHE_DIR" in msg and "cfg.data.cache=false" in msg
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(fc.CacheError, match="cfg.data.cache_dir"):
            fc.ensure_cache("rgbnt201", s.train, SIZE, ro)
    # the same error through build_loaders, with the folder from the config
    cfg = apply_overrides(STMIConfig(), {"data.root": str(synth), "data.cache_dir": str(bad), "data.batch_size": 6,
                                         "data.num_instances": 2, "model.image_size": SIZE})
    with pytest.raises(fc.CacheError, match=str(bad)):
        build_loaders(cfg, None)
    # a full disk: the space check before anything is written (the reported free space is what statvfs says)
    real = shutil.disk_usage
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(fc.CacheError, match=r"not enough space.*needs .* GB, 0.00 GB are free.*cfg\.data\.cache_dir"):
        fc.ensure_cache("rgbnt201", s.train, SIZE, tmp_path / "full")
    assert not list((tmp_path / "full").glob("*.tmp-*"))


def test_bad_files_are_reported_at_build_time_with_path_and_fix(root: Path, tmp_path: Path) -> None:
    s = load_dataset("rgbnt201", root)
    bad = [s.train[1].tir, s.train[5].rgb]
    for p in bad:
        p.write_bytes(p.read_bytes()[:150])
    with pytest.raises(DatasetError) as e:
        fc.ensure_cache("rgbnt201", s.train, SIZE, tmp_path / "c")
    msg = str(e.value)
    assert msg.startswith("2 bad file(s)") and all(str(p) in msg for p in bad)
    assert "re-copy it" in msg and "python -m stmi.data check" in msg
    assert not [p for p in (tmp_path / "c").iterdir() if p.is_dir()]  # nothing half-built left
    cfg = apply_overrides(STMIConfig(), {"data.root": str(root), "data.cache_dir": str(tmp_path / "c"),
                                         "data.num_workers": 2, "data.batch_size": 6, "data.num_instances": 2,
                                         "model.image_size": SIZE})
    with pytest.raises(DatasetError, match="2 bad file"):  # raised by build_loaders, before any worker starts
        build_loaders(cfg, None)


# ------------------------------------------------------------------------------------------- loaders, DDP


def _cfg(root: Path, cache: bool, cache_dir: Path, **over: object) -> STMIConfig:
    base = {"data.dataset": "rgbnt201", "data.root": str(root), "data.batch_size": 8, "data.num_instances": 2,
            "data.num_workers": 0, "data.val_fraction": 0.25, "model.image_size": SIZE, "optim.seed": 7,
            "data.cache": cache, "data.cache_dir": str(cache_dir)}
    base.update(over)
    return apply_overrides(STMIConfig(), base)


def test_ddp_sharding_is_unchanged_by_the_cache(synth: Path, tmp_path: Path) -> None:
    def indices(cache: bool, rank: int = 0, world: int = 1, workers: int = 0) -> list[list[int]]:
        ld = build_loaders(_cfg(synth, cache, tmp_path, **{"data.num_workers": workers}), None, rank=rank,
                           world_size=world)
        ld.train_sampler.set_epoch(1)
        return [b["index"].tolist() for b in ld.train]

    single = indices(False)
    assert indices(True) == single
    r0, r1 = indices(True, 0, 2, workers=1), indices(True, 1, 2)
    assert r0 == indices(False, 0, 2) and r1 == indices(False, 1, 2)
    ld = build_loaders(_cfg(synth, True, tmp_path), None)
    pid = [t.pid for t in ld.train_records]
    for g, a, b in zip(single, r0, r1):
        assert len(a) == len(b) == 4 and sorted(a + b) == sorted(g)
        assert not {pid[i] for i in a} & {pid[i] for i in b}


def test_cached_loaders_batches_match_the_decode_path_shapes(synth: Path, tmp_path: Path) -> None:
    def tok(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), 0, 0, 0] for t in texts])

    ld = build_loaders(_cfg(synth, True, tmp_path, **{"data.num_workers": 1}), tok)
    assert len(ld.cache_paths) == 2 and all(Path(p).is_dir() for p in ld.cache_paths)  # train, test (query=gallery)
    raw = next(iter(ld.train))
    assert raw["frames"].dtype == torch.uint8 and raw["erase"].shape == (8, 3, 4)
    batch = prepare_batch(raw, "cpu")
    ref = next(iter(build_loaders(_cfg(synth, False, tmp_path), tok).train))
    assert set(batch) == set(ref)
    for k in ref:
        assert batch[k].shape == ref[k].shape and batch[k].dtype == ref[k].dtype, k
    for k in ("pid", "camid", "index", "text", "has_mask", "has_caption", "sceneid"):
        assert torch.equal(batch[k], ref[k]), k
    assert Counter(batch["pid"].tolist()).most_common(1)[0][1] == 2 and batch["mask"].sum() > 0
    q = next(iter(ld.query))
    assert q["rgb"].dtype == torch.float32 and ld.gallery is ld.query  # evaluation batches are normalised
    v = next(iter(ld.val_query))
    assert {t.pid for t in ld.val_query_records} >= set(v["pid"].tolist())


def test_worker_buffer_ring_delivers_each_batch_and_detects_a_batch_kept_too_long(synth: Path, tmp_path: Path
                                                                                  ) -> None:
    from stmi.data.cached_dataset import POOL_BATCHES

    over = {"data.num_workers": 1, "data.batch_size": 4, "data.flip_p": 0.0, "data.pad": 0, "data.erasing_p": 0.0}
    ld = build_loaders(_cfg(synth, True, tmp_path, **over), None)
    ds = ld.train.dataset
    seen = 0
    for epoch in range(3):  # persistent worker: its ring of buffers is reused across epochs
        ld.train_sampler.set_epoch(epoch)
        for raw in ld.train:
            assert "frames_stamp" in raw  # a worker's reused shared-memory buffer
            expect = torch.from_numpy(np.asarray(ds.cache.frames[ds.rows[raw["index"]]]))
            assert torch.equal(raw["frames"], expect)  # no augmentation: exactly the cached rows, in batch order
            prepare_batch(raw, "cpu")
            seen += 1
    assert seen > 2 * POOL_BATCHES
    kept = list(ld.train)  # holding more batches than the ring has slots
    assert len(kept) > POOL_BATCHES
    prepare_batch(kept[-1], "cpu")
    with pytest.raises(RuntimeError, match="overwritten by a later batch"):
        prepare_batch(kept[0], "cpu")


# ------------------------------------------------------------------------------------------- augmentation


def _marked() -> tuple[list[Image.Image], Image.Image]:
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)) for _ in range(3)]
    m = np.zeros((40, 20), np.uint8)
    m[6:30, 3:12] = 255
    return ims, Image.fromarray(m)


def _torch_order_params(h: int, w: int, flip_p: float, pad: int, erasing_p: float, g: torch.Generator
                        ) -> tuple[BatchParams, dict[tuple[int, int], torch.Tensor]]:
    """One sample's parameters drawn from ``g`` in exactly PairedTransform's order (noise included)."""
    flip = flip_p > 0 and torch.rand((), generator=g).item() < flip_p
    dy = dx = 0
    if pad > 0:
        dy = int(torch.randint(0, 2 * pad + 1, (), generator=g)) - pad
        dx = int(torch.randint(0, 2 * pad + 1, (), generator=g)) - pad
    erase = np.zeros((1, 3, 4), np.int32)
    noise = {}
    for k in range(3):
        box = erase_box(h, w, erasing_p, g)
        if box is not None:
            erase[0, k] = box
            noise[(0, k)] = torch.randn((3, box[2], box[3]), generator=g)
    return BatchParams(np.array([flip]), np.array([dy]), np.array([dx]), erase), noise


def test_batch_augmentation_equals_paired_transform_with_a_shared_rng() -> None:
    ims, mask = _marked()
    h, w = SIZE
    src = resize_stack(ims, mask, SIZE).transpose(2, 0, 1)[None].copy()
    t = PairedTransform(SIZE, train=True, flip_p=0.5, pad=6, erasing_p=0.7)
    kinds = Counter()
    for seed in range(40):
        (rgb, nir, tir), m = t(ims, mask, generator=torch.Generator().manual_seed(seed))
        params, noise = _torch_order_params(h, w, 0.5, 6, 0.7, torch.Generator().manual_seed(seed))
        out = torch.empty((1, 10, h, w), dtype=torch.uint8)
        apply_geometry(src, np.array([0]), params, out.numpy())
        imgs, mask_b = normalize_frames(out)
        erase_(imgs, params.erase, noise=noise)
        for a, b in zip(imgs, (rgb, nir, tir)):
            assert torch.equal(a[0], b), seed  # bitwise: same geometry, same normalisation, same noise
        assert torch.equal(mask_b[0], m)
        kinds.update({"flip": bool(params.flip[0]), "erased": int((params.erase[0, :, 2] > 0).sum())})
    assert 5 < kinds["flip"] < 35 and kinds["erased"] > 30  # every step was exercised


def test_batch_parameters_have_paired_transform_distributions() -> None:
    h, w, n = 256, 128, 6000
    p = draw_params(n, np.random.default_rng(0), (h, w), flip_p=0.5, pad=10, erasing_p=0.5)
    g = torch.Generator().manual_seed(0)
    ref = [_torch_order_params(h, w, 0.5, 10, 0.5, g)[0] for _ in range(n)]
    rf = np.array([r.flip[0] for r in ref])
    rdy, rdx = np.array([r.dy[0] for r in ref]), np.array([r.dx[0] for r in ref])
    re = np.concatenate([r.erase for r in ref])
    se = 4 * np.sqrt(0.25 / n)  # 4 sigma of a proportion
    assert abs(p.flip.mean() - rf.mean()) < 2 * se
    for a, b in ((p.dy, rdy), (p.dx, rdx)):
        assert a.min() == b.min() == -10 and a.max() == b.max() == 10
        fa, fb = np.bincount(a + 10, minlength=21) / n, np.bincount(b + 10, minlength=21) / n
        assert np.abs(fa - fb).max() < 2 * 4 * np.sqrt(fb.mean() / n)
    on, ron = p.erase[..., 2] > 0, re[..., 2] > 0
    assert abs(on.mean() - ron.mean()) < 2 * se / np.sqrt(3)
    for j, name in ((0, "top"), (1, "left"), (2, "height"), (3, "width")):
        a, b = p.erase[..., j][on].astype(float), re[..., j][ron].astype(float)
        assert abs(a.mean() - b.mean()) < 0.05 * b.std() * 4, name
        assert abs(a.std() - b.std()) < 0.06 * b.std(), name
    area, rarea = (p.erase[..., 2] * p.erase[..., 3])[on] / (h * w), (re[..., 2] * re[..., 3])[ron] / (h * w)
    assert 0.015 < area.min() and area.max() < 0.36 and abs(area.mean() - rarea.mean()) < 0.01
    inside = (p.erase[..., 0] + p.erase[..., 2] <= h) & (p.erase[..., 1] + p.erase[..., 3] <= w)
    assert inside.all()


def test_device_erasing_vectorised_and_per_box_agree_and_spare_the_mask() -> None:
    n, (h, w) = 64, SIZE
    params = draw_params(n, np.random.default_rng(1), SIZE, 0.5, 4, 0.8)
    frames = torch.full((n, 10, h, w), 128, dtype=torch.uint8)
    frames[:, 9] = 1
    base, _ = normalize_frames(frames)
    regions = []
    for vec in (False, True):
        imgs, mask = normalize_frames(frames)
        erase_(imgs, torch.from_numpy(params.erase), vectorized=vec, generator=torch.Generator().manual_seed(0))
        changed = torch.stack([(a != b).any(1) for a, b in zip(imgs, base)], 1)  # (n, 3, h, w)
        regions.append(changed)
        vals = torch.cat([a[c.unsqueeze(1).expand_as(a)] for a, c in zip(imgs, changed.unbind(1))])
        assert abs(vals.mean().item()) < 0.05 and abs(vals.std().item() - 1) < 0.05  # N(0, 1) noise
        assert torch.equal(mask, torch.ones_like(mask))
    assert torch.equal(regions[0], regions[1])
    expect = torch.zeros(n, 3, h, w, dtype=torch.bool)
    for b, k in zip(*np.nonzero(params.erase[..., 2])):
        t, lf, eh, ew = params.erase[b, k]
        expect[b, k, t:t + eh, lf:lf + ew] = True
    assert torch.equal(regions[0], expect)
    # per modality: the three boxes of a triplet are drawn independently
    assert (params.erase[:, 0] != params.erase[:, 1]).any()


def test_prepare_batch_passes_decode_path_batches_through() -> None:
    b = {"rgb": torch.zeros(2, 3, 4, 4), "pid": torch.tensor([1, 2])}
    assert prepare_batch(b, "cpu") is b


# ------------------------------------------------------------------------------------------- command line


def test_cache_command_prebuilds_and_verifies(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    cdir = tmp_path / "c"
    argv = ["cache", "--dataset", "rgbnt201", "--root", str(synth), "--cache-dir", str(cdir),
            "--image-size", "32x16"]
    assert data_main(argv) == 0
    out = capsys.readouterr().out
    assert "train" in out and "test" in out and str(cdir) in out
    built = sorted(p for p in cdir.iterdir() if p.is_dir())
    assert len(built) == 2
    s = load_dataset("rgbnt201", synth)
    assert fc.ensure_cache("rgbnt201", s.train, SIZE, cdir).path in built  # what a run at 32x16 opens
    assert data_main([*argv, "--verify"]) == 0
    assert "ok" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data_main(["cache", "--help"])
    assert "--cache-dir" in capsys.readouterr().out
    assert data_main(["cache", "--dataset", "rgbnt201", "--root", str(synth), "--cache-dir",
                      str(tmp_path / "f" / "x"), "--image-size", "32x16"]) == 0  # parents are created
    (tmp_path / "blk").write_text("")
    assert data_main(["cache", "--dataset", "rgbnt201", "--root", str(synth), "--cache-dir",
                      str(tmp_path / "blk" / "x")]) == 2
    err = capsys.readouterr().err
    assert "blk/x" in err and "--cache-dir" in err


# ------------------------------------------------------------------------------------------- training


@pytest.mark.slow  # two short trainings: ~90 s on 2 CPUs
@pytest.mark.timeout(900)
def test_training_on_the_cached_path_learns_as_the_decode_path(tmp_path: Path) -> None:
    """Demo recipe, synthetic RGBNT201, 2 epochs on each path: both learn, the cached one at least half as much."""
    from stmi.engine import build_optimizer, build_scheduler, seed_everything, train_one_epoch
    from stmi.eval import evaluate
    from stmi.model.network import build_model
    from stmi.recipes import recipe

    root = make_synthetic("rgbnt201", tmp_path / "data", ids=20, images_per_id=8, seed=0,
                          difficulty="easy")  # learning within 2 epochs: the hard benchmark needs more
    gains = {}
    for cache in (False, True):
        cfg = apply_overrides(recipe("demo", "rgbnt201"), {  # the cached run through a worker: its buffer ring
            "data.root": str(root), "optim.epochs": 2, "data.cache": cache, "data.cache_dir": str(tmp_path / "c"),
            "data.num_workers": int(cache)})
        seed_everything(cfg.optim.seed)
        tokenizer = build_model(dataclasses.replace(cfg.model, num_classes=0)).tokenize
        loaders = build_loaders(cfg, tokenizer)
        cfg = apply_overrides(cfg, {"model.num_classes": loaders.num_classes,
                                    "model.num_cameras": loaders.num_cameras})
        seed_everything(cfg.optim.seed)
        model = build_model(cfg.model)
        opt = build_optimizer(model, cfg.optim)
        sch = build_scheduler(opt, cfg.optim, len(loaders.train))
        before = evaluate(model, loaders.val_query, loaders.val_gallery, "cpu")["mAP"]
        stats = [train_one_epoch(model, loaders.train, opt, sch, cfg.loss, "cpu", e, progress=False)
                 for e in range(cfg.optim.epochs)]
        after = evaluate(model, loaders.val_query, loaders.val_gallery, "cpu")["mAP"]
        assert stats[-1]["loss"] < stats[0]["loss"], cache
        assert after > before + 0.1, (cache, before, after)
        gains[cache] = after - before
        assert bool(loaders.cache_paths) == cache
    assert gains[True] > 0.5 * gains[False], gains
