"""Masks: thermal segmentation quality on synthetic data, resume/overwrite, the sam2 error path, hard cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from stmi.data.layouts import dataset_dir, read_split, truth_mask_path
from stmi.data.synth import make_synthetic
from stmi.preprocess.__main__ import main
from stmi.preprocess.masks import run_masks, unique_triplets
from stmi.preprocess.sam2_predictor import Sam2Unavailable, check_sam2, infer_config, mask_box
from stmi.preprocess.thermal import mask_iou, otsu_threshold, thermal_mask


def _synthetic(tmp_path: Path, dataset: str) -> tuple[Path, Path]:
    root = tmp_path / dataset
    make_synthetic(dataset, root, ids=5, images_per_id=4, seed=3)
    droot = dataset_dir(dataset, root)
    shutil.rmtree(droot / "masks")  # keep only .truth/: the command must produce the masks itself
    return root, droot


@pytest.mark.parametrize("dataset", ["rgbnt201", "rgbnt100"])
def test_thermal_masks_match_synthetic_truth(tmp_path: Path, dataset: str, capsys: pytest.CaptureFixture) -> None:
    root, droot = _synthetic(tmp_path, dataset)
    assert main(["masks", "--dataset", dataset, "--root", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "masks written: 20" in out and "no foreground found (no mask written): 0" in out

    _, triplets = unique_triplets(dataset, root)
    assert len(triplets) == 20
    frame_hw = (256, 128) if dataset == "rgbnt201" else (128, 256)
    ious = []
    for t in triplets:
        assert t.mask is not None, "read_split must see the mask the command wrote"
        with Image.open(t.mask) as im:
            assert im.mode == "L" and im.size == (frame_hw[1], frame_hw[0])
            pred = np.asarray(im)
        assert set(np.unique(pred)) <= {0, 255}
        truth = np.asarray(Image.open(truth_mask_path(droot, t.split_folder, t.name)))
        ious.append(mask_iou(pred, truth))
    assert np.mean(ious) >= 0.7, f"mean IoU {np.mean(ious):.3f}"
    assert min(ious) >= 0.5, f"worst IoU {min(ious):.3f}"


def test_resume_skips_existing_and_overwrite_rewrites(tmp_path: Path) -> None:
    root, droot = _synthetic(tmp_path, "rgbnt201")
    first = run_masks("rgbnt201", root, progress=False)
    assert (first.written, first.skipped) == (20, 0)
    assert 0.1 < first.mean_fraction < 0.6
    one = next((droot / "masks").rglob("*.png"))
    one.unlink()  # as if the run had been interrupted before this mask
    stamps = {p: p.stat().st_mtime_ns for p in (droot / "masks").rglob("*.png")}
    second = run_masks("rgbnt201", root, progress=False)
    assert (second.written, second.skipped) == (1, 19)
    assert one.is_file()
    assert all(p.stat().st_mtime_ns == m for p, m in stamps.items())
    third = run_masks("rgbnt201", root, progress=False)
    assert (third.written, third.skipped) == (0, 20)
    forced = run_masks("rgbnt201", root, overwrite=True, progress=False)
    assert (forced.written, forced.skipped) == (20, 0)
    assert not list((droot / "masks").rglob("*.tmp")) and not list((droot / "masks").rglob(".*"))


def test_no_foreground_is_listed_and_gets_no_mask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, droot = _synthetic(tmp_path, "rgbnt201")
    t = read_split("rgbnt201", root, "train")[0]
    flat = np.full((256, 128, 3), 90, dtype=np.uint8)
    for p in (t.nir, t.tir):  # TIR and NIR both flat: nothing warm, nothing to fall back on
        Image.fromarray(flat).save(p, quality=90)
    assert main(["masks", "--dataset", "rgbnt201", "--root", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "masks written: 19" in out
    assert f"no foreground found (no mask written): 1\n  {t.rgb}" in out
    again = {x.name: x for x in read_split("rgbnt201", root, "train")}
    assert again[t.name].mask is None


def test_sam2_errors_name_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, droot = _synthetic(tmp_path, "rgbnt201")
    ckpt = tmp_path / "sam2.1_hiera_large.pt"
    rc = main(["masks", "--dataset", "rgbnt201", "--root", str(root), "--method", "sam2", "--checkpoint", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install 'stmi[sam2]'" in err  # the package is not installed here
    assert str(ckpt) in err and "does not exist" in err
    assert not (droot / "masks").exists(), "nothing may be written before the method can run"
    with pytest.raises(Sam2Unavailable, match="--checkpoint PATH"):
        check_sam2(None)
    assert infer_config(Path("/x/sam2.1_hiera_large.pt")) == "configs/sam2.1/sam2.1_hiera_l.yaml"
    assert infer_config(Path("sam2_hiera_base_plus.pt")) == "configs/sam2/sam2_hiera_b+.yaml"
    with pytest.raises(Sam2Unavailable, match="--sam2-config"):
        infer_config(Path("my_finetune.pt"))


def test_mask_box_margin() -> None:
    m = np.zeros((100, 50), dtype=bool)
    m[20:60, 10:30] = True
    assert mask_box(m, margin=0.1) == (8, 16, 31, 63)
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None


def test_otsu_splits_two_levels() -> None:
    v = np.concatenate([np.full(300, 0.2), np.full(100, 0.8)])
    t, eta = otsu_threshold(v)
    assert 0.2 <= t < 0.8 and eta > 0.99
    assert otsu_threshold(np.full(10, 0.5))[1] == 0.0


def _person_scene(rng: np.random.Generator, h: int = 256, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A warm person (head, torso, legs) split by a cold belt, warm clutter near the border, sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    truth = ((yy - 0.14 * h) / (0.07 * h)) ** 2 + ((xx - w / 2) / (0.12 * w)) ** 2 <= 1  # head
    truth |= (yy >= 0.2 * h) & (yy < 0.55 * h) & (np.abs(xx - w / 2) < 0.25 * w)  # torso
    truth |= (yy >= 0.55 * h) & (yy < 0.97 * h) & (np.abs(np.abs(xx - w / 2) - 0.1 * w) < 0.07 * w)  # legs
    img = 60 + 25 * (yy / h) + rng.normal(0, 10, (h, w))
    img[truth] = 190 + rng.normal(0, 10, truth.sum())
    img[truth & (np.abs(yy - 0.45 * h) < 3)] = 70  # a cold belt cuts the silhouette
    img[truth & ((yy - 0.3 * h) ** 2 + (xx - 0.45 * w) ** 2 < 36)] = 80  # a cold bag strap: a hole
    for cy, cx, r in ((10, 8, 6), (240, 118, 7), (130, 4, 5)):  # warm clutter (lamps, pipes) near the border
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    img[:, 3:5] = 185  # a thin warm pipe along the left edge
    return np.clip(img, 0, 255).astype(np.uint8), truth


def test_thermal_hard_person_beats_plain_otsu() -> None:
    rng = np.random.default_rng(0)
    ious, naive = [], []
    for _ in range(5):
        img, truth = _person_scene(rng)
        ious.append(mask_iou(thermal_mask(img), truth))
        t, _ = otsu_threshold(img / 255.0)
        naive.append(mask_iou(img / 255.0 > t, truth))
    assert np.mean(ious) >= 0.95, ious
    assert np.mean(ious) > np.mean(naive) + 0.05, (ious, naive)  # clean-up and components must matter


def test_thermal_black_hot_flat_and_nir_fallback() -> None:
    rng = np.random.default_rng(1)
    img, truth = _person_scene(rng)
    assert mask_iou(thermal_mask(255 - img), truth) >= 0.85  # black-hot palette: inverted by the border rule
    flat = np.full_like(img, 120)
    assert not thermal_mask(flat).any()
    wide = np.transpose(img)  # a wide frame (vehicle-like aspect)
    assert mask_iou(thermal_mask(wide), truth.T) >= 0.85
    filled = ndimage.binary_fill_holes(truth)
    assert mask_iou(thermal_mask(flat, nir=img), filled) >= 0.85  # flat TIR: NIR carries the object
