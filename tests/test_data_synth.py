"""Synthetic datasets: real layouts that ``check`` accepts, warm thermal objects, true masks, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from stmi.data import load_dataset, truth_mask_path
from stmi.data.__main__ import main as data_main
from stmi.data.check import check_dataset
from stmi.data.synth import make_synthetic

CHECK_SCHEMA = {
    "type": "object",
    "required": ["errors"],
    "properties": {"errors": {"type": "array", "items": {"type": "string"}}},
    "patternProperties": {"^(train|query|gallery)$": {
        "type": "object", "additionalProperties": False,
        "required": ["ids", "images", "cameras", "masks", "captions"],
        "properties": {k: {"type": "integer"} for k in ("ids", "images", "cameras", "masks", "captions")}}},
    "additionalProperties": False,
}


@pytest.mark.parametrize("dataset", ["rgbnt201", "rgbnt100", "msvr310"])
def test_synth_round_trip_through_check(tmp_path: Path, dataset: str) -> None:
    root = make_synthetic(dataset, tmp_path / "out_3_c0002_3", ids=5, seed=1, images_per_id=4, cameras=2)
    report = check_dataset(dataset, root)
    assert report.errors == []
    tr = report.splits["train"]
    assert tr == {"ids": 4, "images": 16, "cameras": 2, "masks": 16, "captions": 16}  # round(0.7 * 5) train ids
    q, g = report.splits["query"], report.splits["gallery"]
    if dataset == "rgbnt201":
        assert q == g == {"ids": 1, "images": 4, "cameras": 2, "masks": 4, "captions": 4}
    else:
        assert q["images"] == 1 and g["images"] == 3 and q["ids"] == g["ids"] == 1
    s = load_dataset(dataset, root)
    if dataset == "msvr310":
        assert {t.sceneid for t in s.train if t.pid == 1} == {2, 3}  # two scenes per identity
    for t in s.train[:4]:
        truth = truth_mask_path(s.root, t.split_folder, t.name)
        assert t.mask is not None and truth.read_bytes() == t.mask.read_bytes()
    assert "red" in s.train[0].caption or any(c in s.train[0].caption for c in ("green", "blue", "white", "black",
                                                                                "yellow", "purple", "orange", "cyan",
                                                                                "pink", "brown", "olive"))


def _frames(t) -> list[np.ndarray]:  # noqa: ANN001
    from stmi.data.dataset import load_frames

    return [np.asarray(f.convert("L"), dtype=np.float32) for f in load_frames(t)]


@pytest.mark.parametrize("dataset", ["rgbnt201", "rgbnt100"])
def test_thermal_object_is_warm_and_thresholdable(tmp_path: Path, dataset: str) -> None:
    s = load_dataset(dataset, make_synthetic(dataset, tmp_path, ids=4, seed=2, images_per_id=3))
    ious = []
    for t in s.train:
        tir = _frames(t)[2]
        m = np.asarray(Image.open(t.mask)) > 0
        assert tir[m].mean() > tir[~m].mean() + 90 and np.percentile(tir[~m], 99) < 130
        pred = tir > 135  # a fixed thermal threshold already recovers the object
        ious.append((pred & m).sum() / (pred | m).sum())
    assert min(ious) > 0.9


def test_identity_lives_in_the_foreground(tmp_path: Path) -> None:
    s = load_dataset("rgbnt201", make_synthetic("rgbnt201", tmp_path, ids=6, seed=3, images_per_id=4, cameras=2))
    masks = {t.name: np.asarray(Image.open(t.mask)) > 0 for t in s.train}
    by_pid: dict[int, list] = {}
    for t in s.train:
        by_pid.setdefault(t.pid, []).append(t)
    a, b = by_pid[1][:2]
    assert not np.array_equal(masks[a.name], masks[b.name])  # position / scale vary between images of an id
    # the same camera sees the same foreground colour for an id; different ids differ in colour, shape or pattern
    fg = {}
    for pid, ts in by_pid.items():
        t = ts[0]
        rgb = np.asarray(Image.open(t.rgb), dtype=np.float32)
        fg[pid] = (rgb[masks[t.name]].mean(0), masks[t.name].mean())
    keys = sorted(fg)
    diffs = [np.abs(fg[i][0] - fg[j][0]).max() + 100 * abs(fg[i][1] - fg[j][1]) for i in keys for j in keys if i < j]
    assert min(diffs) > 3


def test_synth_is_deterministic_and_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    a = make_synthetic("msvr310", tmp_path / "a", ids=10, seed=4, images_per_id=8)
    elapsed = time.perf_counter() - t0
    b = make_synthetic("msvr310", tmp_path / "b", ids=10, seed=4, images_per_id=8)
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb and len(fa) == 80 * 5 + 2  # 3 modalities + mask + truth mask per triplet, 2 caption files
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in fa[::17])
    assert elapsed < 15, elapsed


def test_cli_synth_then_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["synth", "--dataset", "rgbnt100", "--out", str(tmp_path), "--ids", "4", "--seed", "5",
                      "--images-per-id", "4", "--cameras", "2"]) == 0
    capsys.readouterr()
    assert data_main(["check", "--dataset", "rgbnt100", "--root", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(out, CHECK_SCHEMA)
    assert out["errors"] == [] and out["train"]["images"] == 12 and set(out) == {"train", "query", "gallery", "errors"}
    assert data_main(["synth", "--dataset", "rgbnt100", "--out", str(tmp_path), "--ids", "1"]) == 2
    assert "--ids" in capsys.readouterr().err


def test_help_reads_well() -> None:
    run = [sys.executable, "-m", "stmi.data"]
    top = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    assert "synth" in top and "check" in top and "Examples" in top
    chk = " ".join(subprocess.run([*run, "check", "--help"], capture_output=True, text=True, check=True).stdout.split())
    assert "--json" in chk and "Exit status 0" in chk
