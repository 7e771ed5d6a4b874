"""Retrieval evaluation: the field's ReID protocol (docs/datasets.md), vectorised and chunked, and feature extraction.

Protocol (identical in the five reference codebases): L2-normalised features, squared Euclidean distance, for
each query the gallery entries with the same identity AND the same camera are removed (MSVR310: same identity AND
same scene, whatever the camera), queries left with no valid match are skipped and counted, AP per query is
``sum over hits of (hits so far / rank) / number of hits``, mAP the mean over valid queries, CMC cut at rank 50.

Why not the reference implementation (``np.argsort`` of the whole distance matrix, then a Python loop over
queries): the sorted indices are ``Q x G`` int64 (3.2 GB at 20k x 20k) and the loop makes several full-row passes
with fancy indexing per query. Scoring needs much less than the sorted order of every row: a positive's rank among
the valid entries is the number of valid entries with a smaller distance. So, per chunk of queries, the removed
entries are set to +inf in a copy of the chunk, the copy's rows are sorted *by value* (NumPy's SIMD sort, about
4x cheaper than ``argsort``, and no index array), and each query's few positives are ``searchsorted`` into its
sorted row. Same-identity gallery entries are found from a gallery grouped by identity once, not by a ``Q x G``
comparison, so the only chunk-sized buffer is the sorted copy.

Ties are defined as in a *stable* argsort of the row: among equal distances the smaller gallery index comes first.
The fast path is exact when no valid gallery entry ties with a positive (true for continuous features); rows where
such a tie occurs are detected (the next sorted value equals the positive's) and re-scored with a stable argsort,
so the result never depends on the path taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stmi.data.batch import model_inputs

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

ArrayLike = Any  # numpy array, torch tensor or sequence

#: Elements of one query chunk (rows x gallery size) when ``chunk_size`` is not given: ~2M keeps the chunk's
#: sorted copy at 8-16 MB whatever the gallery size.
DEFAULT_CHUNK_ELEMENTS = 2_000_000


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """numpy view/copy of a numpy array, torch tensor (any device) or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half / bfloat16 have no NumPy dtype
        return x.cpu().numpy()
    return np.asarray(x)


def _as_ids(x: ArrayLike, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 1:
        raise ValueError(f"evaluate_ranking: {name} must be 1-D, got shape {a.shape}")
    return a.astype(np.int64, copy=False)


@dataclass
class _ChunkScores:
    """Per-query results of one chunk (all of length = chunk rows)."""

    ap: np.ndarray  # float64, 0 for queries with no valid match
    inp: np.ndarray  # float64, num_pos / (rank of the last positive), the mINP term
    first: np.ndarray  # int64, 0-based rank of the first positive among valid entries (-1 if none)
    valid: np.ndarray  # bool, the query has at least one valid match


class _Gallery:
    """Gallery identities grouped once, so a chunk finds its same-identity entries without a ``Q x G`` compare."""

    def __init__(self, pids: np.ndarray, groups: np.ndarray) -> None:
        self.pids, self.groups = pids, groups
        self.order = np.argsort(pids, kind="stable")  # within an identity: ascending gallery index
        self.uniq, self.start, self.count = np.unique(pids[self.order], return_index=True, return_counts=True)

    def same_identity(self, q_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of every gallery entry sharing the query's identity; rows ascending, cols ascending per row."""
        loc = np.minimum(np.searchsorted(self.uniq, q_pids), max(len(self.uniq) - 1, 0))
        found = self.uniq[loc] == q_pids if len(self.uniq) else np.zeros(len(q_pids), dtype=bool)
        cnt = np.where(found, self.count[loc] if len(self.uniq) else 0, 0)
        rows = np.repeat(np.arange(len(q_pids)), cnt)
        within = np.arange(len(rows)) - (np.cumsum(cnt) - cnt)[rows]
        cols = self.order[self.start[loc[rows]] + within]
        return rows, cols


def _score_sorted(dist: np.ndarray, valid: np.ndarray, pos: np.ndarray) -> _ChunkScores:
    """Exact scores from a stable argsort of each row: the definition of the tie rule, used for rows with ties."""
    order = np.argsort(dist, axis=1, kind="stable")
    valid_s = np.take_along_axis(valid, order, 1)
    pos_s = np.take_along_axis(pos, order, 1)
    vrank = np.cumsum(valid_s, 1) - 1  # 0-based rank among valid entries at each sorted position
    hits = np.cumsum(pos_s, 1)
    npos = pos_s.sum(1)
    has = npos > 0
    ap = np.where(pos_s, hits / np.maximum(vrank + 1.0, 1.0), 0.0).sum(1) / np.maximum(npos, 1)
    first = np.where(has, np.where(pos_s, vrank, np.iinfo(np.int64).max).min(1), -1)
    last = np.where(pos_s, vrank, -1).max(1)
    inp = np.where(has, npos / (last + 1.0), 0.0)
    return _ChunkScores(ap=np.where(has, ap, 0.0), inp=inp, first=first.astype(np.int64), valid=has)


def _score_chunk(dist: np.ndarray, q_pids: np.ndarray, q_grp: np.ndarray, gallery: _Gallery) -> _ChunkScores:
    """Score one chunk of queries against the whole gallery (see the module docstring for the method).

    Args:
        dist: ``(c, G)`` float distances of the chunk (not modified).
        q_pids, q_grp: ``(c,)`` query identities and removal groups (camera, or scene for MSVR310).
        gallery: the gallery identities and removal groups, grouped by identity.
    """
    c = dist.shape[0]
    rows, cols = gallery.same_identity(q_pids)
    junk = gallery.groups[cols] == q_grp[rows]
    # Removed entries become +inf so that "valid entries below v" is a plain count in the sorted row.
    srt = np.array(dist, dtype=dist.dtype if dist.dtype.kind == "f" else np.float64, order="C", copy=True)
    srt[rows[junk], cols[junk]] = np.inf
    srt.sort(axis=1)  # values only (no indices): the fast SIMD sort, and one chunk-sized buffer
    if c and bool(np.isnan(srt[:, -1]).any()):  # NaN sorts last
        bad = np.nonzero(np.isnan(srt[:, -1]))[0]
        raise ValueError(f"evaluate_ranking: distmat has NaN in query rows {bad[:5].tolist()} (of this chunk)")

    prow, pcol = rows[~junk], cols[~junk]
    pval = dist[prow, pcol].astype(srt.dtype, copy=False)
    o = np.lexsort((pval, prow))  # by row, then distance; stable, so equal distances keep gallery-index order
    prow, pval = prow[o], pval[o]
    npos = np.bincount(prow, minlength=c)
    starts = np.cumsum(npos) - npos
    left = np.empty(len(pval), dtype=np.int64)
    for r in np.nonzero(npos)[0]:
        s, e = starts[r], starts[r] + npos[r]
        left[s:e] = np.searchsorted(srt[r], pval[s:e], side="left")
    # The positive itself sits at srt[r, left]; another valid entry with the same distance sits right after it.
    nxt = np.minimum(left + 1, srt.shape[1] - 1)
    tie = (left + 1 < srt.shape[1]) & (srt[prow, nxt] == pval)

    hit = np.arange(len(pval)) - starts[prow]  # 0-based order among the query's positives
    has = npos > 0
    ap = np.bincount(prow, weights=(hit + 1.0) / (left + 1.0), minlength=c) / np.maximum(npos, 1)
    first = np.where(has, left[np.minimum(starts, max(len(left) - 1, 0))] if len(left) else -1, -1)
    last = left[np.maximum(starts + npos - 1, 0)] if len(left) else np.zeros(c, dtype=np.int64)
    inp = np.where(has, npos / (last + 1.0), 0.0)
    out = _ChunkScores(ap=ap, inp=inp, first=first.astype(np.int64), valid=has)

    tie_rows = np.unique(prow[tie])
    if len(tie_rows):
        same = q_pids[tie_rows, None] == gallery.pids[None, :]
        valid = ~(same & (q_grp[tie_rows, None] == gallery.groups[None, :]))
        exact = _score_sorted(dist[tie_rows], valid, same & valid)
        out.ap[tie_rows], out.inp[tie_rows], out.first[tie_rows] = exact.ap, exact.inp, exact.first
    return out


def _finalise(parts: list[_ChunkScores], num_queries: int, max_rank: int) -> dict[str, Any]:
    """mAP / mINP / CMC over the valid queries of all chunks."""
    ap = np.concatenate([p.ap for p in parts]) if parts else np.zeros(0)
    inp = np.concatenate([p.inp for p in parts]) if parts else np.zeros(0)
    first = np.concatenate([p.first for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    valid = np.concatenate([p.valid for p in parts]) if parts else np.zeros(0, dtype=bool)
    nvalid = int(valid.sum())
    if nvalid == 0:
        raise ValueError(
            f"evaluate_ranking: none of the {num_queries} queries has a valid gallery match (every gallery entry of "
            "a query's identity shares its camera, or scene for MSVR310, or the identity is absent from the "
            "gallery). Check the query/gallery split, or the validation split's val_fraction.")
    hist = np.bincount(np.minimum(first[valid], max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hist) / nvalid
    res: dict[str, Any] = {
        "mAP": float(ap[valid].mean()),
        "mINP": float(inp[valid].mean()),
        "cmc": cmc.astype(np.float64),
        "num_valid_queries": nvalid,
        "num_queries": num_queries,
        "ap": ap,  # per query (0 for skipped queries), for per-identity analysis
        "valid": valid,
    }
    for k in (1, 5, 10):
        if k <= max_rank:
            res[f"R{k}"] = float(cmc[k - 1])
    return res


def evaluate_ranking(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                     g_camids: ArrayLike, q_sceneids: ArrayLike | None = None, g_sceneids: ArrayLike | None = None,
                     max_rank: int = 50, chunk_size: int | None = None) -> dict[str, Any]:
    """Score a query x gallery distance matrix with the ReID protocol (docs/datasets.md).

    Args:
        distmat: ``(Q, G)`` distances, smaller = more similar (numpy array or torch tensor, any device; a CUDA
            tensor is copied to the host one chunk at a time). NaN is an error; ties are broken by gallery index
            (the order of a stable argsort).
        q_pids, g_pids: identities of queries and gallery entries.
        q_camids, g_camids: cameras; with scene ids absent, gallery entries with the query's identity AND camera
            are removed (RGBNT201, RGBNT100).
        q_sceneids, g_sceneids: scenes (MSVR310); when given, entries with the query's identity AND scene are
            removed whatever the camera.
        max_rank: CMC length; reduced to the gallery size when the gallery is smaller (as the reference does).
        chunk_size: queries scored at a time; ``None`` picks ``DEFAULT_CHUNK_ELEMENTS // G`` rows. Memory beyond
            the inputs is one ``chunk_size x G`` sorted copy plus per-positive vectors, never a sorted matrix.

    Returns:
        ``mAP`` and ``mINP`` (floats, fractions in [0, 1], means over valid queries), ``cmc`` (numpy float64 of
        length ``max_rank``: fraction of valid queries with a hit within rank ``k + 1``), ``R1``/``R5``/``R10``,
        ``num_valid_queries``, ``num_queries``, and per-query ``ap`` / ``valid`` arrays.

    Raises:
        ValueError: shapes disagree, NaN distances, or no query has a valid match.
    """
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach()
    else:
        distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"evaluate_ranking: distmat must be 2-D (queries x gallery), got shape {tuple(distmat.shape)}")
    nq, ng = distmat.shape
    use_scenes = q_sceneids is not None or g_sceneids is not None
    if use_scenes and (q_sceneids is None or g_sceneids is None):
        raise ValueError("evaluate_ranking: give both q_sceneids and g_sceneids (MSVR310 rule) or neither")
    qp, gp = _as_ids(q_pids, "q_pids"), _as_ids(g_pids, "g_pids")
    qg = _as_ids(q_sceneids if use_scenes else q_camids, "q_sceneids" if use_scenes else "q_camids")
    gg = _as_ids(g_sceneids if use_scenes else g_camids, "g_sceneids" if use_scenes else "g_camids")
    for name, a, n in (("q_pids", qp, nq), ("g_pids", gp, ng), ("query groups", qg, nq), ("gallery groups", gg, ng)):
        if len(a) != n:
            raise ValueError(f"evaluate_ranking: {name} has {len(a)} entries but distmat is {nq} x {ng}")
    max_rank = max(1, min(max_rank, ng))
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(ng, 1))
    if chunk_size < 1:
        raise ValueError(f"evaluate_ranking: chunk_size must be >= 1, got {chunk_size}")
    gallery = _Gallery(gp, gg)
    parts = []
    for s in range(0, nq, chunk_size):
        d = _to_numpy(distmat[s:s + chunk_size])
        parts.append(_score_chunk(d, qp[s:s + chunk_size], qg[s:s + chunk_size], gallery))
    return _finalise(parts, nq, max_rank)


# --------------------------------------------------------------------------------------------------------------
# Feature extraction and the whole evaluation pass


@dataclass
class Features:
    """Retrieval features of one split in loader-dataset order (``index`` order when the batches carry it)."""

    feats: torch.Tensor
    """``(N, E)`` float32, L2-normalised, on CPU."""
    pids: np.ndarray
    camids: np.ndarray
    sceneids: np.ndarray
    """-1 where the dataset has no scenes."""


@torch.inference_mode()
def extract_features(model: torch.nn.Module, loader: Iterable[dict[str, Any]], device: torch.device | str,
                     amp: bool = False, use_camid: bool = True, presence: Sequence[bool] | None = None,
                     absent: str = "mask") -> Features:
    """Run ``model.embed`` over an evaluation loader.

    Batches are the dicts of ``stmi.data.TripletDataset`` (docs/ARCHITECTURE.md): ``rgb``/``nir``/``tir``,
    ``mask``/``has_mask``, ``text`` (only if present), ``camid``, ``pid``, ``sceneid``, ``index``, optionally
    ``presence`` ``(B, 3)``. When ``index`` is present the features are put back in dataset order, so row ``i``
    belongs to record ``i`` whatever the sampler.

    Args:
        amp: bf16 autocast, on CUDA only (CPU bf16 is slower and changes the numbers for nothing).
        use_camid: pass the camera id to the model (SIE at test time, as the anchors do).
        presence: ``(rgb, nir, tir)`` booleans applied to every sample (the missing-modality protocols of
            :mod:`stmi.eval_missing`): the frames of the absent modalities are zeroed and, with ``absent="mask"``,
            the model gets the presence mask (combined with the batch's own ``presence``, if any). None: the batch
            as it is.
        absent: ``mask`` (the presence mask tells the model) or ``zero`` (the zeroed frames are fed as if present,
            how TOP-ReID's successors simulate a missing modality; a baseline).
    """
    if absent not in ("mask", "zero"):
        raise ValueError(f"extract_features: absent={absent!r}, expected 'mask' or 'zero'")
    if presence is not None:
        presence = tuple(bool(p) for p in presence)
        if len(presence) != 3 or not any(presence):
            raise ValueError(f"extract_features: presence must be 3 booleans (rgb, nir, tir), at least one true; got "
                             f"{presence}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    embed = getattr(model, "module", model).embed  # a DDP wrapper has no ``embed``
    feats, pids, cams, scenes, index = [], [], [], [], []
    try:
        for batch in loader:
            imgs, kw = model_inputs(batch, device, use_camid=use_camid)
            if presence is not None:
                imgs, kw = _with_presence(imgs, kw, presence, absent)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=amp and device.type == "cuda"):
                emb = embed(*imgs, **kw)
            feats.append(emb.float().cpu())
            n = emb.shape[0]
            pids.append(np.asarray(batch["pid"]).reshape(n))
            cams.append(np.asarray(batch["camid"]).reshape(n))
            sc = batch.get("sceneid")
            scenes.append(np.asarray(sc).reshape(n) if sc is not None else np.full(n, -1))
            if batch.get("index") is not None:
                index.append(np.asarray(batch["index"]).reshape(n))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batch (empty split?)")
    f = torch.nn.functional.normalize(torch.cat(feats), dim=1)
    out = Features(feats=f, pids=np.concatenate(pids).astype(np.int64), camids=np.concatenate(cams).astype(np.int64),
                   sceneids=np.concatenate(scenes).astype(np.int64))
    if len(index) == len(feats):
        idx = np.concatenate(index)
        if len(np.unique(idx)) == len(idx):
            order = np.argsort(idx, kind="stable")
            out = Features(feats=out.feats[torch.from_numpy(order)], pids=out.pids[order], camids=out.camids[order],
                           sceneids=out.sceneids[order])
    return out


def _with_presence(imgs: list[torch.Tensor], kw: dict[str, Any], presence: tuple[bool, ...],
                   absent: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The model arguments of a batch with the modalities ``presence`` marks absent removed (see
    :func:`extract_features`)."""
    imgs = [x if p else torch.zeros_like(x) for x, p in zip(imgs, presence)]
    if absent == "mask" and not all(presence):
        mask = torch.tensor(presence, dtype=torch.bool, device=imgs[0].device).expand(imgs[0].shape[0], 3)
        if kw.get("presence") is not None:
            mask = mask & kw["presence"].to(torch.bool)
        kw = {**kw, "presence": mask}
    return imgs, kw


def pairwise_distance(qf: torch.Tensor, gf: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of L2-normalised features, ``2 - 2 cos``, clamped at 0 against round-off."""
    return (2.0 - 2.0 * qf @ gf.T).clamp_(min=0.0)


def evaluate(model: torch.nn.Module, query_loader: Iterable[dict[str, Any]], gallery_loader: Iterable[dict[str, Any]],
             device: torch.device | str, use_scenes: bool = False, amp: bool = False, max_rank: int = 50,
             chunk_size: int | None = None, num_vis: int = 8, top_k: int = 10,
             return_distmat: bool = False) -> dict[str, Any]:
    """Extract query and gallery features and score them (one evaluation pass, framework-agnostic).

    The distance matrix is computed chunk by chunk in torch and scored by the same kernel as
    :func:`evaluate_ranking`, so it is never held whole unless ``return_distmat`` asks for it. When the query
    and gallery loaders are the same object (RGBNT201: the test set against itself) features are extracted once.

    Args:
        use_scenes: MSVR310's removal rule (same identity and scene) instead of (same identity and camera).
        num_vis: number of queries (evenly spaced over the query set) whose top-``top_k`` valid gallery matches
            are returned for retrieval pictures (``stmi.plots.plot_retrieval``).

    Returns:
        ``mAP``, ``mINP``, ``R1``, ``R5``, ``R10``, ``cmc``, ``num_valid_queries``, ``num_queries``,
        ``vis_queries`` (query indices), ``top10`` (``(num_vis, top_k)`` gallery indices in ranked order, removed
        entries excluded, -1 padded), and ``distmat`` (numpy) when asked.
    """
    device = torch.device(device)
    qf = extract_features(model, query_loader, device, amp=amp)
    gf = qf if gallery_loader is query_loader else extract_features(model, gallery_loader, device, amp=amp)
    return evaluate_features(qf, gf, use_scenes=use_scenes, max_rank=max_rank, chunk_size=chunk_size,
                             num_vis=num_vis, top_k=top_k, return_distmat=return_distmat, device=device)


def evaluate_features(qf: Features, gf: Features, use_scenes: bool = False, max_rank: int = 50,
                      chunk_size: int | None = None, num_vis: int = 8, top_k: int = 10, return_distmat: bool = False,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Score extracted features (the second half of :func:`evaluate`; see there).

    Distances are computed on ``device`` one query chunk at a time and ranked on the host by the kernel of
    :func:`evaluate_ranking`.
    """
    device = torch.device(device)
    q, g = qf.feats.to(device), gf.feats.to(device)
    nq, ng = q.shape[0], g.shape[0]
    qp, gp = qf.pids.astype(np.int64), gf.pids.astype(np.int64)
    qgrp = (qf.sceneids if use_scenes else qf.camids).astype(np.int64)
    ggrp = (gf.sceneids if use_scenes else gf.camids).astype(np.int64)
    if use_scenes and (bool((qgrp < 0).any()) or bool((ggrp < 0).any())):
        raise ValueError("evaluate: use_scenes=True but some records have no scene id (sceneid -1); the scene rule "
                         "is for MSVR310 only")
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(ng, 1))
    vis = np.unique(np.linspace(0, nq - 1, num=min(num_vis, nq)).round().astype(np.int64)) if num_vis > 0 else \
        np.zeros(0, dtype=np.int64)
    top = np.full((len(vis), top_k), -1, dtype=np.int64)
    full = np.empty((nq, ng), dtype=np.float32) if return_distmat else None
    gallery = _Gallery(gp, ggrp)
    parts = []
    for s in range(0, nq, chunk):
        d = pairwise_distance(q[s:s + chunk], g).float().cpu().numpy()
        parts.append(_score_chunk(d, qp[s:s + chunk], qgrp[s:s + chunk], gallery))
        if full is not None:
            full[s:s + d.shape[0]] = d
        for j, qi in enumerate(vis):
            if s <= qi < s + d.shape[0]:
                row = d[qi - s].copy()
                row[(gp == qp[qi]) & (ggrp == qgrp[qi])] = np.inf
                order = np.argsort(row, kind="stable")
                order = order[np.isfinite(row[order])][:top_k]
                top[j, :len(order)] = order
    res = _finalise(parts, nq, max(1, min(max_rank, ng)))
    res["vis_queries"] = vis
    res["top10"] = top
    if full is not None:
        res["distmat"] = full
    return res


_MISSING_PROTOCOLS = ("evaluate_any2any", "evaluate_missing", "evaluate_topreid")


def __getattr__(name: str) -> Any:
    # The missing-modality protocols (TOP-ReID, MDReID any-to-any) are stmi.eval functions too; they live in
    # stmi/eval_missing.py, which builds on extract_features and evaluate_features above (looked up on first use,
    # so either module can be imported first).
    if name in _MISSING_PROTOCOLS:
        from stmi import eval_missing

        return getattr(eval_missing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
