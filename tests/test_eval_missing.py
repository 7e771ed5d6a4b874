"""stmi.eval_missing: TOP-ReID's missing-modality protocol and MDReID's any-to-any grid against naive
implementations of the published protocols (a tiny random STMI, every sample embedded one at a time, scored by a
per-query loop), the feature sharing, the zero-frame baseline, and the end-of-run test of ``stmi.engine.fit``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stmi.config import ModelConfig, apply_overrides
from stmi.eval_missing import (
    FeatureBank,
    any2any_settings,
    evaluate_any2any,
    evaluate_missing,
    evaluate_topreid,
    format_missing_table,
    missing_metrics,
    missing_table,
    presence_of,
    settings_for,
    subset_name,
    topreid_settings,
)
from stmi.model import build_model

SIZE = (32, 16)
# TOP-ReID's cfg.TEST.MISS values (config/defaults.py, modeling/make_model.py): the MISSING modalities; its test
# loader is query + gallery (data/datasets/make_dataloader.py), so both sides lack them.
TOPREID_MISS = ("r", "n", "t", "rn", "rt", "nt")
# MDReID's modality indices (engine/processor.py: query_ID / gallery_ID, 0 = RGB, 1 = NIR, 2 = TIR): any
# non-empty subset on each side.
MDREID_IDS = [list(c) for k in (3, 2, 1) for c in itertools.combinations(range(3), k)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(clip_model="stmi-tiny", image_size=SIZE, num_classes=5, num_cameras=3))
    g = torch.Generator().manual_seed(1)
    for name, buf in m.named_buffers():  # non-trivial BN statistics, so the embedding depends on every feature
        if name.endswith("running_mean"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    return m.eval()


def _split(n: int, seed: int, ids: int = 5, cams: int = 3) -> list[dict]:
    """Batches (of 4) of random triplets; identity i's frames share a component, so retrieval is not chance."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(ids, 3, 3, *SIZE, generator=torch.Generator().manual_seed(99))
    pids = torch.arange(n) % ids
    frames = 0.8 * protos[pids] + torch.randn(n, 3, 3, *SIZE, generator=g)
    camids = torch.randint(0, cams, (n,), generator=g)
    batches = []
    for s in range(0, n, 4):
        e = min(s + 4, n)
        batches.append({"rgb": frames[s:e, 0], "nir": frames[s:e, 1], "tir": frames[s:e, 2], "pid": pids[s:e],
                        "camid": camids[s:e], "index": torch.arange(s, e)})
    return batches


def _naive_embed(model, batches, present: list[int], zero: bool = False) -> tuple[np.ndarray, ...]:
    """The whole split as ONE batch through ``STMI.embed`` with only the modality indices ``present`` (MDReID's
    IDs); the protocol code extracts in batches of 4 through ``extract_features``, so the paths are independent."""
    x = [torch.cat([b[k] for b in batches]) for k in ("rgb", "nir", "tir")]
    kw = {"camid": torch.cat([b["camid"] for b in batches])}
    if zero:  # the successors' simulation: the absent image is zeros, fed as present
        x = [t if m in present else torch.zeros_like(t) for m, t in enumerate(x)]
    elif len(present) < 3:
        kw["presence"] = torch.tensor([[m in present for m in range(3)]]).expand(len(x[0]), 3)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.embed(*x, **kw), dim=1).numpy()
    return feats, torch.cat([b["pid"] for b in batches]).numpy(), kw["camid"].numpy()


def _naive_score(qf, qp, qc, gf, gp, gc) -> dict[str, float]:
    """The reference codebases' eval_func: 2 - 2 cos, stable argsort, drop same id + camera, loop over queries."""
    dist = 2 - 2 * qf @ gf.T
    aps, r1, r5 = [], [], []
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((gp[order] == qp[i]) & (gc[order] == qc[i]))
        match = (gp[order] == qp[i])[keep].astype(np.int64)
        if not match.any():
            continue
        aps.append(float((match.cumsum() / np.arange(1, len(match) + 1) * match).sum() / match.sum()))
        r1.append(float(match[:1].any()))
        r5.append(float(match[:5].any()))
    return {"mAP": float(np.mean(aps)), "R1": float(np.mean(r1)), "R5": float(np.mean(r5)), "n": len(aps)}


def _miss_to_present(miss: str) -> list[int]:
    return [m for m, letter in enumerate("rnt") if letter not in miss]


def _ids_to_subset(ids: list[int]) -> str:
    return "".join("RNT"[m] for m in sorted(ids))


def _close(got: dict, want: dict, what: str) -> None:
    for k in ("mAP", "R1", "R5"):
        assert got[k] == pytest.approx(want[k], abs=1e-6), (what, k, got[k], want[k])
    assert got["num_valid_queries"] == want["n"], what


def test_settings_are_the_published_ones():
    top = topreid_settings()
    assert [s.miss for s in top] == list(TOPREID_MISS)
    assert [(s.query, s.gallery) for s in top] == [(_ids_to_subset(_miss_to_present(m)),) * 2 for m in TOPREID_MISS]
    grid = any2any_settings()
    assert len(grid) == 49 == len({(s.query, s.gallery) for s in grid})
    assert {(s.query, s.gallery) for s in grid} == {(_ids_to_subset(q), _ids_to_subset(g)) for q in MDREID_IDS
                                                    for g in MDREID_IDS}
    assert grid[0].name == "RNT_to_RNT" and "RN_to_T" in {s.name for s in grid}
    assert settings_for("none") == [] and len(settings_for("all")) == 55
    assert presence_of("RT") == (True, False, True) and subset_name((False, True, False)) == "N"
    for bad in ("", "RR", "X", "rgb"):
        with pytest.raises(ValueError, match="modality subset"):
            presence_of(bad)
    with pytest.raises(ValueError, match="choose one of"):
        settings_for("both")


def test_topreid_protocol_equals_the_naive_one_on_a_shared_test_set(model):
    """RGBNT201's layout: the test set is its own query and gallery (one loader); both sides lack the modality."""
    test = _split(20, seed=3)
    got = evaluate_topreid(model, test, test, "cpu")
    assert list(got) == ["NT", "RT", "RN", "T", "N", "R"]
    complete = _naive_score(*_naive_embed(model, test, [0, 1, 2]), *_naive_embed(model, test, [0, 1, 2]))
    differs = 0
    for miss, (name, res) in zip(TOPREID_MISS, got.items()):
        f = _naive_embed(model, test, _miss_to_present(miss))
        want = _naive_score(*f, *f)
        _close(res, want, f"miss {miss}")
        assert res["miss"] == miss and res["query"] == res["gallery"] == name
        differs += abs(want["mAP"] - complete["mAP"]) > 1e-4
    assert differs >= 4  # the absent modality changes the numbers: the test would catch a protocol that ignored it


def test_any2any_protocol_equals_the_naive_one_with_separate_query_and_gallery(model):
    query, gallery = _split(10, seed=4), _split(21, seed=5)
    bank = FeatureBank(model, query, gallery, "cpu")
    got = evaluate_any2any(model, query, gallery, "cpu", bank=bank)
    assert bank.extractions == 14  # each side once per subset, shared by the 49 settings
    naive_q = {_ids_to_subset(ids): _naive_embed(model, query, ids) for ids in MDREID_IDS}
    naive_g = {_ids_to_subset(ids): _naive_embed(model, gallery, ids) for ids in MDREID_IDS}
    for q_ids, g_ids in itertools.product(MDREID_IDS, MDREID_IDS):
        q, g = _ids_to_subset(q_ids), _ids_to_subset(g_ids)
        res = got[f"{q}_to_{g}"]
        _close(res, _naive_score(*naive_q[q], *naive_g[g]), f"{q} -> {g}")
        assert (res["query"], res["gallery"], res["miss"]) == (q, g, None)


def test_all_shares_features_and_the_diagonal_is_topreid(model):
    test = _split(14, seed=6)
    bank = FeatureBank(model, test, test, "cpu")
    res = evaluate_missing(model, test, test, "cpu", missing="all", bank=bank)
    assert bank.extractions == 7  # one loader for both sides: one pass per subset for 55 settings
    assert list(res) == ["topreid", "any2any"] and len(res["topreid"]) == 6 and len(res["any2any"]) == 49
    for name, r in res["topreid"].items():
        assert r["mAP"] == res["any2any"][f"{name}_to_{name}"]["mAP"]
    assert evaluate_missing(model, test, test, "cpu", missing="none") == {}

    metrics = missing_metrics(res)
    assert len(metrics) == (6 + 1 + 49) * 5
    assert metrics["test_missing/topreid/NT/mAP"] == res["topreid"]["NT"]["mAP"]
    assert metrics["test_missing/any2any/RN_to_T/R1"] == res["any2any"]["RN_to_T"]["R1"]
    mean = np.mean([r["mAP"] for r in res["topreid"].values()])
    assert metrics["test_missing/topreid/mean/mAP"] == pytest.approx(mean)
    table = missing_table(res)
    assert len(table["setting"]) == 6 + 1 + 49 and all(len(c) == 56 for c in table.values())
    assert table["setting"][:7] == ["NT", "RT", "RN", "T", "N", "R", "mean"] and table["miss"][0] == "r"
    assert (table["query"][7], table["gallery"][7]) == ("RNT", "RNT")
    md = format_missing_table(res)
    assert md.count("\n") == 57 and "| any2any | RN_to_T | RN | T |" in md


def test_zero_frame_baseline_feeds_zeros_as_present(model):
    """``absent="zero"``: the successors' simulation (the absent image zeroed, no presence mask)."""
    test = _split(12, seed=7)
    got = evaluate_topreid(model, test, test, "cpu", absent="zero")
    masked = evaluate_topreid(model, test, test, "cpu")
    for miss, name in zip(TOPREID_MISS, got):
        f = _naive_embed(model, test, _miss_to_present(miss), zero=True)
        _close(got[name], _naive_score(*f, *f), f"zero {miss}")
    assert any(abs(got[n]["mAP"] - masked[n]["mAP"]) > 1e-4 for n in got)
    with pytest.raises(ValueError, match="absent"):
        FeatureBank(model, test, test, "cpu", absent="noise")


@pytest.mark.timeout(600)
def test_fit_runs_the_configured_protocols_in_its_final_test(tmp_path):
    """``eval.missing`` reaches the end-of-run test: the callbacks get ``result["missing"]``, computed on the
    selected weights (the same numbers a fresh evaluation of those weights gives)."""
    from stmi.callbacks import Callback
    from stmi.data.synth import make_synthetic
    from stmi.engine import fit, prepare_run
    from stmi.recipes import recipe

    root = make_synthetic("rgbnt201", tmp_path / "data", ids=18, images_per_id=6, seed=2)
    cfg = apply_overrides(recipe("demo", "rgbnt201"), {"data.root": str(root), "optim.epochs": 1,
                                                        "eval.missing": "topreid", "data.num_workers": 0})

    class Keep(Callback):
        def on_test_end(self, run, result, weights):
            self.result, self.weights = result, {k: v.clone() for k, v in weights.items()}

    run = prepare_run(cfg)
    keep = Keep()
    fit(run, callbacks=[keep], progress=False)
    assert list(keep.result["missing"]) == ["topreid"] and len(keep.result["missing"]["topreid"]) == 6
    run.core.load_state_dict(keep.weights)
    again = evaluate_topreid(run.core, run.loaders.query, run.loaders.gallery, "cpu")
    logged = keep.result["missing"]["topreid"]
    assert {n: r["mAP"] for n, r in again.items()} == {n: r["mAP"] for n, r in logged.items()}

    none = prepare_run(apply_overrides(cfg, {"eval.missing": "none"}))
    fit(none, callbacks=[keep], progress=False)
    assert "missing" not in keep.result
