"""Readers of the three dataset layouts, masks and per-triplet captions (docs/datasets.md), and the registry of
dataset facts (:data:`LAYOUTS`): every per-dataset value the code needs (folders, name parser, camera range, frame
size, the anchors' batch) lives in one :class:`Layout`, which recipes, the synthetic generator and the command lines
read instead of keeping their own tables.

Users already hold RGBNT201, RGBNT100 and MSVR310 in the layouts of the reference code; we read them exactly so,
without renaming, and avoid that code's faults: names are parsed on the file name (never the whole path, so a root
such as ``/data_c0001_7`` cannot fool the parser), listings are sorted, a missing caption is ``None`` (not a silent
empty string), captions are looked up in a dict, and the dataset's behaviour comes from a :class:`Layout` record
rather than from string compares scattered through the code.

Every bad input raises :class:`DatasetError` naming the path and the fix. The same readers run in two modes: strict
(:func:`read_split`, :func:`load_dataset`: raise on the first problem) and collecting (``stmi.data.check``: report
them all), through a small :class:`Reporter`.

RGBNT100 stores the three modalities side by side in one 768x128 file: its :class:`Triplet` carries the same path in
``rgb``, ``nir`` and ``tir`` and ``frames = (0, 1, 2)``, the index of each modality's 256-pixel-wide third.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""File suffixes read as images (case-insensitive); other files and hidden files in image folders are ignored."""

SPLITS = ("train", "query", "gallery")


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; the message names the path and the fix."""


@dataclass(frozen=True)
class Triplet:
    """One RGB + NIR + TIR sample of an object.

    Attributes:
        name: the RGB file name (the key of masks and captions).
        rgb, nir, tir: paths of the modality images (RGBNT100: the same side-by-side file three times).
        pid: the identity as written in the file name (loaders relabel training ids to 0..C-1).
        camid: 0-based camera index.
        sceneid: MSVR310 scene id (its evaluation rule removes same-id same-scene matches), else None.
        mask: path of the foreground mask PNG, or None when the triplet has none.
        caption: the triplet's description, or None when it has none (missing or empty in the caption file).
        frames: RGBNT100 only: horizontal frame index of (rgb, nir, tir) inside the packed file, i.e. (0, 1, 2).
        split_folder: the folder of the split (``train_171``, ``bounding_box_test`` ...), which also names the mask
            folder ``masks/<split_folder>/``.
    """

    name: str
    rgb: Path
    nir: Path
    tir: Path
    pid: int
    camid: int
    sceneid: int | None = None
    mask: Path | None = None
    caption: str | None = None
    frames: tuple[int, int, int] | None = None
    split_folder: str = ""


class Reporter:
    """Routes problems either to an exception (strict) or to a list (the ``check`` command)."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        """Raise :class:`DatasetError` in strict mode, else record ``msg`` (once) and let the caller skip the item."""
        if self.strict:
            raise DatasetError(msg)
        if msg not in self.errors:
            self.errors.append(msg)


# ----------------------------------------------------------------------------------------------- name parsing

_RGBNT201_RE = re.compile(r"(\d{6})[^_]*_cam(\d+)(?:_.*)?")
_RGBNT100_RE = re.compile(r"([-\d]+)_c([-\d]+)")
_MSVR310_RE = re.compile(r"(\d{4})_s(\d{3})_v(\d)(?:_.*)?")


def parse_rgbnt201(stem: str) -> tuple[int, int, int | None]:
    """``000258_cam1_0_00`` -> (pid 258, camera 1 as written, no scene)."""
    m = _RGBNT201_RE.fullmatch(stem)
    if not m:
        raise ValueError("expected <6-digit pid>_cam<camera>_..., e.g. 000258_cam1_0_00.jpg")
    return int(m.group(1)), int(m.group(2)), None


def parse_rgbnt100(stem: str) -> tuple[int, int, int | None]:
    """``0561_c0001_006`` -> (pid 561, camera 1 as written); the reference regex, matched at the name's start."""
    m = _RGBNT100_RE.match(stem)
    if not m:
        raise ValueError("expected <pid>_c<camera>_..., e.g. 0561_c0001_006.jpg")
    try:
        return int(m.group(1)), int(m.group(2)), None
    except ValueError:
        raise ValueError("pid and camera must be integers, e.g. 0561_c0001_006.jpg") from None


def parse_msvr310(stem: str) -> tuple[int, int, int | None]:
    """``0019_s012_v0_000`` -> (vid 19, camera 0, scene 12): name[0:4], name[11], name[6:9] as the reference."""
    m = _MSVR310_RE.fullmatch(stem)
    if not m:
        raise ValueError("expected <4-digit vid>_s<3-digit scene>_v<camera digit>_..., e.g. 0019_s012_v0_000.jpg")
    return int(m.group(1)), int(m.group(3)), int(m.group(2))


# ----------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class RawEntry:
    """A triplet as found on disk, before its name is parsed."""

    name: str
    rgb: Path
    nir: Path
    tir: Path
    frames: tuple[int, int, int] | None = None
    folder_pid: int | None = None
    """MSVR310: the ``<vid>`` folder the files live in (must agree with the name)."""


Lister = Callable[[Path, "Reporter"], list[RawEntry]]


@dataclass(frozen=True)
class Layout:
    """Everything that differs between the datasets, so no code switches on the dataset's name."""

    name: str
    folder: str
    """Folder under the root, case-sensitive (``RGBNT201``)."""
    subdir: tuple[str, ...]
    """Path from ``folder`` to the dataset dir that holds the splits, ``masks/`` and ``text/``."""
    split_folders: dict[str, str]
    text_splits: dict[str, str]
    """Split -> caption file stem (query and gallery read ``test``)."""
    parse: Callable[[str], tuple[int, int, int | None]]
    lister: Lister
    pid_range: tuple[int, int]
    cam_range: tuple[int, int]
    """Camera numbers as written in names, inclusive; stored minus ``cam_range[0]`` (0-based)."""
    frame_hw: tuple[int, int]
    """(H, W) of one modality frame in the real data: what the synthetic generator writes and the input size the
    paper trains at (256x128 persons, 128x256 vehicles)."""
    modality_folders: tuple[str, str, str]
    anchor_batch: tuple[int, int]
    """(batch size, instances per identity) the paper and its anchors train this dataset with (P x K sampler)."""
    packed: bool = False
    """Three modalities side by side in one file (RGBNT100)."""
    uses_scenes: bool = False
    kind: str = "person"
    """person | vehicle (synthetic captions)."""
    id_folders: bool = False
    """Each split holds one folder per identity (MSVR310 ``<vid>/``)."""
    format_name: Callable[[int, int, int, int], str] | None = None
    """``(pid, camera as written, scene, index) -> file name`` in the dataset's convention (synthetic data)."""

    @property
    def num_cameras(self) -> int:
        """Cameras of the dataset (the size of ``cam_range``): the SIE embedding's table size."""
        return self.cam_range[1] - self.cam_range[0] + 1

    @property
    def shared_query_gallery(self) -> bool:
        """RGBNT201's test set is both query and gallery."""
        return self.split_folders["query"] == self.split_folders["gallery"]


def _image_files(d: Path, rep: Reporter) -> dict[str, Path]:
    """Sorted ``{stem: path}`` of the images of a folder; a stem seen twice (``a.jpg`` + ``a.png``) is an error."""
    out: dict[str, Path] = {}
    lower: dict[str, Path] = {}
    for n in sorted(os.listdir(d)):
        p = d / n
        if n.startswith(".") or Path(n).suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        stem = Path(n).stem
        if stem.lower() in lower:
            rep.error(f"duplicate name: {p} and {lower[stem.lower()]} have the same stem {stem!r} (masks and "
                      f"captions are keyed by it); remove one of them")
            continue
        lower[stem.lower()] = p
        out[stem] = p
    return out


def _subdir(parent: Path, name: str, rep: Reporter) -> Path | None:
    """``parent/name`` if it exists with exactly that case, else report (naming a wrong-case folder found)."""
    try:
        entries = os.listdir(parent)
    except OSError as e:
        rep.error(f"cannot list {parent}: {e}")
        return None
    if name in entries and (parent / name).is_dir():
        return parent / name
    wrong = [e for e in entries if e.lower() == name.lower() and (parent / e).is_dir()]
    if wrong:
        rep.error(f"found folder {parent / wrong[0]} but expected {parent / name}: folder names are case-sensitive "
                  f"(docs/datasets.md); rename it to {name!r}")
    else:
        rep.error(f"missing folder {parent / name}; see docs/datasets.md for the expected layout")
    return None


def _zero_byte(paths: Iterable[Path], rep: Reporter) -> bool:
    for p in paths:
        if p.stat().st_size == 0:
            rep.error(f"empty (zero-byte) image file {p}; re-copy it from the original dataset or remove the triplet")
            return True
    return False


def _pair_modalities(dirs: tuple[Path, Path, Path], rep: Reporter, folder_pid: int | None = None) -> list[RawEntry]:
    """Match the RGB, NIR and TIR folders by file name; a file lacking a partner is an error."""
    rgb, nir, tir = (_image_files(d, rep) for d in dirs)
    out = []
    for stem, p in rgb.items():
        others = []
        for files, d in ((nir, dirs[1]), (tir, dirs[2])):
            q = files.get(stem)
            if q is None:
                rep.error(f"missing modality file: {d / p.name} (partner of {p}); every RGB image needs a NIR and a "
                          f"TIR image of the same name")
            elif q.name != p.name:
                rep.error(f"modality file {q} does not have the name of its RGB partner {p.name}; rename it")
                q = None
            others.append(q)
        if others[0] is None or others[1] is None or _zero_byte((p, others[0], others[1]), rep):
            continue
        out.append(RawEntry(p.name, p, others[0], others[1], folder_pid=folder_pid))
    for files, d in ((nir, dirs[1]), (tir, dirs[2])):
        for stem, q in files.items():
            if stem not in rgb:
                rep.error(f"missing modality file: {dirs[0] / q.name} (RGB partner of {q})")
    return out


def _list_rgbnt201(split_dir: Path, rep: Reporter) -> list[RawEntry]:
    dirs = [_subdir(split_dir, m, rep) for m in ("RGB", "NI", "TI")]
    if any(d is None for d in dirs):
        return []
    return _pair_modalities((dirs[0], dirs[1], dirs[2]), rep)  # type: ignore[arg-type]


def _list_rgbnt100(split_dir: Path, rep: Reporter) -> list[RawEntry]:
    out = []
    for p in _image_files(split_dir, rep).values():
        if not _zero_byte((p,), rep):
            out.append(RawEntry(p.name, p, p, p, frames=(0, 1, 2)))
    return out


def _list_msvr310(split_dir: Path, rep: Reporter) -> list[RawEntry]:
    out = []
    for vid in sorted(os.listdir(split_dir)):
        vdir = split_dir / vid
        if vid.startswith(".") or not vdir.is_dir():
            continue
        if not vid.isdigit():
            rep.error(f"unexpected folder {vdir}: MSVR310 splits hold one folder per vehicle id (e.g. 0019/)")
            continue
        dirs = [_subdir(vdir, m, rep) for m in ("vis", "ni", "th")]
        if any(d is None for d in dirs):
            continue
        out.extend(_pair_modalities((dirs[0], dirs[1], dirs[2]), rep, folder_pid=int(vid)))  # type: ignore[arg-type]
    return out


def _name_rgbnt201(pid: int, cam: int, scene: int, k: int) -> str:
    return f"{pid:06d}_cam{cam}_0_{k:02d}.jpg"


def _name_rgbnt100(pid: int, cam: int, scene: int, k: int) -> str:
    return f"{pid:04d}_c{cam:04d}_{k:03d}.jpg"


def _name_msvr310(pid: int, cam: int, scene: int, k: int) -> str:
    return f"{pid:04d}_s{scene:03d}_v{cam}_{k:03d}.jpg"


LAYOUTS: dict[str, Layout] = {
    "rgbnt201": Layout(
        name="rgbnt201", folder="RGBNT201", subdir=(),
        split_folders={"train": "train_171", "query": "test", "gallery": "test"},
        text_splits={"train": "train", "query": "test", "gallery": "test"},
        parse=parse_rgbnt201, lister=_list_rgbnt201, pid_range=(0, 999_999), cam_range=(1, 4),
        frame_hw=(256, 128), modality_folders=("RGB", "NI", "TI"), anchor_batch=(72, 8), kind="person",
        format_name=_name_rgbnt201),
    "rgbnt100": Layout(
        name="rgbnt100", folder="RGBNT100", subdir=("rgbir",),
        split_folders={"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"},
        text_splits={"train": "train", "query": "test", "gallery": "test"},
        parse=parse_rgbnt100, lister=_list_rgbnt100, pid_range=(1, 600), cam_range=(1, 8),
        frame_hw=(128, 256), modality_folders=("", "", ""), anchor_batch=(128, 16), packed=True, kind="vehicle",
        format_name=_name_rgbnt100),
    "msvr310": Layout(
        name="msvr310", folder="MSVR310", subdir=(),
        split_folders={"train": "bounding_box_train", "query": "query3", "gallery": "bounding_box_test"},
        text_splits={"train": "train", "query": "test", "gallery": "test"},
        parse=parse_msvr310, lister=_list_msvr310, pid_range=(0, 9999), cam_range=(0, 7),
        frame_hw=(128, 256), modality_folders=("vis", "ni", "th"), anchor_batch=(64, 8), uses_scenes=True,
        kind="vehicle", id_folders=True, format_name=_name_msvr310),
}
"""The registry of dataset facts: dataset name -> :class:`Layout`."""

DATASETS: tuple[str, ...] = tuple(LAYOUTS)
"""The dataset names, in the order the sweep runs them (``stmi.config.DATASETS`` is this tuple)."""


def get_layout(dataset: str) -> Layout:
    """The :class:`Layout` of ``rgbnt201 | rgbnt100 | msvr310`` (case-insensitive)."""
    try:
        return LAYOUTS[dataset.lower()]
    except KeyError:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {sorted(LAYOUTS)} (cfg.data.dataset / "
                           f"--dataset)") from None


def dataset_dir(dataset: str, root: str | Path, rep: Reporter | None = None) -> Path:
    """``<root>/<FOLDER>[/rgbir]``: the folder holding the splits, ``masks/`` and ``text/``.

    Raises:
        DatasetError: the root does not exist, or a folder is missing or has the wrong case (named in the message).
    """
    rep = rep or Reporter(strict=True)
    layout = get_layout(dataset)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; pass the folder that contains "
                           f"{layout.folder}/ (cfg.data.root / --root)")
    d: Path | None = root
    for part in (layout.folder, *layout.subdir):
        d = _subdir(d, part, rep) if d is not None else None
    if d is None:
        raise DatasetError(rep.errors[0] if rep.errors else f"no {layout.folder} folder under {root}")
    return d


def mask_path(dataset_root: Path, split_folder: str, name: str) -> Path:
    """Where the mask of the triplet ``name`` lives: ``<dataset dir>/masks/<split folder>/<stem>.png``."""
    return dataset_root / "masks" / split_folder / (Path(name).stem + ".png")


def truth_mask_path(dataset_root: Path, split_folder: str, name: str) -> Path:
    """Where the synthetic generator writes the true mask: ``<dataset dir>/.truth/masks/...`` (readers ignore it)."""
    return dataset_root / ".truth" / "masks" / split_folder / (Path(name).stem + ".png")


# ----------------------------------------------------------------------------------------------- captions


def _read_caption_file(path: Path, rep: Reporter) -> dict[str, str]:
    """``[{"item": name, "description": text}, ...]`` -> ``{name: text}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        rep.error(f"caption file {path} is not valid JSON ({e}); fix or regenerate it "
                  f"(python -m stmi.preprocess captions)")
        return {}
    if not isinstance(data, list):
        rep.error(f"caption file {path} must hold a JSON list of {{\"item\": ..., \"description\": ...}} objects")
        return {}
    out: dict[str, str] = {}
    for i, e in enumerate(data):
        if not (isinstance(e, dict) and isinstance(e.get("item"), str) and isinstance(e.get("description"), str)):
            rep.error(f"caption file {path}: entry {i} is not {{\"item\": <file name>, \"description\": <text>}}")
            continue
        if e["item"] in out and out[e["item"]] != e["description"]:
            rep.error(f"caption file {path}: item {e['item']!r} appears twice with different descriptions")
            continue
        out[e["item"]] = e["description"]
    return out


def load_captions(dataset_root: Path, text_split: str, rep: Reporter | None = None) -> dict[str, str]:
    """Captions of one split (``train`` or ``test``) as ``{RGB file name: description}``.

    Reads ``text/<split>.json`` (one caption per triplet, docs/datasets.md "Captions"); when it is absent, IDEA's
    per-modality ``text/<split>_{RGB,NI,TI}.json``, joining the non-empty descriptions of a triplet in RGB, NI, TI
    order. No file at all -> ``{}`` (the triplets have no caption). Descriptions may be empty; callers treat empty as
    missing.
    """
    rep = rep or Reporter(strict=True)
    text = dataset_root / "text"
    single = text / f"{text_split}.json"
    if single.is_file():
        return _read_caption_file(single, rep)
    per_modality = [text / f"{text_split}_{m}.json" for m in ("RGB", "NI", "TI")]
    parts: dict[str, list[str]] = {}
    for p in per_modality:
        if p.is_file():
            for item, desc in _read_caption_file(p, rep).items():
                parts.setdefault(item, [])
                if desc.strip():
                    parts[item].append(desc.strip())
    return {item: " ".join(ds) for item, ds in parts.items()}


# ----------------------------------------------------------------------------------------------- splits


def _read_split(layout: Layout, droot: Path, split: str, rep: Reporter,
                captions: dict[str, str] | None = None) -> list[Triplet]:
    folder = layout.split_folders[split]
    errors_before = len(rep.errors)
    split_dir = _subdir(droot, folder, rep)
    if split_dir is None:
        return []
    entries = layout.lister(split_dir, rep)
    if captions is None:
        captions = load_captions(droot, layout.text_splits[split], rep)
    mdir = droot / "masks" / folder
    masks = {Path(n).stem: mdir / n for n in os.listdir(mdir) if n.lower().endswith(".png")} if mdir.is_dir() else {}
    lo_p, hi_p = layout.pid_range
    lo_c, hi_c = layout.cam_range
    seen: dict[str, Path] = {}
    out: list[Triplet] = []
    for e in entries:
        stem = Path(e.name).stem
        try:
            pid, cam, scene = layout.parse(stem)
        except ValueError as err:
            rep.error(f"cannot parse the file name {e.rgb}: {err}; rename the file")
            continue
        if not lo_p <= pid <= hi_p:
            rep.error(f"pid {pid} out of range [{lo_p}, {hi_p}] in {e.rgb}; fix the file name")
            continue
        if not lo_c <= cam <= hi_c:
            rep.error(f"camera {cam} out of range [{lo_c}, {hi_c}] in {e.rgb}; fix the file name")
            continue
        if e.folder_pid is not None and e.folder_pid != pid:
            rep.error(f"{e.rgb}: the name says id {pid} but the file is in folder {e.rgb.parent.parent.name}/; "
                      f"move it to its id's folder")
            continue
        if stem in seen:
            rep.error(f"duplicate name {e.name}: {e.rgb} and {seen[stem]}; remove one of them")
            continue
        seen[stem] = e.rgb
        m = masks.get(stem)
        if m is not None and m.stat().st_size == 0:
            rep.error(f"empty (zero-byte) mask {m}; regenerate it (python -m stmi.preprocess masks) or delete it")
            continue
        desc = captions.get(e.name)
        out.append(Triplet(
            name=e.name, rgb=e.rgb, nir=e.nir, tir=e.tir, pid=pid, camid=cam - lo_c, sceneid=scene, mask=m,
            caption=desc.strip() if desc and desc.strip() else None, frames=e.frames, split_folder=folder))
    if not out and len(rep.errors) == errors_before:
        rep.error(f"empty split: no images in {split_dir}; copy the {split} images there (layouts: docs/datasets.md)")
    out.sort(key=lambda t: t.name)
    return out


def read_split(dataset: str, root: str | Path, split: str) -> list[Triplet]:
    """Read one split (``train | query | gallery``) of a dataset, sorted by file name.

    Raises:
        DatasetError: on the first bad input (missing or wrong-case folder, missing modality file, zero-byte image,
            unparsable or duplicate name, pid or camera out of range, invalid caption JSON, empty split). Image
            contents (corrupt JPEG, bad mask) are checked when a sample is loaded and by ``stmi.data check``.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    layout = get_layout(dataset)
    droot = dataset_dir(dataset, root)
    return _read_split(layout, droot, split, Reporter(strict=True))


@dataclass(frozen=True)
class DatasetSplits:
    """The three splits of a dataset (RGBNT201: ``query`` and ``gallery`` are the same test list)."""

    dataset: str
    root: Path
    """The dataset dir (``<root>/RGBNT201``, ``<root>/RGBNT100/rgbir``, ...)."""
    train: list[Triplet]
    query: list[Triplet]
    gallery: list[Triplet]
    layout: Layout = field(repr=False, default=LAYOUTS["rgbnt201"])

    @property
    def missing_captions(self) -> dict[str, int]:
        """Triplets without a caption per split (counted and logged; the model sees an empty caption)."""
        return {s: sum(t.caption is None for t in getattr(self, s)) for s in SPLITS}


def read_all(dataset: str, root: str | Path, rep: Reporter) -> DatasetSplits:
    """All splits under ``rep`` (strict or collecting); the shared RGBNT201 test split is read once."""
    layout = get_layout(dataset)
    droot = dataset_dir(dataset, root, rep)
    caps: dict[str, dict[str, str]] = {}
    splits: dict[str, list[Triplet]] = {}
    by_folder: dict[str, list[Triplet]] = {}
    for s in SPLITS:
        folder = layout.split_folders[s]
        if folder in by_folder:
            splits[s] = by_folder[folder]
            continue
        ts = layout.text_splits[s]
        if ts not in caps:
            caps[ts] = load_captions(droot, ts, rep)
        splits[s] = by_folder[folder] = _read_split(layout, droot, s, rep, caps[ts])
    return DatasetSplits(layout.name, droot, splits["train"], splits["query"], splits["gallery"], layout)


def load_dataset(dataset: str, root: str | Path) -> DatasetSplits:
    """Read train, query and gallery (strict: the first bad input raises :class:`DatasetError`)."""
    return read_all(dataset, root, Reporter(strict=True))
