"""Missing-modality evaluation: TOP-ReID's missing-spectral protocol and MDReID's any-to-any retrieval.

Both protocols score the usual ranking (:func:`stmi.eval.evaluate_ranking`: same identity and camera removed, or
scene for MSVR310) on features extracted with some modalities absent. An absent modality is given to the model
through its presence mask (``STMI.embed(..., presence=...)``, docs/design.md "Missing modalities"): no frame of it
reaches any stage, and its input frame is zeroed as well. ``absent="zero"`` instead feeds the zeroed frame as if
it were present (no presence mask), which is how the published successors of TOP-ReID simulate a missing modality;
it is kept as a baseline for a model that knows nothing of missing modalities.

Modality subsets are named by their present modalities, in the model's order: ``R`` (RGB), ``N`` (NIR), ``T``
(TIR), e.g. ``RT`` = RGB and TIR present, NIR missing; ``RNT`` is the complete triplet.

**TOP-ReID** (Wang et al., AAAI 2024), read from the published code ``924973292/TOP-ReID`` (the same files in the
fork ``braveapple/TOP-ReID``):

- ``config/defaults.py``: ``_C.TEST.MISS`` names the MISSING modalities, one of ``r``, ``n``, ``t``, ``rn``,
  ``rt``, ``nt`` (the six non-empty proper subsets, by their complement); ``'None'`` is the complete test.
- ``modeling/make_model.py``: ``TOPReID.forward`` in eval mode replaces the token features of the modalities
  ``self.miss`` names (``cfg.TEST.MISS``, fixed when the model is built) by CRM's reconstruction from the present
  ones, for EVERY sample the model embeds.
- ``data/datasets/make_dataloader.py``: the test loader is ``ImageDataset(dataset.query + dataset.gallery)``, one
  loader over the query and the gallery; ``engine/processor.py`` ``do_inference`` embeds it and
  ``utils/metrics.py`` ``R1_mAP_eval`` splits the features at ``num_query``.

So in TOP-ReID's protocol BOTH the query and the gallery lack the modality; one setting per ``TEST.MISS`` value,
each run as a separate test. :func:`evaluate_topreid` does exactly that for the six settings (query subset =
gallery subset = the complement of ``TEST.MISS``), and reports their mean beside them (the "average" TOP-ReID's
missing-spectral tables give). CRM itself is TOP-ReID's model; STMI's counterpart is the presence mask.

**MDReID** (Feng et al., NeurIPS 2025, "any-to-any" multi-modal ReID), read from the published code
``stone96123/MDReID``:

- ``engine/processor.py``: ``do_inference_mismatch(cfg, model, val_loader, num_query, query_ID, gallery_ID)``
  embeds every batch of the query + gallery loader twice, once with ``model.miss_type = ID_to_MISS(query_ID)``
  and once with ``ID_to_MISS(gallery_ID)``; ``query_ID`` / ``gallery_ID`` are the PRESENT modality indices
  (0 = RGB, 1 = NIR, 2 = TIR; e.g. the defaults ``[1, 2]`` and ``[0, 2]``), and ``ID_to_MISS`` maps them to the
  ``TEST.MISS`` codes above (all three present: ``"nothing"``, the complete input).
- ``utils/metrics.py``: ``R1_mAP_eval.mismatch_compute(g_feats)`` takes the query rows (first ``num_query``) of
  the query-subset pass and the gallery rows of the gallery-subset pass, L2-normalises both and scores them with
  the usual ``eval_func`` (same identity and camera removed).

The script that enumerates the published settings (``test_net.py``) is not in that repository's published files
(only ``README.md``, ``engine/processor.py`` and ``utils/metrics.py`` are), so the grid is the paper's description:
the query and the gallery each carry any non-empty modality subset, every combination, 7 x 7 = 49 settings
(:func:`evaluate_any2any`), the diagonal being the modality-matched ones. MDReID's ``transform_index_org`` /
``select_feature`` re-order and select chunks of ITS concatenated per-modality features so that both sides
compare like with like; STMI has one retrieval embedding whose partial-input version lives in the complete one's
space, so the features are compared as they are.

Features are extracted once per (side, subset) and reused by every setting that needs them (for RGBNT201, whose
query loader is its gallery loader, once per subset): ``all`` costs 7 extraction passes, not 55.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from stmi.config import field_types
from stmi.eval import Features, evaluate_features, extract_features

MODALITIES: tuple[str, ...] = ("rgb", "nir", "tir")
"""The model's modality order (the columns of a presence mask)."""
LETTERS = "RNT"
"""One letter per modality, in :data:`MODALITIES` order; a subset's name is its present letters."""
SUBSETS: tuple[str, ...] = ("RNT", "RN", "RT", "NT", "R", "N", "T")
"""The seven non-empty modality subsets, complete first, then by size."""
TOPREID_MISS: dict[str, str] = {"r": "NT", "n": "RT", "t": "RN", "rn": "T", "rt": "N", "nt": "R"}
"""TOP-ReID's ``TEST.MISS`` codes (the missing modalities) -> the present subset, in their order."""
PROTOCOLS: tuple[str, ...] = ("topreid", "any2any")
MISSING_CHOICES: tuple[str, ...] = typing.get_args(field_types()["eval.missing"])
"""Values of ``eval.missing`` (``none``, ``topreid``, ``any2any``, ``all``): which protocols the final test adds."""
ABSENT_MODES: tuple[str, ...] = ("mask", "zero")
"""How an absent modality reaches the model: through the presence mask, or as a zero frame marked present."""
METRIC_PREFIX = "test_missing"
SCALARS: tuple[str, ...] = ("mAP", "R1", "R5", "R10", "mINP")
"""The scalar metrics of a setting logged and tabulated (``cmc``, per-query ``ap`` stay in the result dicts)."""

__all__ = [
    "ABSENT_MODES", "LETTERS", "METRIC_PREFIX", "MISSING_CHOICES", "MODALITIES", "PROTOCOLS", "SUBSETS", "Setting",
    "TOPREID_MISS", "FeatureBank", "any2any_settings", "evaluate_any2any", "evaluate_missing", "evaluate_settings",
    "evaluate_topreid", "format_missing_table", "missing_metrics", "missing_table", "presence_of", "settings_for",
    "subset_name", "topreid_settings",
]


def presence_of(subset: str) -> tuple[bool, bool, bool]:
    """``"RT"`` -> ``(True, False, True)`` (the row of a presence mask).

    Raises:
        ValueError: not a non-empty subset of ``R``, ``N``, ``T``.
    """
    s = subset.upper()
    if not s or any(c not in LETTERS for c in s) or len(set(s)) != len(s):
        raise ValueError(f"modality subset {subset!r}: use the letters R (rgb), N (nir), T (tir), each at most once, "
                         f"e.g. one of {', '.join(SUBSETS)}")
    return tuple(c in s for c in LETTERS)  # type: ignore[return-value]


def subset_name(presence: Sequence[bool]) -> str:
    """Inverse of :func:`presence_of`: ``(True, False, True)`` -> ``"RT"``."""
    return "".join(c for c, p in zip(LETTERS, presence) if p)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One evaluation setting: the query's and the gallery's modality subsets."""

    protocol: str
    """``topreid`` or ``any2any``."""
    name: str
    """``NT`` (TOP-ReID: both sides) or ``RN_to_T`` (any-to-any: query subset, gallery subset)."""
    query: str
    gallery: str
    miss: str | None = None
    """TOP-ReID's ``TEST.MISS`` code of the setting (the missing modalities); None for any-to-any."""


def topreid_settings() -> list[Setting]:
    """The six settings of TOP-ReID, in its ``TEST.MISS`` order (r, n, t, rn, rt, nt): both sides lack the same."""
    return [Setting("topreid", sub, sub, sub, miss) for miss, sub in TOPREID_MISS.items()]


def any2any_settings() -> list[Setting]:
    """MDReID's any-to-any grid: every (query subset, gallery subset) pair of the seven subsets, 49 settings."""
    return [Setting("any2any", f"{q}_to_{g}", q, g) for q in SUBSETS for g in SUBSETS]


def settings_for(missing: str) -> list[Setting]:
    """The settings of an ``eval.missing`` value (``none`` -> none)."""
    if missing not in MISSING_CHOICES:
        raise ValueError(f"missing-modality protocol {missing!r}: choose one of {', '.join(MISSING_CHOICES)}")
    return ((topreid_settings() if missing in ("topreid", "all") else [])
            + (any2any_settings() if missing in ("any2any", "all") else []))


class FeatureBank:
    """Features of the query and gallery splits per modality subset, extracted on first use and kept.

    When the query and gallery loaders are the same object (RGBNT201's test set is its own gallery) one
    extraction per subset serves both sides.
    """

    def __init__(self, model: torch.nn.Module, query_loader: Iterable[dict[str, Any]],
                 gallery_loader: Iterable[dict[str, Any]], device: torch.device | str, amp: bool = False,
                 use_camid: bool = True, absent: str = "mask") -> None:
        if absent not in ABSENT_MODES:
            raise ValueError(f"absent={absent!r}: choose one of {', '.join(ABSENT_MODES)}")
        self.model, self.device, self.amp, self.use_camid, self.absent = model, device, amp, use_camid, absent
        self.loaders = {"query": query_loader, "gallery": gallery_loader}
        self._cache: dict[tuple[int, str], Features] = {}
        self.extractions = 0
        """Extraction passes run so far (one per distinct loader and subset)."""

    def get(self, side: str, subset: str) -> Features:
        """The features of ``side`` (``query`` | ``gallery``) with only ``subset``'s modalities present."""
        loader = self.loaders[side]
        key = (id(loader), subset)
        if key not in self._cache:
            presence = presence_of(subset)
            self._cache[key] = extract_features(
                self.model, loader, self.device, amp=self.amp, use_camid=self.use_camid,
                presence=None if all(presence) else presence, absent=self.absent)
            self.extractions += 1
        return self._cache[key]


def evaluate_settings(model: torch.nn.Module, query_loader: Iterable[dict[str, Any]],
                      gallery_loader: Iterable[dict[str, Any]], device: torch.device | str,
                      settings: Sequence[Setting], use_scenes: bool = False, amp: bool = False,
                      absent: str = "mask", use_camid: bool = True, max_rank: int = 50,
                      bank: FeatureBank | None = None) -> dict[str, dict[str, Any]]:
    """Score each setting: query features with ``setting.query``'s modalities, gallery with ``setting.gallery``'s.

    Returns:
        ``{setting.name: result}`` in ``settings`` order, each result what :func:`stmi.eval.evaluate_features`
        returns (``mAP``, ``mINP``, ``R1``, ``R5``, ``R10``, ``cmc``, ``num_valid_queries`` ...) plus ``protocol``,
        ``query``, ``gallery`` and ``miss``. Names must be unique within ``settings``.
    """
    bank = bank or FeatureBank(model, query_loader, gallery_loader, device, amp=amp, use_camid=use_camid,
                               absent=absent)
    out: dict[str, dict[str, Any]] = {}
    for s in settings:
        if s.name in out:
            raise ValueError(f"evaluate_settings: setting name {s.name!r} appears twice")
        res = evaluate_features(bank.get("query", s.query), bank.get("gallery", s.gallery), use_scenes=use_scenes,
                                max_rank=max_rank, num_vis=0, device=device)
        for k in ("vis_queries", "top10"):
            res.pop(k, None)
        res.update(protocol=s.protocol, query=s.query, gallery=s.gallery, miss=s.miss)
        out[s.name] = res
    return out


def evaluate_topreid(model: torch.nn.Module, query_loader: Iterable[dict[str, Any]],
                     gallery_loader: Iterable[dict[str, Any]], device: torch.device | str,
                     **kwargs: Any) -> dict[str, dict[str, Any]]:
    """TOP-ReID's missing-spectral protocol (module docstring): six settings, query and gallery lack the same
    modalities; keys ``NT``, ``RT``, ``RN``, ``T``, ``N``, ``R`` (missing r, n, t, rn, rt, nt). Keyword arguments
    as :func:`evaluate_settings`."""
    return evaluate_settings(model, query_loader, gallery_loader, device, topreid_settings(), **kwargs)


def evaluate_any2any(model: torch.nn.Module, query_loader: Iterable[dict[str, Any]],
                     gallery_loader: Iterable[dict[str, Any]], device: torch.device | str,
                     **kwargs: Any) -> dict[str, dict[str, Any]]:
    """MDReID's any-to-any protocol (module docstring): 49 settings ``<query subset>_to_<gallery subset>``.
    Keyword arguments as :func:`evaluate_settings`."""
    return evaluate_settings(model, query_loader, gallery_loader, device, any2any_settings(), **kwargs)


def evaluate_missing(model: torch.nn.Module, query_loader: Iterable[dict[str, Any]],
                     gallery_loader: Iterable[dict[str, Any]], device: torch.device | str, missing: str = "all",
                     **kwargs: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """The protocols ``missing`` names (``topreid`` | ``any2any`` | ``all``), sharing one :class:`FeatureBank`.

    Returns:
        ``{protocol: {setting name: result}}`` (``{}`` for ``none``); keyword arguments as
        :func:`evaluate_settings`.
    """
    settings = settings_for(missing)
    if not settings:
        return {}
    bank = kwargs.pop("bank", None) or FeatureBank(
        model, query_loader, gallery_loader, device, amp=kwargs.get("amp", False),
        use_camid=kwargs.get("use_camid", True), absent=kwargs.get("absent", "mask"))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol in PROTOCOLS:
        chosen = [s for s in settings if s.protocol == protocol]
        if chosen:
            out[protocol] = evaluate_settings(model, query_loader, gallery_loader, device, chosen, bank=bank,
                                              **kwargs)
    return out


def _mean_row(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {k: math.fsum(r[k] for r in results.values()) / len(results) for k in SCALARS
            if all(k in r for r in results.values())}


def missing_metrics(results: dict[str, dict[str, dict[str, Any]]], prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """Flat MLflow metrics: ``test_missing/topreid/NT/mAP``, ``test_missing/any2any/RN_to_T/R1`` ... and, for
    TOP-ReID, the mean of its six settings as ``test_missing/topreid/mean/<metric>``."""
    out: dict[str, float] = {}
    for protocol, settings in results.items():
        for name, r in settings.items():
            out.update({f"{prefix}/{protocol}/{name}/{k}": float(r[k]) for k in SCALARS if k in r})
        if protocol == "topreid" and settings:
            out.update({f"{prefix}/topreid/mean/{k}": v for k, v in _mean_row(settings).items()})
    return out


def missing_table(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[Any]]:
    """Column-wise table (``RunLogger.log_table``): protocol, setting, TOP-ReID's code, query and gallery
    modalities, the scalar metrics as fractions, and the valid query count; TOP-ReID's mean row after its six."""
    cols: dict[str, list[Any]] = {c: [] for c in ("protocol", "setting", "miss", "query", "gallery", *SCALARS,
                                                  "num_valid_queries")}

    def add(protocol: str, name: str, miss: str, q: str, g: str, r: dict[str, Any]) -> None:
        for c, v in (("protocol", protocol), ("setting", name), ("miss", miss), ("query", q), ("gallery", g),
                     ("num_valid_queries", int(r.get("num_valid_queries", -1)))):
            cols[c].append(v)
        for k in SCALARS:
            cols[k].append(float(r[k]) if k in r else float("nan"))

    for protocol, settings in results.items():
        for name, r in settings.items():
            add(protocol, name, r.get("miss") or "", r["query"], r["gallery"], r)
        if protocol == "topreid" and settings:
            add(protocol, "mean", "", "", "", {**_mean_row(settings), "num_valid_queries": -1})
    return cols


def format_missing_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A Markdown table (percent) of :func:`missing_table`, for logs and the command line."""
    t = missing_table(results)
    lines = ["| protocol | setting | query | gallery | mAP | R1 | R5 | R10 |", "|---|---|---|---|---|---|---|---|"]
    for i in range(len(t["setting"])):
        lines.append(f"| {t['protocol'][i]} | {t['setting'][i]} | {t['query'][i] or '-'} | {t['gallery'][i] or '-'} | "
                     + " | ".join(f"{100 * t[k][i]:.1f}" for k in ("mAP", "R1", "R5", "R10")) + " |")
    return "\n".join(lines)
