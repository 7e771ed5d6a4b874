"""Retrieval evaluation: the ReID protocol of DATASETS.md, vectorised and chunked, and feature extraction.

Protocol (identical in the five reference codebases): L2-normalised features, squared Euclidean distance, for
each query the gallery entries with the same identity AND the same camera are removed (MSVR310: same identity AND
same scene, whatever the camera), queries left with no valid match are skipped and counted, AP per query is
``sum over hits of (hits so far / rank) / number of hits``, mAP the mean over valid queries, CMC cut at rank 50.

Why not the reference implementation (full ``argsort`` of the distance matrix, then a Python loop over queries):
the full sort is ``O(Q G log G)`` time and ``Q x G`` int64 memory (3.2 GB at 20k x 20k), and the loop costs a
few full-row NumPy passes per query. Scoring needs much less than a sorted row: a positive's rank among the
valid entries is just the number of valid entries with a smaller distance. So, per chunk of queries, we sort only
the positives of each query (a few dozen or hundred values), ``searchsorted`` every valid gallery distance into
them, and count with one ``bincount``: for the ``i``-th closest positive, ``rank_i = #{valid k : d_k < p_i}``.
That is ``O(G log P)`` per query, fully vectorised, and the only ``Q x G``-sized buffers live for one chunk.

Ties are defined as in a *stable* argsort of the row: among equal distances the smaller gallery index comes first.
The fast path is exact when no valid gallery entry ties with a positive (always true for continuous features);
rows where such a tie occurs are detected and re-scored with a stable sort, so the result never depends on the
path taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Iterable

ArrayLike = Any  # numpy array, torch tensor or sequence

#: Elements of one query chunk (rows x gallery size) when ``chunk_size`` is not given: ~2M keeps the transient
#: int64 buffers of a chunk around 40 MB whatever the gallery size.
DEFAULT_CHUNK_ELEMENTS = 2_000_000


def _as_long(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """1-D int64 tensor on ``device`` from a numpy array, tensor or sequence."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 1:
        raise ValueError(f"evaluate_ranking: {name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


@dataclass
class _ChunkScores:
    """Per-query results of one chunk (all length = chunk rows)."""

    ap: torch.Tensor  # float64, 0 for queries with no valid match
    inp: torch.Tensor  # float64, num_pos / (rank of the last positive + 1)
    first: torch.Tensor  # int64, 0-based rank of the first positive among valid entries (-1 if none)
    valid: torch.Tensor  # bool, the query has at least one valid match


def _score_sorted(dist: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> _ChunkScores:
    """Exact scores from a stable sort of each row: the tie rule's definition, used for rows with ties."""
    order = torch.sort(dist, dim=1, stable=True).indices
    valid_s = valid.gather(1, order)
    pos_s = pos.gather(1, order)
    vrank = valid_s.cumsum(1) - 1  # 0-based rank among valid entries at each sorted position
    hits = pos_s.cumsum(1)  # hits so far (inclusive)
    npos = pos_s.sum(1)
    contrib = torch.where(pos_s, hits.double() / (vrank.double() + 1.0), torch.zeros((), dtype=torch.float64,
                                                                                       device=dist.device))
    has = npos > 0
    ap = torch.where(has, contrib.sum(1) / npos.clamp(min=1).double(), torch.zeros_like(contrib[:, 0]))
    big = torch.iinfo(torch.int64).max
    masked = torch.where(pos_s, vrank, torch.full_like(vrank, big))
    first = torch.where(has, masked.min(1).values, torch.full_like(npos, -1))
    last = torch.where(pos_s, vrank, torch.full_like(vrank, -1)).max(1).values
    inp = torch.where(has, npos.double() / (last.double() + 1.0), torch.zeros_like(ap))
    return _ChunkScores(ap=ap, inp=inp, first=first, valid=has)


def _score_chunk(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_grp: torch.Tensor,
                 g_grp: torch.Tensor) -> _ChunkScores:
    """Score one chunk of queries against the whole gallery without sorting the rows.

    Args:
        dist: ``(c, G)`` distances (float32 or float64), any device.
        q_pids, q_grp: ``(c,)`` query identities and removal groups (camera, or scene for MSVR310).
        g_pids, g_grp: ``(G,)`` gallery identities and removal groups.
    """
    c, g = dist.shape
    dev = dist.device
    same_pid = q_pids[:, None] == g_pids[None, :]
    valid = ~(same_pid & (q_grp[:, None] == g_grp[None, :]))
    pos = same_pid & valid
    del same_pid
    npos = pos.sum(1)
    pmax = int(npos.max().item()) if c else 0
    if pmax == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=dev)
        return _ChunkScores(ap=zeros, inp=zeros.clone(), first=torch.full((c,), -1, dtype=torch.int64, device=dev),
                            valid=torch.zeros(c, dtype=torch.bool, device=dev))

    # Gather each row's positive distances into a (c, pmax) block padded with +inf, then sort it (small).
    rows, cols = pos.nonzero(as_tuple=True)  # row-major: rows ascending
    starts = torch.cumsum(npos, 0) - npos
    slot = torch.arange(rows.numel(), device=dev) - starts[rows]
    p = torch.full((c, pmax), math.inf, dtype=dist.dtype, device=dev)
    p[rows, slot] = dist[rows, cols]
    p = torch.sort(p, dim=1).values

    # b[k] = number of positives with distance <= d_k; a valid k lies before the i-th positive iff b[k] <= i.
    b = torch.searchsorted(p, dist, right=True)

    # Rows where a valid non-positive entry ties with a positive, or two positives tie, need the stable order.
    prev = p.gather(1, (b - 1).clamp(min=0))
    tie = ((prev == dist) & (b > 0) & valid & ~pos).any(1)
    tie |= ((p[:, 1:] == p[:, :-1]) & torch.isfinite(p[:, 1:])).any(1)
    del prev

    width = pmax + 2  # buckets 0..pmax, plus pmax + 1 for removed entries
    b.masked_fill_(~valid, pmax + 1)
    b += (torch.arange(c, device=dev) * width)[:, None]
    counts = torch.bincount(b.view(-1), minlength=c * width).view(c, width)
    del b
    r = counts.cumsum(1)[:, :pmax]  # r[:, i] = valid entries strictly before the i-th positive
    i = torch.arange(pmax, device=dev)
    in_row = i[None, :] < npos[:, None]
    has = npos > 0
    terms = (i[None, :] + 1).double() / (r.double() + 1.0)
    ap = torch.where(in_row, terms, torch.zeros_like(terms)).sum(1) / npos.clamp(min=1).double()
    ap = torch.where(has, ap, torch.zeros_like(ap))
    first = torch.where(has, r[:, 0], torch.full_like(npos, -1))
    last = r.gather(1, (npos - 1).clamp(min=0)[:, None])[:, 0]
    inp = torch.where(has, npos.double() / (last.double() + 1.0), torch.zeros_like(ap))
    out = _ChunkScores(ap=ap, inp=inp, first=first, valid=has)

    if bool(tie.any()):
        idx = tie.nonzero(as_tuple=True)[0]
        exact = _score_sorted(dist[idx], valid[idx], pos[idx])
        out.ap[idx], out.inp[idx], out.first[idx], out.valid[idx] = exact.ap, exact.inp, exact.first, exact.valid
    return out


def _finalise(parts: list[_ChunkScores], num_queries: int, max_rank: int) -> dict[str, Any]:
    """mAP / mINP / CMC over the valid queries of all chunks."""
    ap = torch.cat([p.ap for p in parts]).cpu().numpy() if parts else np.zeros(0)
    inp = torch.cat([p.inp for p in parts]).cpu().numpy() if parts else np.zeros(0)
    first = torch.cat([p.first for p in parts]).cpu().numpy() if parts else np.zeros(0, dtype=np.int64)
    valid = torch.cat([p.valid for p in parts]).cpu().numpy() if parts else np.zeros(0, dtype=bool)
    nvalid = int(valid.sum())
    if nvalid == 0:
        raise ValueError(
            f"evaluate_ranking: none of the {num_queries} queries has a valid gallery match (every gallery entry of "
            "a query's identity shares its camera, or scene for MSVR310, or the identity is absent from the "
            "gallery). Check the query/gallery split, or the validation split's val_fraction.")
    fv = first[valid]
    cmc = (fv[None, :] <= np.arange(max_rank)[:, None]).mean(1).astype(np.float64)
    res: dict[str, Any] = {
        "mAP": float(ap[valid].mean()),
        "mINP": float(inp[valid].mean()),
        "cmc": cmc,
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
    """Score a query x gallery distance matrix with the ReID protocol of DATASETS.md.

    Args:
        distmat: ``(Q, G)`` distances, smaller = more similar (numpy array or torch tensor, any device). NaN is
            an error; ties are broken by gallery index (the order of a stable argsort).
        q_pids, g_pids: identities of queries and gallery entries.
        q_camids, g_camids: cameras; with scene ids absent, gallery entries with the query's identity AND camera
            are removed (RGBNT201, RGBNT100).
        q_sceneids, g_sceneids: scenes (MSVR310); when given, entries with the query's identity AND scene are
            removed whatever the camera.
        max_rank: CMC length; reduced to the gallery size when the gallery is smaller (as the reference does).
        chunk_size: queries scored at a time; ``None`` picks ``DEFAULT_CHUNK_ELEMENTS // G`` rows. Memory beyond
            the inputs is a few ``chunk_size x G`` buffers, never the whole sorted matrix.

    Returns:
        ``mAP`` and ``mINP`` (floats, fractions in [0, 1], means over valid queries), ``cmc`` (numpy float64 of
        length ``max_rank``, fraction of valid queries with a hit within rank ``k + 1``), ``R1``/``R5``/``R10``,
        ``num_valid_queries``, ``num_queries``, and per-query ``ap`` / ``valid`` arrays.

    Raises:
        ValueError: shapes disagree, NaN distances, or no query has a valid match.
    """
    dist = distmat.detach() if isinstance(distmat, torch.Tensor) else torch.from_numpy(np.asarray(distmat))
    if dist.ndim != 2:
        raise ValueError(f"evaluate_ranking: distmat must be 2-D (queries x gallery), got shape {tuple(dist.shape)}")
    if not dist.is_floating_point():
        dist = dist.double()
    nq, ng = dist.shape
    dev = dist.device
    use_scenes = q_sceneids is not None or g_sceneids is not None
    if use_scenes and (q_sceneids is None or g_sceneids is None):
        raise ValueError("evaluate_ranking: give both q_sceneids and g_sceneids (MSVR310 rule) or neither")
    qp, gp = _as_long(q_pids, "q_pids", dev), _as_long(g_pids, "g_pids", dev)
    qg = _as_long(q_sceneids if use_scenes else q_camids, "q_sceneids" if use_scenes else "q_camids", dev)
    gg = _as_long(g_sceneids if use_scenes else g_camids, "g_sceneids" if use_scenes else "g_camids", dev)
    for name, t, n in (("q_pids", qp, nq), ("g_pids", gp, ng), ("query groups", qg, nq), ("gallery groups", gg, ng)):
        if t.numel() != n:
            raise ValueError(f"evaluate_ranking: {name} has {t.numel()} entries but distmat is {nq} x {ng}")
    max_rank = max(1, min(max_rank, ng))
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(ng, 1))
    if chunk_size < 1:
        raise ValueError(f"evaluate_ranking: chunk_size must be >= 1, got {chunk_size}")
    parts = []
    for s in range(0, nq, chunk_size):
        d = dist[s:s + chunk_size].contiguous()
        if bool(torch.isnan(d).any()):
            raise ValueError(f"evaluate_ranking: distmat has NaN in query rows {s}..{s + d.shape[0] - 1}")
        parts.append(_score_chunk(d, qp[s:s + chunk_size], gp, qg[s:s + chunk_size], gg))
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


_INPUT_KEYS = ("rgb", "nir", "tir")


@torch.inference_mode()
def extract_features(model: torch.nn.Module, loader: Iterable[dict[str, Any]], device: torch.device | str,
                     amp: bool = False, use_camid: bool = True) -> Features:
    """Run ``model.embed`` over an evaluation loader.

    Batches are the dicts of ``stmi.data.TripletDataset`` (docs/ARCHITECTURE.md): ``rgb``/``nir``/``tir``,
    ``mask``/``has_mask``, ``text`` (only if present), ``camid``, ``pid``, ``sceneid``, ``index``. When ``index`` is
    present the features are put back in dataset order, so row ``i`` belongs to record ``i`` whatever the sampler.

    Args:
        amp: bf16 autocast, on CUDA only (CPU bf16 is slower and changes the numbers for nothing).
        use_camid: pass the camera id to the model (SIE at test time, as the anchors do).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, pids, cams, scenes, index = [], [], [], [], []
    try:
        for batch in loader:
            kw: dict[str, Any] = {}
            if batch.get("mask") is not None:
                kw["mask"] = batch["mask"].to(device, non_blocking=True)
                if batch.get("has_mask") is not None:
                    kw["has_mask"] = torch.as_tensor(batch["has_mask"]).to(device, dtype=torch.bool)
            if batch.get("text") is not None:
                kw["text"] = batch["text"].to(device, non_blocking=True)
            if use_camid and batch.get("camid") is not None:
                kw["camid"] = torch.as_tensor(batch["camid"]).to(device, dtype=torch.long)
            imgs = [batch[k].to(device, non_blocking=True) for k in _INPUT_KEYS]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=amp and device.type == "cuda"):
                emb = model.embed(*imgs, **kw)
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
    """Score extracted features (the second half of :func:`evaluate`; see there)."""
    device = torch.device(device)
    q, g = qf.feats.to(device), gf.feats.to(device)
    nq, ng = q.shape[0], g.shape[0]
    qp, gp = torch.as_tensor(qf.pids, device=device), torch.as_tensor(gf.pids, device=device)
    qgrp = torch.as_tensor(qf.sceneids if use_scenes else qf.camids, device=device)
    ggrp = torch.as_tensor(gf.sceneids if use_scenes else gf.camids, device=device)
    if use_scenes and (bool((qgrp < 0).any()) or bool((ggrp < 0).any())):
        raise ValueError("evaluate: use_scenes=True but some records have no scene id (sceneid -1); the scene rule "
                         "is for MSVR310 only")
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(ng, 1))
    vis = np.unique(np.linspace(0, nq - 1, num=min(num_vis, nq)).round().astype(np.int64)) if num_vis > 0 else \
        np.zeros(0, dtype=np.int64)
    top = np.full((len(vis), top_k), -1, dtype=np.int64)
    full = np.empty((nq, ng), dtype=np.float32) if return_distmat else None
    parts = []
    for s in range(0, nq, chunk):
        d = pairwise_distance(q[s:s + chunk], g)
        parts.append(_score_chunk(d, qp[s:s + chunk], gp, qgrp[s:s + chunk], ggrp))
        if full is not None:
            full[s:s + d.shape[0]] = d.float().cpu().numpy()
        for j, qi in enumerate(vis):
            if s <= qi < s + d.shape[0]:
                row = d[qi - s].clone()
                row[(gp == qp[qi]) & (ggrp == qgrp[qi])] = math.inf
                order = torch.sort(row, stable=True).indices
                order = order[torch.isfinite(row[order])][:top_k].cpu().numpy()
                top[j, :len(order)] = order
    res = _finalise(parts, nq, max(1, min(max_rank, ng)))
    res["vis_queries"] = vis
    res["top10"] = top
    if full is not None:
        res["distmat"] = full
    return res
