"""Evaluation pictures: the CMC curve and a retrieval grid (queries with their top-10 per modality).

Plain files, no tracking library: the orchestration layer logs them as MLflow artifacts. The CMC curve imports
matplotlib inside the function (Agg backend) because it belongs to the ``platform`` extra, not to the library's
dependencies, and importing ``stmi`` must stay light; the retrieval grid is composed with PIL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stmi.data.layouts import Triplet

MODALITIES = ("RGB", "NIR", "TIR")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError("stmi.plots needs matplotlib: pip install 'stmi[platform]' (or matplotlib)") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_cmc(cmc: Sequence[float] | np.ndarray, path: str | Path, title: str | None = None,
             label: str | None = None) -> Path:
    """Draw the CMC curve (rank 1..len(cmc), fractions shown as %) to ``path`` (PNG); return the path."""
    plt = _pyplot()
    cmc = np.asarray(cmc, dtype=np.float64)
    ranks = np.arange(1, len(cmc) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    try:
        ax.plot(ranks, 100 * cmc, marker="o", markersize=2.5, label=label)
        for k in (1, 5, 10):
            if k <= len(cmc):
                ax.annotate(f"R{k} {100 * cmc[k - 1]:.1f}", (k, 100 * cmc[k - 1]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        ax.set_xlabel("rank")
        ax.set_ylabel("matching rate (%)")
        ax.set_xlim(1, max(len(cmc), 2))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(title or "CMC")
        if label:
            ax.legend(loc="lower right")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _frames(t: Triplet, size: tuple[int, int]) -> list[np.ndarray]:
    """RGB/NIR/TIR frames of a triplet resized to ``size`` (H, W), as uint8 arrays; grey on an unreadable file."""
    from PIL import Image

    from stmi.data.layouts import DatasetError
    from stmi.data.triplet_dataset import load_frames

    try:
        frames = load_frames(t)
    except DatasetError:
        return [np.full((*size, 3), 128, dtype=np.uint8) for _ in MODALITIES]
    return [np.asarray(f.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)) for f in frames]


# matplotlib's tab:blue / tab:green / tab:red, so the picture reads like the CMC plot beside it
_QUERY, _MATCH, _WRONG = (31, 119, 180), (44, 160, 44), (214, 39, 40)
_BORDER, _GAP, _TITLE, _LABEL = 3, 4, 12, 30


def plot_retrieval(query_records: Sequence[Triplet], gallery_records: Sequence[Triplet], top10: np.ndarray,
                   path: str | Path, query_indices: Sequence[int] | np.ndarray | None = None,
                   image_size: tuple[int, int] | None = None, max_queries: int = 4) -> Path:
    """Draw a few queries with their ranked gallery matches, one row per modality (RGB, NIR, TIR).

    Args:
        query_records, gallery_records: the ``Triplet`` records in the order of the evaluated features.
        top10: ``(n, k)`` gallery indices per drawn query, best first (``evaluate(...)["top10"]``; -1 = none).
        path: PNG to write.
        query_indices: the query index of each row of ``top10`` (``evaluate(...)["vis_queries"]``); default
            ``0..n-1``.
        image_size: (H, W) of each thumbnail; default 96x48 for tall (person) frames and 48x96 for wide ones.
        max_queries: at most this many queries are drawn (the picture stays readable).

    Correct matches (same identity) get a green border, wrong ones red; the query a blue one. Composed with PIL,
    not as matplotlib subplots: 4 queries x 3 modalities x 11 pictures took 5.7 s as subplots, in the final test
    of every training run.
    """
    from PIL import Image, ImageDraw

    top10 = np.asarray(top10, dtype=np.int64)
    if top10.ndim != 2:
        raise ValueError(f"plot_retrieval: top10 must be (queries, k), got shape {top10.shape}")
    qidx = np.arange(len(top10)) if query_indices is None else np.asarray(query_indices, dtype=np.int64)
    if top10.size and top10.max() >= len(gallery_records):
        raise ValueError(f"plot_retrieval: top10 holds gallery index {top10.max()} but there are only "
                         f"{len(gallery_records)} gallery records: pass the records the features were extracted from")
    if len(qidx) < len(top10) or (len(qidx) and qidx.max() >= len(query_records)):
        raise ValueError(f"plot_retrieval: query_indices ({len(qidx)} given, max {qidx.max() if len(qidx) else '-'}) "
                         f"must name one of the {len(query_records)} query records per row of top10")
    n = min(len(top10), max_queries)
    k = top10.shape[1]
    if n == 0:
        raise ValueError("plot_retrieval: no query to draw (top10 is empty)")
    if image_size is None:
        from stmi.data.layouts import DatasetError
        from stmi.data.triplet_dataset import load_frames

        try:
            w, h = load_frames(query_records[int(qidx[0])])[0].size
        except DatasetError:  # unreadable probe file: fall back to the person aspect
            w, h = 1, 2
        image_size = (96, 48) if h >= w else (48, 96)
    hh, ww = image_size
    cell_w, cell_h = ww + 2 * _BORDER + _GAP, hh + 2 * _BORDER + _GAP
    block_h = _TITLE + 3 * cell_h  # one query: a title line, then its RGB, NIR and TIR rows
    canvas = Image.new("RGB", (_LABEL + (k + 1) * cell_w, n * block_h + _GAP), "white")
    draw = ImageDraw.Draw(canvas)

    def put(img: np.ndarray, col: int, top: int, colour: tuple[int, int, int]) -> None:
        x, y = _LABEL + col * cell_w, top
        draw.rectangle([x, y, x + ww + 2 * _BORDER - 1, y + hh + 2 * _BORDER - 1], fill=colour)
        canvas.paste(Image.fromarray(img), (x + _BORDER, y + _BORDER))

    for r in range(n):
        q = query_records[int(qidx[r])]
        qf = _frames(q, image_size)
        gals = [(int(g), _frames(gallery_records[int(g)], image_size)) for g in top10[r] if g >= 0]
        y0 = r * block_h + _GAP
        draw.text((_LABEL, y0), f"query id {q.pid}", fill="black")
        for j, (g, _) in enumerate(gals[:k]):
            draw.text((_LABEL + (j + 1) * cell_w, y0), f"{j + 1}: id {gallery_records[g].pid}", fill="black")
        for m, mod in enumerate(MODALITIES):
            top = y0 + _TITLE + m * cell_h
            draw.text((2, top + hh // 2), mod, fill="black")
            put(qf[m], 0, top, _QUERY)
            for j, (g, gf) in enumerate(gals[:k]):
                put(gf[m], j + 1, top, _MATCH if gallery_records[g].pid == q.pid else _WRONG)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
