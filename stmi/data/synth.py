"""Synthetic datasets in the real layouts, with masks and captions (docs/datasets.md).

What makes it a useful test bed rather than noise:

- Identities are recoverable only from the foreground. Each identity is a distinct (colour, shape, pattern)
  combination; every image pastes it at a slightly different position and scale onto a cluttered background drawn
  from a pool shared by all identities (randomly flipped and shifted), so the background carries no identity.
- The modalities render the object differently: RGB shows the colour with a darker pattern; NIR a grey level
  derived from the colour with the pattern inverted; TIR shows a WARM object (grey 175-235) on a COOL background
  (clutter at most ~95), plus noise, so a thermal-threshold mask method finds it (issue 7 relies on this).
- Cameras change the colour balance (and MSVR310 images come from two scenes per identity).
- The true masks are written to ``masks/`` (what the readers use) and again to ``.truth/masks/`` inside the dataset
  dir (ignored by the readers), so a mask-generation test can delete ``masks/`` and compare against the truth.
- Captions come from a template over the identity's attributes, in ``text/{train,test}.json``.

Identities 1..N: the first ``round(0.7 N)`` are training identities, the rest test identities. RGBNT201 writes all
test images to ``test/`` (query = gallery); the others put every fourth test image (index 0, 4, ...) in the query
folder and the rest in the gallery. Camera of image k: ``k % cameras``. Existing files of the same names are
overwritten; the output is a deterministic function of the arguments.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from stmi.data.datasets import Layout, get_layout, mask_path, truth_mask_path

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 80, 215), "yellow": (230, 210, 40),
    "purple": (140, 50, 185), "orange": (240, 135, 25), "cyan": (40, 200, 210), "pink": (240, 120, 180),
    "white": (235, 235, 235), "brown": (125, 75, 35), "black": (30, 30, 30), "olive": (120, 130, 30),
}
SHAPES: dict[str, list[tuple[float, float]] | None] = {
    "ellipse": None,
    "box": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "cross": [(0.3, 0), (0.7, 0), (0.7, 0.3), (1, 0.3), (1, 0.7), (0.7, 0.7), (0.7, 1), (0.3, 1), (0.3, 0.7),
              (0, 0.7), (0, 0.3), (0.3, 0.3)],
    "hourglass": [(0, 0), (1, 0), (0.62, 0.5), (1, 1), (0, 1), (0.38, 0.5)],
    "trapezoid": [(0.25, 0), (0.75, 0), (1, 1), (0, 1)],
}
PATTERNS = ("plain", "horizontal stripes", "vertical stripes", "checks")
MAX_IDS = len(COLOURS) * len(SHAPES) * len(PATTERNS)
BACKGROUND_POOL = 16


def identity_attributes(ids: int, seed: int) -> list[tuple[str, str, str]]:
    """Distinct (colour, shape, pattern) per identity, drawn without replacement from all combinations."""
    if not 2 <= ids <= MAX_IDS:
        raise ValueError(f"--ids must be in [2, {MAX_IDS}] (train and test identities; distinct attribute "
                         f"combinations), got {ids}")
    combos = list(itertools.product(COLOURS, SHAPES, PATTERNS))
    order = np.random.default_rng([seed, 1]).permutation(len(combos))[:ids]
    return [combos[i] for i in order]


def caption_for(kind: str, attrs: tuple[str, str, str]) -> str:
    """The template caption of an identity (what a captioner would say about the foreground)."""
    colour, shape, pattern = attrs
    texture = "no pattern" if pattern == "plain" else pattern
    return f"A {kind} with a {colour} {shape}-shaped body with {texture}, warm in the thermal image."


def _backgrounds(hw: tuple[int, int], seed: int) -> list[np.ndarray]:
    """A pool of cluttered RGB backgrounds shared by all identities."""
    h, w = hw
    rng = np.random.default_rng([seed, 2])
    pool = []
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(BACKGROUND_POOL):
        c0, c1 = rng.integers(40, 200, 3), rng.integers(40, 200, 3)
        t = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1)) % 1.0
        base = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.uint8)
        im = Image.fromarray(base)
        d = ImageDraw.Draw(im)
        for _ in range(28):
            x0, y0 = int(rng.integers(-20, w)), int(rng.integers(-20, h))
            x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            kind = rng.integers(0, 3)
            if kind == 0:
                d.rectangle((x0, y0, x1, y1), fill=fill)
            elif kind == 1:
                d.ellipse((x0, y0, x1, y1), fill=fill)
            else:
                d.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(2, 6)))
        pool.append(np.asarray(im))
    return pool


def _shape_mask(shape: str, box: tuple[int, int, int, int], hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    poly = SHAPES[shape]
    if poly is None:
        d.ellipse(box, fill=255)
    else:
        d.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in poly], fill=255)
    return np.asarray(m) > 0


class _Renderer:
    """Renders the three modality frames and the mask of one image of an identity."""

    def __init__(self, hw: tuple[int, int], seed: int) -> None:
        self.hw = hw
        self.pool = _backgrounds(hw, seed)
        self.yy, self.xx = np.mgrid[0:hw[0], 0:hw[1]]

    def render(self, attrs: tuple[str, str, str], cam_gain: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        h, w = self.hw
        colour, shape, pattern = attrs
        s = rng.uniform(0.75, 1.0)
        bh, bw = int(s * 0.8 * h), int(s * 0.8 * w)
        cy, cx = h / 2 + rng.uniform(-0.08, 0.08) * h, w / 2 + rng.uniform(-0.08, 0.08) * w
        y0, x0 = int(np.clip(cy - bh / 2, 0, h - bh)), int(np.clip(cx - bw / 2, 0, w - bw))
        mask = _shape_mask(shape, (x0, y0, x0 + bw - 1, y0 + bh - 1), self.hw)
        period = max(4, min(bh, bw) // 8)
        ry, rx = (self.yy - y0) // period, (self.xx - x0) // period
        pat = {"plain": np.zeros_like(ry), "horizontal stripes": ry % 2, "vertical stripes": rx % 2,
               "checks": (ry + rx) % 2}[pattern].astype(np.float32)
        col = np.asarray(COLOURS[colour], dtype=np.float32)
        lum = float(col @ np.array([0.2, 0.3, 0.5], dtype=np.float32))

        bg = self.pool[int(rng.integers(len(self.pool)))]
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        bg = np.roll(bg, (int(rng.integers(-20, 21)), int(rng.integers(-20, 21))), axis=(0, 1)).astype(np.float32)
        bg_gray = bg @ np.array([0.3, 0.4, 0.3], dtype=np.float32)

        m3 = mask[..., None]
        rgb = np.where(m3, col * (1 - 0.5 * pat[..., None]), bg) * cam_gain
        nir = np.where(mask, (50 + 0.75 * lum) * (0.55 + 0.45 * (1 - pat)), 0.8 * bg_gray)
        tir = np.where(mask, 175 + 0.15 * lum + 18 * pat, 15 + 0.3 * bg_gray)
        rgb = rgb + rng.normal(0, 4, rgb.shape)
        nir = nir + rng.normal(0, 5, nir.shape)
        tir = tir + rng.normal(0, 6, tir.shape)

        def u8(a: np.ndarray) -> np.ndarray:
            return np.clip(a, 0, 255).astype(np.uint8)

        grey3 = lambda a: np.repeat(u8(a)[..., None], 3, axis=2)  # noqa: E731
        return u8(rgb), grey3(nir), grey3(tir), (mask.astype(np.uint8) * 255)


def _save_jpg(a: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=90)


def _save_png(a: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="L").save(path)


def make_synthetic(dataset: str, out: str | Path, ids: int, seed: int = 0, images_per_id: int = 8,
                   cameras: int = 3, progress: bool = False) -> Path:
    """Write a synthetic ``dataset`` under ``out`` in its real layout; return ``out`` (the ``cfg.data.root``).

    Args:
        dataset: rgbnt201 | rgbnt100 | msvr310.
        out: folder that receives ``<DATASET FOLDER>/...``.
        ids: identities (>= 2; about 70 % train, the rest test).
        seed: everything drawn from it (same arguments -> same files).
        images_per_id: triplets per identity (>= 2).
        cameras: cameras per identity (>= 2, at most the dataset's camera count).
        progress: show a tqdm bar on stderr.
    """
    layout: Layout = get_layout(dataset)
    n_cams = layout.cam_range[1] - layout.cam_range[0] + 1
    if not 2 <= cameras <= n_cams:
        raise ValueError(f"--cameras must be in [2, {n_cams}] for {layout.name}, got {cameras}")
    if images_per_id < 2:
        raise ValueError(f"--images-per-id must be >= 2 (an identity needs a query and a gallery image), "
                         f"got {images_per_id}")
    attrs = identity_attributes(ids, seed)
    out = Path(out)
    droot = out.joinpath(layout.folder, *layout.subdir)
    renderer = _Renderer(layout.frame_hw, seed)
    gains = [np.random.default_rng([seed, 3, c]).uniform(0.75, 1.15, 3).astype(np.float32) for c in range(cameras)]
    n_train = min(ids - 1, max(1, int(round(0.7 * ids))))
    assert layout.format_name is not None
    captions: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    bar = tqdm(total=ids * images_per_id, desc=f"synth {layout.name}", unit="triplet", disable=not progress)
    for i, a in enumerate(attrs):
        pid = i + 1
        is_train = i < n_train
        rng = np.random.default_rng([seed, 4, pid])
        caption = caption_for(layout.kind, a)
        for k in range(images_per_id):
            cam = k % cameras
            scene = (2 * pid + (2 * k) // images_per_id) % 1000
            name = layout.format_name(pid, cam + layout.cam_range[0], scene, k)
            if is_train:
                split = "train"
            elif layout.shared_query_gallery or k % 4 != 0:
                split = "gallery"
            else:
                split = "query"
            folder = layout.split_folders[split]
            base = droot / folder / (f"{pid:04d}" if layout.id_folders else "")
            rgb, nir, tir, mask = renderer.render(a, gains[cam], rng)
            if layout.packed:
                _save_jpg(np.concatenate([rgb, nir, tir], axis=1), base / name)
            else:
                for sub, img in zip(layout.modality_folders, (rgb, nir, tir)):
                    _save_jpg(img, base / sub / name)
            _save_png(mask, mask_path(droot, folder, name))
            _save_png(mask, truth_mask_path(droot, folder, name))
            captions[layout.text_splits[split]].append({"item": name, "description": caption})
            bar.update(1)
    bar.close()
    (droot / "text").mkdir(parents=True, exist_ok=True)
    for split, items in captions.items():
        (droot / "text" / f"{split}.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
    return out
