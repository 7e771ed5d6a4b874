"""stmi.eval: the vectorised, chunked ranking evaluator against a plain per-query implementation of the protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stmi.eval import Features, evaluate_features, evaluate_ranking


def reference_eval(distmat, q_pids, g_pids, q_grp, g_grp, max_rank=50):
    """The reference codebases' approach: stable argsort per row, drop same-id-same-group, loop over queries."""
    distmat = np.asarray(distmat)
    aps, cmcs, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_grp[order] == q_grp[i]))
        matches = (g_pids[order] == q_pids[i])[keep].astype(np.int64)
        if not matches.any():
            continue
        cmc = matches.cumsum()
        cmc[cmc > 1] = 1
        cmcs.append(cmc[:max_rank])
        hits = matches.cumsum()
        precision = np.array([hits[k] / (k + 1.0) for k in range(len(matches))])
        aps.append((precision * matches).sum() / matches.sum())
        last = np.where(matches == 1)[0].max()
        inps.append(matches.sum() / (last + 1.0))
    return float(np.mean(aps)), np.asarray(cmcs).mean(0), len(aps), float(np.mean(inps))


def random_problem(rng, nq, ng, nids, ncams, ties=False):
    q_pids = rng.integers(0, nids, nq)
    g_pids = rng.integers(0, nids, ng)
    q_cams = rng.integers(0, ncams, nq)
    g_cams = rng.integers(0, ncams, ng)
    d = rng.random((nq, ng))
    if ties:
        d = np.round(d * 8) / 8  # only 9 distinct values: many ties, exercises the stable tie rule
    return d, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rule", ["camera", "scene"])
def test_matches_per_query_reference(rule, ties):
    rng = np.random.default_rng(0 if rule == "camera" else 1)
    d, qp, gp, qc, gc = random_problem(rng, 60, 300, 12, 3, ties=ties)
    qs, gs = rng.integers(0, 4, 60), rng.integers(0, 4, 300)
    # Identity 99: a query whose only gallery images share its camera and scene -> must be skipped and counted.
    qp[0], qc[0], qs[0] = 99, 2, 3
    gp[:3], gc[:3], gs[:3] = 99, 2, 3
    # Identity 98: absent from the gallery.
    qp[1] = 98
    if rule == "camera":
        res = evaluate_ranking(d, qp, gp, qc, gc, chunk_size=7)
        ref_map, ref_cmc, ref_n, ref_inp = reference_eval(d, qp, gp, qc, gc)
    else:
        res = evaluate_ranking(d, qp, gp, qc, gc, q_sceneids=qs, g_sceneids=gs, chunk_size=7)
        ref_map, ref_cmc, ref_n, ref_inp = reference_eval(d, qp, gp, qs, gs)
    assert res["num_queries"] == 60
    assert res["num_valid_queries"] == ref_n
    assert ref_n <= 58 and not res["valid"][0] and not res["valid"][1]
    assert abs(res["mAP"] - ref_map) < 1e-9
    assert abs(res["mINP"] - ref_inp) < 1e-9
    assert res["cmc"].shape == (50,)
    np.testing.assert_allclose(res["cmc"], ref_cmc, atol=1e-12, rtol=0)
    assert res["R1"] == res["cmc"][0] and res["R10"] == res["cmc"][9]


def test_scene_rule_ignores_camera():
    # Same id, same scene, different camera: removed under the scene rule, kept under the camera rule.
    d = np.array([[0.1, 0.2, 0.3]])
    qp, gp = np.array([5]), np.array([5, 6, 5])
    qc, gc = np.array([0]), np.array([1, 0, 0])
    qs, gs = np.array([7]), np.array([7, 1, 2])
    cam = evaluate_ranking(d, qp, gp, qc, gc, max_rank=3)
    scene = evaluate_ranking(d, qp, gp, qc, gc, q_sceneids=qs, g_sceneids=gs, max_rank=3)
    assert cam["mAP"] == pytest.approx(1.0)  # gallery 0 kept (other camera) and ranked first; gallery 2 removed
    assert scene["mAP"] == pytest.approx(0.5)  # gallery 0 removed; the hit (gallery 2) is at rank 2
    np.testing.assert_allclose(scene["cmc"], [0.0, 1.0, 1.0])


def test_hand_computed_example():
    # Query 0 (id 1, cam 0): gallery sorted by distance = g0 (id 1, cam 0: removed), g1 (id 2), g2 (id 1), g3 (id 3),
    # g4 (id 1). Valid ranking: g1 x, g2 hit at rank 2, g3 x, g4 hit at rank 4 -> AP = (1/2 + 2/4) / 2 = 0.5.
    # Query 1 (id 3, cam 1): g3 (id 3, cam 1) is removed; no other id 3 -> skipped.
    # Query 2 (id 2, cam 1): sorted g3 (id 3), g0 (id 1), g2 (id 1), g1 (id 2, cam 0: kept) -> hit at rank 4, AP = 1/4.
    d = np.array([
        [0.0, 0.1, 0.2, 0.3, 0.4],
        [0.5, 0.4, 0.3, 0.2, 0.1],
        [0.1, 0.3, 0.2, 0.0, 0.9],
    ])
    qp, qc = np.array([1, 3, 2]), np.array([0, 1, 1])
    gp, gc = np.array([1, 2, 1, 3, 1]), np.array([0, 0, 1, 1, 1])
    res = evaluate_ranking(d, qp, gp, qc, gc, max_rank=5)
    assert res["num_valid_queries"] == 2 and res["num_queries"] == 3
    assert res["mAP"] == pytest.approx((0.5 + 0.25) / 2, abs=1e-12)
    # first hits: query 0 at rank 2, query 2 at rank 4
    np.testing.assert_allclose(res["cmc"], [0.0, 0.5, 0.5, 1.0, 1.0])
    # mINP: query 0 last hit at rank 4 with 2 hits -> 0.5; query 2: 1 hit at rank 4 -> 0.25
    assert res["mINP"] == pytest.approx((0.5 + 0.25) / 2, abs=1e-12)


def test_ties_follow_stable_order():
    # All distances equal: a stable sort keeps gallery order, so the hit at gallery index 2 is at rank 3.
    d = np.zeros((1, 4))
    res = evaluate_ranking(d, np.array([1]), np.array([0, 0, 1, 0]), np.array([0]), np.array([1, 1, 1, 1]),
                           max_rank=4)
    assert res["mAP"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(res["cmc"], [0, 0, 1, 1])


def test_chunk_sizes_and_input_types_agree():
    rng = np.random.default_rng(3)
    d, qp, gp, qc, gc = random_problem(rng, 41, 150, 9, 2)
    results = [evaluate_ranking(d, qp, gp, qc, gc, chunk_size=cs) for cs in (1, 7, 41, None)]
    results.append(evaluate_ranking(torch.from_numpy(d).float(), torch.from_numpy(qp), torch.from_numpy(gp),
                                    torch.from_numpy(qc), torch.from_numpy(gc), chunk_size=5))
    for r in results[1:]:
        assert r["mAP"] == pytest.approx(results[0]["mAP"], abs=1e-9)
        np.testing.assert_array_equal(r["cmc"], results[0]["cmc"])
        assert r["num_valid_queries"] == results[0]["num_valid_queries"]
    half = evaluate_ranking(torch.from_numpy(d).bfloat16(), qp, gp, qc, gc)  # no NumPy bf16: converted
    assert 0.0 < half["mAP"] <= 1.0 and half["num_valid_queries"] == results[0]["num_valid_queries"]
    cmc = results[0]["cmc"]
    assert np.all(np.diff(cmc) >= 0) and 0.0 <= cmc[0] and cmc[-1] <= 1.0


def test_errors_are_actionable():
    d = np.random.default_rng(0).random((2, 3))
    with pytest.raises(ValueError, match="no valid gallery match|none of the 2 queries"):
        evaluate_ranking(d, np.array([1, 2]), np.array([3, 3, 3]), np.array([0, 0]), np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="g_pids has 2 entries"):
        evaluate_ranking(d, np.array([1, 2]), np.array([3, 3]), np.array([0, 0]), np.array([0, 0, 0]))
    d[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(d, np.array([1, 2]), np.array([1, 2, 3]), np.array([0, 0]), np.array([1, 1, 1]))


def test_evaluate_features_distance_and_top10():
    # Features on a circle: the squared Euclidean distance of unit vectors is 2 - 2 cos.
    rng = np.random.default_rng(5)
    n_ids, per = 6, 4
    pids = np.repeat(np.arange(n_ids), per)
    cams = np.tile(np.arange(per) % 2, n_ids)
    centres = torch.nn.functional.normalize(torch.randn(n_ids, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    feats = torch.nn.functional.normalize(centres[pids] + 0.3 * torch.from_numpy(rng.standard_normal((24, 16))).float(),
                                          dim=1)
    f = Features(feats=feats, pids=pids, camids=cams, sceneids=np.full(24, -1))
    res = evaluate_features(f, f, num_vis=3, top_k=10, return_distmat=True, chunk_size=5)
    d = res["distmat"]
    expected = ((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1).numpy()
    np.testing.assert_allclose(d, expected, atol=1e-5)
    ref = evaluate_ranking(d, pids, pids, cams, cams)
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
    # top10 rows: ranked valid gallery indices, never the removed same-id-same-camera entries (incl. itself)
    assert res["top10"].shape == (3, 10)
    for j, qi in enumerate(res["vis_queries"]):
        row = res["top10"][j]
        assert not np.any((pids[row] == pids[qi]) & (cams[row] == cams[qi]))
        assert np.all(np.diff(d[qi, row]) >= 0)


def test_memory_is_bounded_by_the_chunk():
    import tracemalloc

    rng = np.random.default_rng(7)
    d, qp, gp, qc, gc = random_problem(rng, 400, 5000, 40, 4)  # 16 MB of distances
    tracemalloc.start()
    small = evaluate_ranking(d, qp, gp, qc, gc, chunk_size=10)
    peak_small = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tracemalloc.start()
    whole = evaluate_ranking(d, qp, gp, qc, gc, chunk_size=400)
    peak_whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert small["mAP"] == whole["mAP"]
    assert peak_small < 2 * 10 * 5000 * 8 + 1_000_000  # one chunk's sorted copy plus per-query vectors
    assert peak_whole > 400 * 5000 * 8  # the single chunk holds a sorted copy of the whole matrix


def _records(tmp_path, dataset):
    from stmi.data.layouts import read_split
    from stmi.data.synth import make_synthetic

    root = make_synthetic(dataset, tmp_path / dataset, ids=6, images_per_id=3, seed=0)
    return read_split(dataset, root, "query"), read_split(dataset, root, "gallery")


@pytest.mark.parametrize("dataset", ["rgbnt201", "rgbnt100"])
def test_retrieval_picture_marks_correct_and_wrong(tmp_path, dataset):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from stmi.plots import plot_cmc, plot_retrieval

    query, gallery = _records(tmp_path, dataset)
    q = 0
    same = [i for i, g in enumerate(gallery) if g.pid == query[q].pid][:3]
    other = [i for i, g in enumerate(gallery) if g.pid != query[q].pid][:3]
    assert same and other
    red = np.array([214, 39, 40])  # matplotlib tab:red
    green = np.array([44, 160, 44])  # tab:green

    def count(path, colour):
        a = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(a - colour).sum(-1) <= 6).sum())

    good = plot_retrieval(query, gallery, np.array([same + [-1] * (10 - len(same))]), tmp_path / "good.png",
                          query_indices=[q])
    bad = plot_retrieval(query, gallery, np.array([other + [-1] * (10 - len(other))]), tmp_path / "bad.png",
                         query_indices=[q])
    assert count(good, green) > 10 * count(good, red) + 50
    assert count(bad, red) > 10 * count(bad, green) + 50
    cmc = plot_cmc(np.linspace(0.5, 1.0, 50), tmp_path / "cmc.png", title="val")
    assert Image.open(cmc).size[0] > 100
