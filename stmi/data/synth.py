"""Synthetic datasets in the real layouts, with masks and captions (docs/datasets.md): a benchmark that is hard in
the ways real multi-modal ReID is hard, plus an ``easy`` mode for smoke tests that only need something learnable.

``difficulty="hard"`` (the default of ``python -m stmi.data synth`` and of :func:`make_synthetic`):

- **Backgrounds belong to the camera.** Each camera films one scene of its own (a cluttered canvas; every image is
  a slightly shifted crop of it under a slightly different light). All identities a camera sees share that scene and
  no other camera shows it, so two images of *different* identities in one camera look alike, while an identity's
  true matches are in other cameras (the protocol removes same-identity same-camera gallery entries). A model that
  looks at the whole frame ranks same-camera strangers first.
- **An identity is a combination of attributes from small palettes**: upper colour, lower colour and a mark
  (persons: none / backpack / stripe / hat; vehicles: none / stripe / roof rack / spoiler). Combinations are unique
  per identity while every single attribute value in use is shared by at least two identities (for >= 4
  identities), so no single attribute singles an identity out. The silhouette is the same for every identity
  (a person or a vehicle; scale, position, flip and leg spread vary per image), so shape gives nothing away.
- **Realistic object size**: the foreground covers roughly 25-45 % of the frame.
- **Clutter in the objects' colours**: the scenes are drawn with the same palette as the objects (plus greys).
- **Cameras change the colour balance** (a per-camera RGB gain) and every image gets sensor noise.
- **Captions name only part of the attributes** (``caption_attrs`` of the three, a different subset per image, as a
  captioner describes what it happens to notice), and with probability ``caption_error_p`` a named colour is wrong.
- **Masks have realistic errors**: the mask in ``masks/`` (what the readers use) has a wobbly boundary of about
  ``mask_noise`` pixels and, with probability ``mask_miss_p``, misses a part of the object (a horizontal band, such
  as the legs or the head, is cut out). The exact mask is written to ``.truth/masks/`` inside the dataset dir
  (ignored by the readers), so mask-generation tests can compare against the truth.
- **NIR and TIR from the same scene**: NIR is a grey level (reflectance from the colours, so it does not separate
  all colours); TIR shows a WARM object (grey ~150-235, head warmest) on a COOL background (at most ~95), plus
  noise, so a thermal-threshold mask method finds the object.

``difficulty="easy"``: the former generator, kept for tests that only check that training learns in an epoch or
two: each identity is a distinct (colour, shape, pattern), the object fills most of the frame, the backgrounds come
from one pool shared by all cameras, the caption names every attribute and the masks are exact.

Common to both: identities 1..N; the first ``round(0.7 N)`` are training identities, the rest test identities.
RGBNT201 writes all test images to ``test/`` (query = gallery); the others put every fourth test image (index 0, 4,
...) in the query folder and the rest in the gallery. Camera of image k: ``k % cameras`` (MSVR310 images come from
two scenes per identity). Captions are in ``text/{train,test}.json``. Existing files of the same names are
overwritten; the output is a deterministic function of the arguments.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from stmi.data.layouts import Layout, get_layout, mask_path, truth_mask_path

DIFFICULTIES = ("hard", "easy")

# ------------------------------------------------------------------------------------------------ hard mode

#: Colour palette of the upper and lower parts (small on purpose: colours are shared between identities).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40), "green": (45, 150, 60), "blue": (45, 75, 200), "yellow": (225, 200, 50),
    "white": (225, 225, 225), "black": (35, 35, 35), "grey": (125, 125, 125), "brown": (120, 75, 40),
}
UPPER_COLOURS = tuple(PALETTE)
LOWER_COLOURS = ("blue", "black", "grey", "brown", "white", "green")
MARKS = {"person": ("none", "backpack", "stripe", "hat"), "vehicle": ("none", "stripe", "roof rack", "spoiler")}
ATTRIBUTE_NAMES = ("upper", "lower", "mark")
MAX_IDS_HARD = len(UPPER_COLOURS) * len(LOWER_COLOURS) * 4
_SKIN = np.array((205, 160, 130), dtype=np.float32)
_DARK = np.array((55, 50, 45), dtype=np.float32)


def hard_identity_attributes(ids: int, seed: int) -> list[tuple[str, str, int]]:
    """(upper colour, lower colour, mark index) per identity: distinct combinations, each value in use shared.

    For ``ids >= 4`` every attribute value that occurs is used by at least two identities (below 4 identities that
    is impossible with unique combinations). Deterministic in ``seed``.
    """
    if not 2 <= ids <= MAX_IDS_HARD:
        raise ValueError(f"--ids must be in [2, {MAX_IDS_HARD}] (train and test identities; distinct attribute "
                         f"combinations), got {ids}")
    rng = np.random.default_rng([seed, 1])
    sizes = (len(UPPER_COLOURS), len(LOWER_COLOURS), 4)
    combos = list(itertools.product(*(range(n) for n in sizes)))

    def shared(pick: list[tuple[int, int, int]]) -> bool:
        return ids < 4 or all(min(np.unique([c[a] for c in pick], return_counts=True)[1]) >= 2 for a in range(3))

    # Many identities: a random subset of all combinations almost always shares every value.
    for _ in range(200):
        pick = [combos[i] for i in rng.permutation(len(combos))[:ids]]
        if shared(pick):
            return [(UPPER_COLOURS[u], LOWER_COLOURS[low], m) for u, low, m in pick]
    # Few identities: use at most ids // 2 values per attribute, each value equally often, in a random order,
    # until the combinations are distinct.
    used = [rng.permutation(n)[:max(1, min(n, ids // 2))] for n in sizes]
    for _ in range(20000):
        cols = [rng.permutation(np.resize(rng.permutation(u), ids)) for u in used]
        pick = list(zip(*(c.tolist() for c in cols)))
        if len(set(pick)) == ids and shared(pick):
            return [(UPPER_COLOURS[u], LOWER_COLOURS[low], m) for u, low, m in pick]
    raise RuntimeError(f"could not draw {ids} identities with distinct combinations of shared attributes (seed {seed})")


_PHRASES = {
    "person": {"upper": "a {} top", "lower": "{} trousers",
               "mark": ("no bag", "a backpack", "a white stripe across the chest", "a dark hat")},
    "vehicle": {"upper": "a {} roof", "lower": "a {} body",
                "mark": ("no roof rack", "a white stripe along the side", "a roof rack", "a rear spoiler")},
}


def hard_caption(kind: str, attrs: tuple[str, str, int], named: list[str], rng: np.random.Generator,
                 error_p: float) -> str:
    """A caption naming only the attributes in ``named``; each named colour is wrong with probability ``error_p``."""
    upper, lower, mark = attrs
    ph = _PHRASES["vehicle" if kind == "vehicle" else "person"]
    parts = []
    for a in named:
        if a == "mark":
            parts.append(ph["mark"][mark])
            continue
        colour = upper if a == "upper" else lower
        if rng.random() < error_p:
            colour = str(rng.choice([c for c in PALETTE if c != colour]))
        parts.append(ph[a].format(colour))
    if not parts:
        return f"A {kind} seen from a surveillance camera."
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"A {kind} with {body}."


def _scene(hw: tuple[int, int], cam: int, seed: int, margin: int) -> np.ndarray:
    """The RGB scene a camera films (larger than a frame by ``margin`` on each side): clutter in object colours."""
    h, w = hw[0] + 2 * margin, hw[1] + 2 * margin
    rng = np.random.default_rng([seed, 2, cam])
    yy, xx = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(50, 190, 3), rng.integers(50, 190, 3)
    t = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1)) % 1.0
    base = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.uint8)
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    colours = [np.array(c) for c in PALETTE.values()]
    for _ in range(36):
        x0, y0 = int(rng.integers(-w // 8, w)), int(rng.integers(-h // 8, h))
        x1, y1 = x0 + int(rng.integers(6, w // 2)), y0 + int(rng.integers(6, h // 2))
        c = colours[int(rng.integers(len(colours)))] if rng.random() < 0.7 else rng.integers(0, 256, 3)
        fill = tuple(int(v) for v in np.clip(c * rng.uniform(0.8, 1.15), 0, 255))
        kind = rng.integers(0, 4)
        if kind == 0:
            d.rectangle((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 2:  # a pole / a door: tall thin structures the size of a body part
            d.rectangle((x0, y0, x0 + int(rng.integers(4, max(5, w // 6))), y0 + h // 2), fill=fill)
        else:
            d.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(2, 6)))
    return np.asarray(im)


def _canvas(box: tuple[float, float, float, float], flip: bool, hw: tuple[int, int]) -> tuple[Any, ...]:
    """Drawing helpers in box coordinates (u across, v down, 0..1; ``flip`` mirrors u) for the part masks:
    ``px(u)``, ``py(v)``, ``draw(fn) -> bool mask``, ``poly(points)`` and ``rect(u0, v0, u1, v1)`` painters."""
    h, w = hw
    x0, y0, bw, bh = box

    def px(u: float) -> float:
        return x0 + (1 - u if flip else u) * bw

    def py(v: float) -> float:
        return y0 + v * bh

    def draw(fn) -> np.ndarray:  # noqa: ANN001
        m = Image.new("L", (w, h), 0)
        fn(ImageDraw.Draw(m))
        return np.asarray(m) > 0

    def poly(pts: list[tuple[float, float]]):  # noqa: ANN202
        return lambda d: d.polygon([(px(u), py(v)) for u, v in pts], fill=255)

    def rect(u0: float, v0: float, u1: float, v1: float):  # noqa: ANN202
        xs = sorted((px(u0), px(u1)))
        return lambda d: d.rectangle((xs[0], py(v0), xs[1], py(v1)), fill=255)

    return px, py, draw, poly, rect


def _person_parts(box: tuple[float, float, float, float], mark: int, flip: bool, spread: float,
                  hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Boolean masks of the parts of a person in ``box`` (x0, y0, width, height)."""
    px, py, draw, poly, rect = _canvas(box, flip, hw)
    bw = box[2]
    parts = {
        "head": draw(lambda d: d.ellipse((px(0.5) - 0.17 * bw, py(0.0), px(0.5) + 0.17 * bw, py(0.16)), fill=255)),
        "upper": draw(poly([(0.08, 0.17), (0.92, 0.17), (0.84, 0.56), (0.16, 0.56)])),
        "lower": draw(poly([(0.17, 0.55), (0.48, 0.55), (0.47 - spread, 1.0), (0.15 - spread, 1.0)]))
        | draw(poly([(0.52, 0.55), (0.83, 0.55), (0.85 + spread, 1.0), (0.53 + spread, 1.0)])),
    }
    name = MARKS["person"][mark]
    if name == "backpack":
        parts["mark"] = draw(rect(0.84, 0.2, 1.0, 0.5))
    elif name == "stripe":
        parts["mark"] = draw(rect(0.1, 0.32, 0.9, 0.39)) & parts["upper"]
    elif name == "hat":
        parts["mark"] = draw(rect(0.28, -0.02, 0.72, 0.05))
    return parts


def _vehicle_parts(box: tuple[float, float, float, float], mark: int, flip: bool, spread: float,
                   hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Boolean masks of the parts of a vehicle (side view) in ``box``; ``spread`` shifts the cabin."""
    px, py, draw, poly, rect = _canvas(box, flip, hw)
    bw = box[2]
    s = 2 * spread
    parts = {
        "upper": draw(poly([(0.25 + s, 0.12), (0.7 + s, 0.12), (0.85, 0.45), (0.12, 0.45)])),
        "lower": draw(poly([(0.0, 0.44), (1.0, 0.44), (1.0, 0.84), (0.0, 0.84)])),
        "head": draw(lambda d: (d.ellipse((px(0.15) - 0.09 * bw, py(0.72), px(0.15) + 0.09 * bw, py(1.0)), fill=255),
                                d.ellipse((px(0.8) - 0.09 * bw, py(0.72), px(0.8) + 0.09 * bw, py(1.0)), fill=255))),
    }
    name = MARKS["vehicle"][mark]
    if name == "stripe":
        parts["mark"] = draw(poly([(0.0, 0.58), (1.0, 0.58), (1.0, 0.65), (0.0, 0.65)]))
    elif name == "roof rack":
        parts["mark"] = draw(poly([(0.3 + s, 0.04), (0.68 + s, 0.04), (0.68 + s, 0.11), (0.3 + s, 0.11)]))
    elif name == "spoiler":
        parts["mark"] = draw(poly([(0.9, 0.3), (1.0, 0.3), (1.0, 0.44), (0.95, 0.44)]))
    return parts


class _HardRenderer:
    """Renders the three modality frames and the true mask of one image: identity on its camera's scene."""

    MARGIN = 16

    def __init__(self, hw: tuple[int, int], kind: str, cameras: int, seed: int, clutter: float = 1.0) -> None:
        self.hw, self.kind = hw, kind
        self.scenes = []
        for c in range(cameras):
            scene = _scene(hw, c, seed, self.MARGIN).astype(np.float32)
            mean = scene.mean((0, 1), keepdims=True)
            self.scenes.append(mean + clutter * (scene - mean))  # clutter < 1: a calmer scene

    def render(self, attrs: tuple[str, str, int], cam: int, cam_gain: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """(rgb, nir, tir, true mask, (object top row, object bottom row))."""
        h, w = self.hw
        upper, lower, mark = attrs
        vehicle = self.kind == "vehicle"
        s = rng.uniform(0.88, 1.0)
        bh, bw = (0.68 * s * h, 0.82 * s * w) if vehicle else (0.9 * s * h, 0.58 * s * w)
        x0 = rng.uniform(0.02 * w, w - bw - 0.02 * w)
        y0 = rng.uniform(0.02 * h, h - bh - 0.01 * h)
        flip, spread = bool(rng.random() < 0.5), float(rng.uniform(-0.03, 0.1))
        fn = _vehicle_parts if vehicle else _person_parts
        parts = fn((x0, y0, bw, bh), mark, flip, spread, self.hw)

        m = self.MARGIN
        dy, dx = int(rng.integers(-m, m + 1)), int(rng.integers(-m, m + 1))
        bg = self.scenes[cam][m + dy:m + dy + h, m + dx:m + dx + w] * rng.uniform(0.9, 1.1)
        bg_gray = bg @ np.array([0.3, 0.4, 0.3], dtype=np.float32)

        rgb, nir, tir = bg.copy(), 0.8 * bg_gray, 15 + 0.3 * bg_gray
        mask = np.zeros((h, w), dtype=bool)
        head_col = np.array((60, 60, 60), np.float32) if vehicle else _SKIN
        colours = {"head": head_col, "upper": np.asarray(PALETTE[upper], np.float32),
                   "lower": np.asarray(PALETTE[lower], np.float32),
                   "mark": np.asarray(PALETTE["white"] if MARKS[self.kind][mark] == "stripe" else _DARK, np.float32)}
        heat = {"head": 225.0 if not vehicle else 200.0, "upper": 190.0, "lower": 180.0, "mark": 160.0}
        for part in ("lower", "upper", "head", "mark"):
            pm = parts.get(part)
            if pm is None:
                continue
            col = colours[part] * rng.uniform(0.9, 1.1)
            shade = 1 - 0.18 * (self.yy_frac(pm))  # a little vertical shading
            rgb[pm] = col * shade[..., None]
            lum = float(col @ np.array([0.45, 0.35, 0.2], dtype=np.float32))  # NIR reflectance: not the eye's
            nir[pm] = (40 + 0.7 * lum) * shade
            tir[pm] = heat[part] - 8 * self.yy_frac(pm)
            mask |= pm
        rgb = rgb * cam_gain + rng.normal(0, 5, rgb.shape)
        nir = nir + rng.normal(0, 5, nir.shape)
        tir = tir + rng.normal(0, 6, tir.shape)
        rows = np.flatnonzero(mask.any(1))

        def u8(a: np.ndarray) -> np.ndarray:
            return np.clip(a, 0, 255).astype(np.uint8)

        grey3 = lambda a: np.repeat(u8(a)[..., None], 3, axis=2)  # noqa: E731
        return u8(rgb), grey3(nir), grey3(tir), mask, (int(rows[0]), int(rows[-1]))

    @staticmethod
    def yy_frac(pm: np.ndarray) -> np.ndarray:
        """Relative row (0 top .. 1 bottom) of each pixel of part ``pm`` within the part."""
        ys = np.nonzero(pm)[0]
        lo, hi = ys.min(), ys.max()
        return ((ys - lo) / max(hi - lo, 1)).astype(np.float32)


def noisy_mask(mask: np.ndarray, rows: tuple[int, int], rng: np.random.Generator, boundary: float,
               miss_p: float) -> np.ndarray:
    """A segmenter's version of ``mask``: the boundary wobbles by about ``boundary`` pixels (smooth random field),
    and with probability ``miss_p`` a horizontal band of 15-30 % of the object's height is missed."""
    out = mask.copy()
    if boundary > 0:
        h, w = mask.shape
        sdf = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
        coarse = rng.normal(0, 1, (max(2, h // 16), max(2, w // 16)))
        field = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=1)[:h, :w]
        out = sdf + boundary * field > 0
    if miss_p > 0 and rng.random() < miss_p:
        top, bottom = rows
        height = bottom - top + 1
        band = int(rng.uniform(0.15, 0.3) * height)
        start = top + int(rng.integers(0, max(1, height - band)))
        out[start:start + band] = False
    return out


# ------------------------------------------------------------------------------------------------ easy mode

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
    """Easy mode: distinct (colour, shape, pattern) per identity, drawn without replacement from all combinations."""
    if not 2 <= ids <= MAX_IDS:
        raise ValueError(f"--ids must be in [2, {MAX_IDS}] (train and test identities; distinct attribute "
                         f"combinations), got {ids}")
    combos = list(itertools.product(COLOURS, SHAPES, PATTERNS))
    order = np.random.default_rng([seed, 1]).permutation(len(combos))[:ids]
    return [combos[i] for i in order]


def caption_for(kind: str, attrs: tuple[str, str, str]) -> str:
    """Easy mode: the template caption naming all the identity's attributes."""
    colour, shape, pattern = attrs
    texture = "no pattern" if pattern == "plain" else pattern
    return f"A {kind} with a {colour} {shape}-shaped body with {texture}, warm in the thermal image."


def _backgrounds(hw: tuple[int, int], seed: int) -> list[np.ndarray]:
    """Easy mode: a pool of cluttered RGB backgrounds shared by all identities and cameras."""
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
    """Easy mode: renders the three modality frames and the mask of one image of an identity."""

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


# ------------------------------------------------------------------------------------------------ writing


def _save_jpg(a: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=90)


def _save_png(a: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="L").save(path)


def make_synthetic(dataset: str, out: str | Path, ids: int, seed: int = 0, images_per_id: int = 8,
                   cameras: int = 3, progress: bool = False, *, difficulty: str = "hard", caption_attrs: int = 1,
                   caption_error_p: float = 0.1, mask_noise: float = 2.0, mask_miss_p: float = 0.25,
                   clutter: float = 1.0) -> Path:
    """Write a synthetic ``dataset`` under ``out`` in its real layout; return ``out`` (the ``cfg.data.root``).

    Args:
        dataset: rgbnt201 | rgbnt100 | msvr310.
        out: folder that receives ``<DATASET FOLDER>/...``.
        ids: identities (>= 2; about 70 % train, the rest test).
        seed: everything drawn from it (same arguments -> same files).
        images_per_id: triplets per identity (>= 2).
        cameras: cameras per identity (>= 2, at most the dataset's camera count).
        progress: show a tqdm bar on stderr.
        difficulty: ``hard`` (the benchmark, see the module docstring) or ``easy`` (trivially learnable; the
            caption and mask options below do not apply to it).
        caption_attrs: how many of the three attributes (upper, lower, mark) each caption names (0-3), a random
            subset per image.
        caption_error_p: probability that a colour a caption names is wrong.
        mask_noise: amplitude in pixels of the boundary error of the masks in ``masks/`` (0: exact boundary).
        mask_miss_p: probability that a mask in ``masks/`` misses a band of the object (0: never).
        clutter: contrast of the camera scenes around their mean colour (1: full clutter, 0: a flat colour).
    """
    layout: Layout = get_layout(dataset)
    n_cams = layout.cam_range[1] - layout.cam_range[0] + 1
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if not 2 <= cameras <= n_cams:
        raise ValueError(f"--cameras must be in [2, {n_cams}] for {layout.name}, got {cameras}")
    if images_per_id < 2:
        raise ValueError(f"--images-per-id must be >= 2 (an identity needs a query and a gallery image), "
                         f"got {images_per_id}")
    if not 0 <= caption_attrs <= len(ATTRIBUTE_NAMES):
        raise ValueError(f"--caption-attrs must be in [0, {len(ATTRIBUTE_NAMES)}], got {caption_attrs}")
    for name, v in (("--caption-error-p", caption_error_p), ("--mask-miss-p", mask_miss_p)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if not 0 <= clutter <= 1:
        raise ValueError(f"--clutter must be in [0, 1], got {clutter}")
    if mask_noise < 0:
        raise ValueError(f"--mask-noise must be >= 0 (pixels), got {mask_noise}")
    hard = difficulty == "hard"
    attrs: list = hard_identity_attributes(ids, seed) if hard else identity_attributes(ids, seed)
    out = Path(out)
    droot = out.joinpath(layout.folder, *layout.subdir)
    renderer = (_HardRenderer(layout.frame_hw, layout.kind, cameras, seed, clutter) if hard
                else _Renderer(layout.frame_hw, seed))
    gain_lo, gain_hi = (0.85, 1.1) if hard else (0.75, 1.15)
    gains = [np.random.default_rng([seed, 3, c]).uniform(gain_lo, gain_hi, 3).astype(np.float32)
             for c in range(cameras)]
    n_train = min(ids - 1, max(1, int(round(0.7 * ids))))
    assert layout.format_name is not None
    captions: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    bar = tqdm(total=ids * images_per_id, desc=f"synth {layout.name}", unit="triplet", disable=not progress)
    for i, a in enumerate(attrs):
        pid = i + 1
        is_train = i < n_train
        rng = np.random.default_rng([seed, 4, pid])
        text_rng = np.random.default_rng([seed, 5, pid])
        mask_rng = np.random.default_rng([seed, 6, pid])
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
            if hard:
                rgb, nir, tir, truth, rows = renderer.render(a, cam, gains[cam], rng)
                seen = noisy_mask(truth, rows, mask_rng, mask_noise, mask_miss_p)
                mask, true_mask = seen.astype(np.uint8) * 255, truth.astype(np.uint8) * 255
                named = sorted(text_rng.choice(len(ATTRIBUTE_NAMES), caption_attrs, replace=False).tolist())
                caption = hard_caption(layout.kind, a, [ATTRIBUTE_NAMES[j] for j in named], text_rng,
                                       caption_error_p)
            else:
                rgb, nir, tir, mask = renderer.render(a, gains[cam], rng)
                true_mask = mask
                caption = caption_for(layout.kind, a)
            if layout.packed:
                _save_jpg(np.concatenate([rgb, nir, tir], axis=1), base / name)
            else:
                for sub, img in zip(layout.modality_folders, (rgb, nir, tir)):
                    _save_jpg(img, base / sub / name)
            _save_png(mask, mask_path(droot, folder, name))
            _save_png(true_mask, truth_mask_path(droot, folder, name))
            captions[layout.text_splits[split]].append({"item": name, "description": caption})
            bar.update(1)
    bar.close()
    (droot / "text").mkdir(parents=True, exist_ok=True)
    for split, items in captions.items():
        (droot / "text" / f"{split}.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
    return out
