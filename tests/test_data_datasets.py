"""Readers of the three layouts, masks, captions, and every bad input of issue 3 (strict reads and ``check``).

The layouts are built here with the real name formats under a root whose own path contains ``_c`` and digits
(``data_7_c0001_7``): the reference regex run on the whole path, as the reference code does, would read pid 7,
camera 1 from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from stmi.data import DatasetError, TripletDataset, load_captions, load_dataset, read_split
from stmi.data.__main__ import main as data_main
from stmi.data.check import check_dataset

FW, FH = 8, 16  # tiny frames keep the tests fast; sizes are not what the readers check


def _jpg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (FW, FH)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def _png(path: Path, size: tuple[int, int] = (FW, FH)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size[1], size[0]), np.uint8)
    a[4:12, 2:6] = 255
    Image.fromarray(a).save(path)


def build_rgbnt201(root: Path) -> Path:
    d = root / "RGBNT201"
    train = ["000012_cam1_0_00.jpg", "000012_cam3_0_01.jpg", "000003_cam2_0_00.jpg", "000003_cam4_0_05.jpg"]
    test = ["000258_cam1_0_00.jpg", "000258_cam2_0_01.jpg", "000260_cam1_0_00.jpg"]
    for folder, names in (("train_171", train), ("test", test)):
        for n in names:
            for m, c in (("RGB", (200, 0, 0)), ("NI", (0, 200, 0)), ("TI", (0, 0, 200))):
                _jpg(d / folder / m / n, c)
    _png(d / "masks" / "train_171" / "000012_cam1_0_00.png")
    (d / "text").mkdir()
    (d / "text" / "train.json").write_text(json.dumps(
        [{"item": "000012_cam1_0_00.jpg", "description": "a woman in red"},
         {"item": "000003_cam2_0_00.jpg", "description": "  "}]))
    return root


def build_rgbnt100(root: Path) -> Path:
    d = root / "RGBNT100" / "rgbir"
    names = {"bounding_box_train": ["0561_c0003_006.jpg", "0561_c0001_000.jpg", "0002_c0008_001.jpg"],
             "query": ["0100_c0001_000.jpg"], "bounding_box_test": ["0100_c0002_001.jpg", "0101_c0001_000.jpg"]}
    for folder, ns in names.items():
        for n in ns:
            im = Image.new("RGB", (3 * FW, FH))
            for f, c in enumerate(((200, 0, 0), (0, 200, 0), (0, 0, 200))):
                im.paste(Image.new("RGB", (FW, FH), c), (f * FW, 0))
            (d / folder).mkdir(parents=True, exist_ok=True)
            im.save(d / folder / n, quality=95)
    _png(d / "masks" / "bounding_box_train" / "0561_c0003_006.png")
    return root


def build_msvr310(root: Path) -> Path:
    d = root / "MSVR310"
    names = {"bounding_box_train": ["0019_s012_v0_000.jpg", "0019_s013_v7_001.jpg", "0020_s012_v1_000.jpg"],
             "query3": ["0200_s100_v0_000.jpg"], "bounding_box_test": ["0200_s101_v2_000.jpg"]}
    for folder, ns in names.items():
        for n in ns:
            for m in ("vis", "ni", "th"):
                _jpg(d / folder / n[:4] / m / n, (90, 90, 90))
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data_7_c0001_7"
    r.mkdir()
    return r


def test_rgbnt201_reader(root: Path) -> None:
    build_rgbnt201(root)
    s = load_dataset("rgbnt201", root)
    assert [t.name for t in s.train] == sorted(t.name for t in s.train)
    assert [(t.pid, t.camid) for t in s.train] == [(3, 1), (3, 3), (12, 0), (12, 2)]
    assert s.query is s.gallery and {t.pid for t in s.query} == {258, 260}
    t = s.train[2]
    assert t.rgb.parent.name == "RGB" and t.nir.parent.name == "NI" and t.tir.parent.name == "TI"
    assert t.nir.name == t.rgb.name and t.frames is None and t.sceneid is None
    assert t.mask == root / "RGBNT201" / "masks" / "train_171" / "000012_cam1_0_00.png"
    assert t.caption == "a woman in red"
    # a blank description and an item absent from the file are both "no caption", counted, never ""
    assert s.train[0].caption is None and s.train[1].caption is None
    assert s.missing_captions == {"train": 3, "query": 3, "gallery": 3}
    assert read_split("rgbnt201", root, "train") == s.train


def test_rgbnt100_reader_parses_names_not_paths_and_splits_frames(root: Path) -> None:
    build_rgbnt100(root)
    s = load_dataset("rgbnt100", root)
    assert [(t.name, t.pid, t.camid) for t in s.train] == [
        ("0002_c0008_001.jpg", 2, 7), ("0561_c0001_000.jpg", 561, 0), ("0561_c0003_006.jpg", 561, 2)]
    assert [t.name for t in s.query] == ["0100_c0001_000.jpg"] and len(s.gallery) == 2
    t = s.train[2]
    assert t.rgb == t.nir == t.tir and t.frames == (0, 1, 2) and t.mask is not None
    item = TripletDataset([t], (FH, FW), train=False)[0]
    # frame 0 is red, 1 green, 2 blue: the dominant channel of each modality proves the split into thirds
    assert [int(item[m].mean((1, 2)).argmax()) for m in ("rgb", "nir", "tir")] == [0, 1, 2]
    assert item["has_mask"] and item["mask"].sum() == 32 and item["sceneid"] == -1 and item["pid"] == 561


def test_msvr310_reader_scene_field(root: Path) -> None:
    build_msvr310(root)
    s = load_dataset("msvr310", root)
    assert [(t.pid, t.sceneid, t.camid) for t in s.train] == [(19, 12, 0), (19, 13, 7), (20, 12, 1)]
    assert s.query[0].sceneid == 100 and s.gallery[0].sceneid == 101
    assert s.train[0].rgb.parts[-3:] == ("0019", "vis", "0019_s012_v0_000.jpg")
    assert s.train[0].tir.parts[-2] == "th"
    assert TripletDataset(s.query, (FH, FW), train=False)[0]["sceneid"] == 100


def test_caption_fallback_to_per_modality_files(root: Path) -> None:
    build_rgbnt201(root)
    text = root / "RGBNT201" / "text"
    (text / "train.json").unlink()
    for m, desc in (("RGB", "red coat"), ("NI", ""), ("TI", "warm body")):
        (text / f"train_{m}.json").write_text(json.dumps([{"item": "000012_cam1_0_00.jpg", "description": desc}]))
    caps = load_captions(root / "RGBNT201", "train")
    assert caps == {"000012_cam1_0_00.jpg": "red coat warm body"}
    s = load_dataset("rgbnt201", root)
    assert s.train[2].caption == "red coat warm body" and s.train[3].caption is None
    # the one-caption-per-triplet file wins over the per-modality files when both exist
    (text / "train.json").write_text(json.dumps([{"item": "000012_cam1_0_00.jpg", "description": "joint"}]))
    assert load_dataset("rgbnt201", root).train[2].caption == "joint"


def test_tokenized_text_and_missing_mask(root: Path) -> None:
    build_rgbnt201(root)
    s = load_dataset("rgbnt201", root)
    seen: list[list[str]] = []

    def tok(texts: list[str]) -> torch.Tensor:
        seen.append(texts)
        return torch.tensor([[len(x), 1, 2] for x in texts])

    ds = TripletDataset(s.train, (FH, FW), train=True, tokenizer=tok)
    it = ds[0]
    assert seen[-1] == [""] and it["text"].tolist() == [0, 1, 2] and not it["has_caption"]
    assert not it["has_mask"] and it["mask"].shape == (1, FH, FW) and it["mask"].abs().sum() == 0
    assert ds[2]["text"].tolist() == [len("a woman in red"), 1, 2] and ds[2]["has_caption"]
    assert "text" not in TripletDataset(s.train, (FH, FW), train=False)[0]


# ------------------------------------------------------------------------------------------------ bad inputs


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 4)


BAD_READ_CASES = {
    # case -> (builder, mutation, substring the message must contain)
    "missing modality": ("rgbnt201", lambda r: (r / "RGBNT201/train_171/TI/000003_cam2_0_00.jpg").unlink(),
                         "TI/000003_cam2_0_00.jpg"),
    "zero-byte image": ("rgbnt201", lambda r: (r / "RGBNT201/train_171/NI/000012_cam3_0_01.jpg").write_bytes(b""),
                        "NI/000012_cam3_0_01.jpg"),
    "unparsable name": ("rgbnt100", lambda r: _jpg(r / "RGBNT100/rgbir/bounding_box_train/car7.jpg", (0, 0, 0)),
                        "car7.jpg"),
    "duplicate name": ("rgbnt100", lambda r: _jpg(r / "RGBNT100/rgbir/query/0100_c0001_000.png", (0, 0, 0)),
                       "0100_c0001_000"),
    "pid out of range": ("rgbnt100", lambda r: _jpg(r / "RGBNT100/rgbir/bounding_box_test/0601_c0001_000.jpg",
                                                    (0, 0, 0)), "0601_c0001_000.jpg"),
    "camera out of range": ("rgbnt201", lambda r: [_jpg(r / f"RGBNT201/test/{m}/000258_cam5_0_09.jpg", (0, 0, 0))
                                                   for m in ("RGB", "NI", "TI")], "000258_cam5_0_09.jpg"),
    "msvr camera out of range": ("msvr310", lambda r: [_jpg(r / f"MSVR310/query3/0200/{m}/0200_s100_v8_001.jpg",
                                                            (0, 0, 0)) for m in ("vis", "ni", "th")],
                                 "0200_s100_v8_001.jpg"),
    "invalid caption json": ("rgbnt201", lambda r: (r / "RGBNT201/text/train.json").write_text("[{\"item\": "),
                             "train.json"),
    "empty split": ("msvr310", lambda r: [p.unlink() for p in (r / "MSVR310/query3").rglob("*.jpg")], "query3"),
    "wrong folder case": ("msvr310", lambda r: (r / "MSVR310").rename(r / "msvr310"), "msvr310"),
    "wrong modality folder case": ("rgbnt201", lambda r: (r / "RGBNT201/test/NI").rename(r / "RGBNT201/test/ni"),
                                   "test/ni"),
    "zero-byte mask": ("rgbnt201", lambda r: (r / "RGBNT201/masks/train_171/000012_cam1_0_00.png").write_bytes(b""),
                       "000012_cam1_0_00.png"),
}
BUILDERS = {"rgbnt201": build_rgbnt201, "rgbnt100": build_rgbnt100, "msvr310": build_msvr310}


@pytest.mark.parametrize("case", sorted(BAD_READ_CASES))
def test_bad_input_raises_at_read_and_is_reported_by_check(case: str, root: Path) -> None:
    dataset, mutate, needle = BAD_READ_CASES[case]
    BUILDERS[dataset](root)
    assert check_dataset(dataset, root).errors == []
    mutate(root)
    with pytest.raises(DatasetError, match=needle.replace("/", r"[/\\]")):
        load_dataset(dataset, root)
    errors = check_dataset(dataset, root).errors
    assert any(needle in e for e in errors), errors


def test_wrong_case_message_names_both_folders(root: Path) -> None:
    build_msvr310(root)
    (root / "MSVR310").rename(root / "msvr310")
    with pytest.raises(DatasetError) as e:
        load_dataset("msvr310", root)
    assert "msvr310" in str(e.value) and "'MSVR310'" in str(e.value) and "case" in str(e.value)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("rgbnt201", tmp_path / "nowhere")
    assert "nowhere" in check_dataset("rgbnt201", tmp_path / "nowhere").errors[0]


def test_unknown_dataset_is_a_dataset_error(root: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("market1501", root)


LOAD_TIME_CASES = {
    "corrupt jpeg": (lambda r: _corrupt(r / "RGBNT201/train_171/TI/000012_cam1_0_00.jpg"),
                     "TI/000012_cam1_0_00.jpg"),
    "truncated jpeg": (lambda r: (r / "RGBNT201/train_171/RGB/000012_cam1_0_00.jpg").write_bytes(
        (r / "RGBNT201/train_171/RGB/000012_cam1_0_00.jpg").read_bytes()[:200]), "RGB/000012_cam1_0_00.jpg"),
    "unreadable mask": (lambda r: _corrupt(r / "RGBNT201/masks/train_171/000012_cam1_0_00.png"),
                        "000012_cam1_0_00.png"),
    "wrong-size mask": (lambda r: _png(r / "RGBNT201/masks/train_171/000012_cam1_0_00.png", (FW, FH + 2)),
                        "000012_cam1_0_00.png"),
}


@pytest.mark.parametrize("case", sorted(LOAD_TIME_CASES))
def test_bad_file_contents_raise_with_path_when_loaded_and_in_check(case: str, root: Path) -> None:
    mutate, needle = LOAD_TIME_CASES[case]
    build_rgbnt201(root)
    mutate(root)
    s = load_dataset("rgbnt201", root)  # structure is fine; the contents fail when decoded
    ds = TripletDataset(s.train, (FH, FW), train=True)
    with pytest.raises(DatasetError, match=needle.replace("/", r"[/\\]")):
        for i in range(len(ds)):
            ds[i]
    errors = check_dataset("rgbnt201", root).errors
    assert len(errors) == 1 and needle in errors[0]


def test_bad_image_inside_a_loader_worker_names_the_path(root: Path) -> None:
    build_rgbnt201(root)
    _corrupt(root / "RGBNT201/train_171/NI/000012_cam3_0_01.jpg")
    ds = TripletDataset(load_dataset("rgbnt201", root).train, (FH, FW), train=True)
    with pytest.raises(DatasetError) as e:
        for _ in DataLoader(ds, batch_size=2, num_workers=1):
            pass
    assert "NI/000012_cam3_0_01.jpg" in str(e.value).replace("\\", "/")


def test_check_reports_every_problem_and_exits_1(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_rgbnt201(root)
    (root / "RGBNT201/train_171/TI/000003_cam2_0_00.jpg").unlink()
    _corrupt(root / "RGBNT201/test/RGB/000260_cam1_0_00.jpg")
    _jpg(root / "RGBNT201/test/RGB/person.jpg", (1, 1, 1))
    for m in ("NI", "TI"):
        _jpg(root / f"RGBNT201/test/{m}/person.jpg", (1, 1, 1))
    assert data_main(["check", "--dataset", "rgbnt201", "--root", str(root), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"train", "query", "gallery", "errors", "fingerprints"}
    assert out["train"] == {"ids": 2, "images": 3, "cameras": 3, "masks": 1, "captions": 1}
    assert out["query"] == out["gallery"] == {"ids": 2, "images": 3, "cameras": 2, "masks": 0, "captions": 0}
    joined = "\n".join(out["errors"])
    assert len(out["errors"]) == 3
    for needle in ("TI/000003_cam2_0_00.jpg", "test/RGB/000260_cam1_0_00.jpg", "person.jpg"):
        assert needle in joined
    assert data_main(["check", "--dataset", "rgbnt201", "--root", str(root)]) == 1
    captured = capsys.readouterr()
    assert "3 error(s)" in captured.out and "(33.3%)" in captured.out and "person.jpg" not in captured.out
    errors = captured.err.splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors) and "person.jpg" in captured.err
