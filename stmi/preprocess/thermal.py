"""Foreground masks from the thermal frame, with no model weights.

Why thermal: in RGBNT201, RGBNT100 and MSVR310 the object of interest (a person or a running vehicle) is warmer than
its surroundings, so in the TIR frame it is the bright region whatever the lighting of the RGB frame. The
algorithm is the classical one, each step chosen for a failure it prevents:

1. grey levels, lightly smoothed (Gaussian, sigma ~ 1% of the frame's short side): Otsu on raw pixels splits
   sensor noise and JPEG ringing into speckle;
2. Otsu's threshold (the grey level that maximises the between-class variance); its separability
   ``eta = between / total variance`` in [0, 1] says how bimodal the frame is, and a frame below
   ``min_separability`` has no clear warm object;
3. polarity: thermal cameras may use a black-hot palette; when most of the frame border is above the threshold
   the frame is inverted (the object of a ReID crop fills the centre, not the border);
4. morphological opening (removes thin warm clutter such as pipes and reflections) then closing (bridges the
   gaps cold clothing or windows leave in the object);
5. connected components (8-connectivity) weighted by a centre prior (a ReID crop is centred on its object):
   the best-scoring component is kept, with every component of at least ``keep_fraction`` of its score (a
   person's legs separated from the torso by a cold belt, a vehicle split by its cold windscreen);
6. holes filled (cold windows, bags and faces inside the silhouette are still the object).

Works on persons (tall frames) and vehicles (wide frames): every size is relative to the frame. The NIR frame
is used only when the TIR frame is flat (a cold-soaked parked car, a saturated sensor) and NIR separates
better; see :func:`thermal_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ThermalParams:
    """Knobs of :func:`thermal_mask`; the defaults were tuned on the synthetic datasets of ``stmi.data.synth``."""

    smooth: float = 0.01
    """Gaussian sigma as a fraction of the frame's short side (at least 0.5 pixel)."""
    morph: float = 0.025
    """Radius of the opening/closing disk as a fraction of the frame's short side (at least 1 pixel)."""
    keep_fraction: float = 0.25
    """Components scoring at least this fraction of the best component's score are kept too."""
    centre_weight: float = 0.5
    """Strength of the centre prior in the component score (0 = pure area)."""
    min_separability: float = 0.35
    """Otsu separability below which the frame is considered to have no warm object."""
    max_fraction: float = 0.92
    """A mask covering more than this share of the frame is a failed segmentation (no foreground found)."""
    min_fraction: float = 0.005
    """A mask covering less than this share of the frame is noise (no foreground found)."""


def to_gray(image: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] (float32) from an (H, W) or (H, W, C) array of uint8 or float.

    Thermal frames are stored as 3-channel JPEGs that are either grey or pseudo-coloured; the channel mean keeps
    the ordering of both white-hot grey and the usual iron/rainbow palettes well enough for a threshold.
    """
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float32).mean(axis=2)
    elif arr.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.integer) or arr.max(initial=0.0) > 1.0:
        arr = arr / 255.0
    return arr


def otsu_threshold(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of ``values`` in [0, 1] and its separability.

    Returns:
        ``(threshold, eta)``: pixels ``> threshold`` form the upper class; ``eta`` = between-class variance /
        total variance in [0, 1] (0 for a constant image), a measure of how bimodal the histogram is.
    """
    v = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0.0, 1.0)
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    total_var = v.var()
    if total_var <= 1e-12:
        return float(v.mean()) if v.size else 0.5, 0.0
    p = hist.astype(np.float64) / max(v.size, 1)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    mu_t = mu[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0.0
    k = int(np.argmax(between))
    eta = float(min(between[k] / total_var, 1.0))
    return float(edges[k + 1]), eta


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius + radius


def _border(mask: np.ndarray) -> np.ndarray:
    return np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])


def _binarise(gray: np.ndarray, params: ThermalParams) -> tuple[np.ndarray, float]:
    short = min(gray.shape)
    sigma = max(0.5, params.smooth * short)
    smooth = ndimage.gaussian_filter(gray, sigma=sigma, mode="nearest")
    lo, hi = float(smooth.min()), float(smooth.max())
    if hi - lo < 1e-6:
        return np.zeros(gray.shape, dtype=bool), 0.0
    norm = (smooth - lo) / (hi - lo)
    threshold, eta = otsu_threshold(norm)
    fg = norm > threshold
    if _border(fg).mean() > 0.5:
        fg = ~fg
    return fg, eta


def _select_components(fg: np.ndarray, params: ThermalParams) -> np.ndarray:
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return fg
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, idx)
    h, w = fg.shape
    yy, xx = np.mgrid[0:h, 0:w]
    # Centre prior: 1 at the centre, 0 at the corners, in coordinates normalised by the frame size so that
    # tall person crops and wide vehicle crops are treated alike.
    dist = np.sqrt(((yy + 0.5) / h - 0.5) ** 2 + ((xx + 0.5) / w - 0.5) ** 2) / np.sqrt(0.5)
    prior = 1.0 - dist
    mean_prior = ndimage.mean(prior, labels, idx)
    scores = areas * ((1.0 - params.centre_weight) + params.centre_weight * np.asarray(mean_prior))
    keep = idx[scores >= params.keep_fraction * scores.max()]
    return np.isin(labels, keep)


def thermal_mask(
    tir: np.ndarray, nir: np.ndarray | None = None, params: ThermalParams | None = None
) -> np.ndarray:
    """Foreground mask of one triplet from its TIR frame (NIR as a fallback).

    Args:
        tir: the thermal frame, (H, W) or (H, W, C), uint8 or float in [0, 1].
        nir: the near-infrared frame of the same size, or None. Used only when the TIR frame's Otsu separability
            is below ``params.min_separability`` and the NIR frame's is higher: NIR is brightest on reflective
            and actively lit surfaces, a poorer cue than heat, so it never overrides a usable TIR frame.
        params: algorithm knobs (:class:`ThermalParams` defaults when None).

    Returns:
        A boolean (H, W) array, True on the object; all False when no foreground was found (flat frame, or a
        segmentation covering almost nothing or almost everything).
    """
    params = params or ThermalParams()
    gray = to_gray(tir)
    fg, eta = _binarise(gray, params)
    if eta < params.min_separability and nir is not None:
        nir_gray = to_gray(nir)
        if nir_gray.shape != gray.shape:
            raise ValueError(f"NIR frame {nir_gray.shape} and TIR frame {gray.shape} differ in size")
        nir_fg, nir_eta = _binarise(nir_gray, params)
        if nir_eta > eta:
            fg, eta = nir_fg, nir_eta
    if eta < params.min_separability:
        return np.zeros(gray.shape, dtype=bool)
    radius = max(1, round(params.morph * min(gray.shape)))
    disk = _disk(radius)
    # Pad before opening/closing so the object touching the frame edge (feet, bumpers) is not eroded away.
    pad = radius + 1
    padded = np.pad(fg, pad, mode="edge")
    padded = ndimage.binary_opening(padded, structure=disk)
    padded = ndimage.binary_closing(padded, structure=disk)
    fg = padded[pad:-pad, pad:-pad]
    fg = _select_components(fg, params)
    fg = ndimage.binary_fill_holes(fg)
    fraction = float(fg.mean())
    if fraction < params.min_fraction or fraction > params.max_fraction:
        return np.zeros(gray.shape, dtype=bool)
    return fg


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two masks (nonzero = foreground); 1.0 when both are empty."""
    a = np.asarray(pred) > 0
    b = np.asarray(truth) > 0
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
