"""Benchmark: ``stmi.eval.evaluate_ranking`` against the reference codebases' evaluator.

The reference (DeMo / IDEA / TOP-ReID ``eval_func``) sorts the whole distance matrix with ``np.argsort`` and then
loops over queries in Python. It is written out below. Each method runs in its own subprocess so that its peak
memory is measured without the other's allocations: the peak of new NumPy allocations under ``tracemalloc`` (a
second, untimed pass) and the growth of ``ru_maxrss`` over the process's state after the inputs are built; the
metrics are returned as JSON and compared exactly.

Sizes: RGBNT100's real test size (1,715 queries x 8,575 gallery, 50 ids, 8 cameras) and 5,000 x 20,000. The
distances are random with a shift for matching identities, so the metrics are neither 0 nor 1.

Usage::

    python benchmarks/eval_ranking.py            # both sizes (about a minute on 2 CPU cores)
    python benchmarks/eval_ranking.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

SIZES = {"rgbnt100": (1715, 8575, 50, 8), "large": (5000, 20000, 500, 8)}
QUICK_SIZES = {"small": (300, 1500, 30, 4), "medium": (1000, 4000, 100, 8)}


def make_problem(nq: int, ng: int, nids: int, ncams: int, seed: int = 0):
    """Random float64 distances (built in place, no temporaries of the matrix size) with matching ids closer.

    float64, so that ties (which the reference's unstable quicksort breaks arbitrarily) practically never occur
    and the two methods must agree exactly.
    """
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, nids, nq), rng.integers(0, nids, ng)
    q_cams, g_cams = rng.integers(0, ncams, nq), rng.integers(0, ncams, ng)
    d = rng.random((nq, ng))
    for s in range(0, nq, 256):  # chunked so the boolean temporary stays small
        d[s:s + 256] -= 0.3 * (q_pids[s:s + 256, None] == g_pids[None, :])
    return d, q_pids, g_pids, q_cams, g_cams


def reference_eval_func(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The reference implementation (full argsort, then a per-query loop), as in the anchors' ``eval_func``."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    num_valid_q = 0
    for q_idx in range(num_q):
        q_pid, q_camid = q_pids[q_idx], q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        orig_cmc = matches[q_idx][keep]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1
        num_rel = orig_cmc.sum()
        tmp_cmc = orig_cmc.cumsum()
        tmp_cmc = tmp_cmc / (np.arange(len(tmp_cmc)) + 1.0)
        tmp_cmc = tmp_cmc * orig_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    all_cmc = np.asarray(all_cmc).astype(np.float64).sum(0) / num_valid_q
    return float(np.mean(all_ap)), all_cmc, num_valid_q


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(method: str, nq: int, ng: int, nids: int, ncams: int, chunk_size: int | None) -> dict:
    """Build the inputs, then time one method and measure its peak memory (run in a subprocess)."""
    from stmi.eval import evaluate_ranking

    d, qp, gp, qc, gc = make_problem(nq, ng, nids, ncams)
    if method == "stmi":  # warm-up on a tiny slice (torch kernel dispatch, lazy init), not timed
        evaluate_ranking(d[:4, :64], qp[:4], gp[:64], qc[:4], gc[:64])

    def run():
        if method == "reference":
            return reference_eval_func(d, qp, gp, qc, gc)
        r = evaluate_ranking(d, qp, gp, qc, gc, chunk_size=chunk_size)
        return r["mAP"], r["cmc"], r["num_valid_queries"]

    base = _maxrss_mb()
    t0 = time.perf_counter()
    m, cmc, nvalid = run()
    dt = time.perf_counter() - t0
    rss_growth = _maxrss_mb() - base
    # Second, untimed pass under tracemalloc (NumPy reports its buffers to it): the peak of new allocations.
    tracemalloc.start()
    run()
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"time_s": dt, "peak_growth_mb": rss_growth, "traced_peak_mb": traced_peak, "mAP": m,
            "cmc": list(map(float, cmc)), "num_valid": int(nvalid), "matrix_mb": d.nbytes / 2**20}


def run_in_subprocess(method: str, size: tuple[int, int, int, int], chunk_size: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, *map(str, size)]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    ap.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: automatic)")
    ap.add_argument("--worker", nargs=5, metavar=("METHOD", "NQ", "NG", "NIDS", "NCAMS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, *nums = args.worker
        print(json.dumps(worker(method, *map(int, nums), chunk_size=args.chunk_size)))
        return 0

    sizes = QUICK_SIZES if args.quick else SIZES
    print("evaluate_ranking vs reference (full argsort + per-query loop); both single-threaded NumPy")
    header = (f"{'size':>9} {'Q x G':>14} {'ref s':>8} {'stmi s':>8} {'speed-up':>9} {'ref MB':>7} {'stmi MB':>8} "
              f"{'|dmAP|':>9} {'|dCMC|':>9}")
    print(header)
    ok = True
    for name, size in sizes.items():
        ref = run_in_subprocess("reference", size, None)
        new = run_in_subprocess("stmi", size, args.chunk_size)
        dmap = abs(ref["mAP"] - new["mAP"])
        dcmc = float(np.max(np.abs(np.asarray(ref["cmc"]) - np.asarray(new["cmc"]))))
        agree = dmap <= 1e-9 and dcmc <= 1e-9 and ref["num_valid"] == new["num_valid"]
        ok &= agree
        print(f"{name:>9} {size[0]:>6} x {size[1]:<6} {ref['time_s']:8.2f} {new['time_s']:8.2f} "
              f"{ref['time_s'] / new['time_s']:8.1f}x {ref['traced_peak_mb']:7.0f} {new['traced_peak_mb']:8.1f} "
              f"{dmap:9.1e} {dcmc:9.1e}  (mAP {new['mAP']:.4f}, distmat {new['matrix_mb']:.0f} MB, "
              f"maxrss growth ref {ref['peak_growth_mb']:.0f} / stmi {new['peak_growth_mb']:.0f} MB"
              f"{'' if agree else ', DISAGREE'})")
    print("MB = peak of new NumPy allocations during scoring (tracemalloc); the inputs are not counted")
    print("metrics agree to 1e-9" if ok else "METRICS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
