"""Can the validation split tell two configurations apart at the demo budget, or is the gap seed noise?

Trains two configurations of the ``demo`` recipe (``stmi-tiny-p8``, random init) on synthetic data made as the demo
makes it (``orchestration.demo_data``: hard data, 10 images per identity, data seed 0) with several training seeds,
and prints per dataset, identity count and ``data.val_fraction`` the best validation mAP (what a sweep ranks trials
by) and the test mAP of each as mean +- std over the seeds, and the gap between them in units of the larger std.
A seed changes the model init, the batch order and which training identities are held out for validation, as it does
in a sweep's confirmation (``sweep.py --confirm-top``).

- ``A``: the recipe's point (the demo sweep's first trial);
- ``B``: ``--b FIELD=VALUE`` overrides of it; default: the second trial the demo sweep drew (Optuna's TPE, seed 0:
  alpha 0.0155, beta 0.708, p 0.172, tau 0.348, K 1, lr 2.2e-4).

Both train the full ``--epochs`` (the demo sweep's ASHA stopped B after its first epoch: this measures the two at an
equal budget). Pure PyTorch (``stmi.engine``), no Ray or MLflow; runs on CUDA unchanged (``--device cuda``; the default
picks CUDA when present) and prints the device.

Measured (2-core CPU, otherwise idle; 3 epochs; val / test mAP mean +- std; gap = (A - B) / larger val std):

    python benchmarks/selection_noise.py --seeds 5                         # rgbnt201, 148 s
      20 ids, val 0.20 (3 val ids):  A 0.500 +- 0.123 / 0.277   B 0.534 +- 0.131 / 0.325   gap -0.25
      20 ids, val 0.35 (5 val ids):  A 0.349 +- 0.117 / 0.260   B 0.337 +- 0.120 / 0.289   gap +0.10
      40 ids, val 0.20 (6 val ids):  A 0.310 +- 0.088 / 0.258   B 0.357 +- 0.093 / 0.298   gap -0.51
      40 ids, val 0.35 (10 val ids): A 0.193 +- 0.028 / 0.221   B 0.243 +- 0.032 / 0.277   gap -1.56
    python benchmarks/selection_noise.py --datasets rgbnt100,msvr310 --ids 40 --seeds 4   # 149 s
      rgbnt100 40 ids, val 0.20: A 0.406 +- 0.079 / 0.272   B 0.462 +- 0.061 / 0.330   gap -0.71
      rgbnt100 40 ids, val 0.35: A 0.248 +- 0.023 / 0.279   B 0.279 +- 0.024 / 0.305   gap -1.28
      msvr310  40 ids, val 0.20: A 0.492 +- 0.098 / 0.374   B 0.555 +- 0.048 / 0.414   gap -0.65
      msvr310  40 ids, val 0.35: A 0.344 +- 0.047 / 0.375   B 0.380 +- 0.032 / 0.395   gap -0.76

What it shows: with 20 identities (the demo's until 2026-12-02) the validation split holds 3 identities (9 queries),
a seed moves the validation mAP by +- 0.12, and the two configurations cannot be told apart. 40 identities with a
35 % split (10 validation identities) bring the seed std to 0.02-0.05; B is then ahead on all three datasets, on
validation and on test, by 0.8-1.6 std. So the demo now makes 40 identities and the demo recipe holds out 35 %.

The learning rate (B = the recipe with only ``optim.lr`` changed, 3 seeds):

    python benchmarks/selection_noise.py --datasets rgbnt201 --ids 40 --val-fraction 0.35 --seeds 3 --b optim.lr=0.003
      rgbnt201 lr 3e-3: A 0.210 +- 0.016 / 0.240   B 0.355 +- 0.031 / 0.345   gap -4.72   (43 s)
    ... --b optim.lr=0.0001
      rgbnt201 lr 1e-4: A 0.210 +- 0.016 / 0.240   B 0.101 +- 0.006 / 0.103   gap +6.77   (44 s)
    python benchmarks/selection_noise.py --datasets rgbnt100,msvr310 --ids 40 --val-fraction 0.35 --seeds 3 \
        --b optim.lr=0.003                                                                   # 76 s
      rgbnt100 lr 3e-3: A 0.245 +- 0.027 / 0.293   B 0.304 +- 0.013 / 0.363   gap -2.17
      msvr310  lr 3e-3: A 0.326 +- 0.036 / 0.384   B 0.420 +- 0.024 / 0.427   gap -2.65

The learning rate alone, 3x up or 10x down from the recipe's, moves the validation mAP by 2-7 seed stds (B's
lower lr, 2.2e-4, with its other five values is ahead instead: those matter too). ``benchmarks/ablation.py`` is
where the synthetic data tells models apart (SFM against the baseline: 2-5 std).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

B_DEFAULT = {"model.alpha_init": 0.0155274, "model.beta_init": 0.707958, "model.p": 0.171787, "model.tau": 0.348382,
             "model.K": 1, "optim.lr": 0.000222845}
"""The demo sweep's second trial on RGBNT201 (Optuna TPE, seed 0)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--datasets", default="rgbnt201", help="comma-separated: rgbnt201, rgbnt100, msvr310")
    ap.add_argument("--ids", default="20,40",
                    help="identity counts of the synthetic data (default 20,40; the demo: 40)")
    ap.add_argument("--val-fraction", default="0.2,0.35",
                    help="data.val_fraction values (default 0.2,0.35; the demo recipe's: 0.35)")
    ap.add_argument("--seeds", type=int, default=4, help="training seeds per configuration (default 4)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (default 3, the demo sweep's budget)")
    ap.add_argument("--b", action="append", default=[], metavar="FIELD=VALUE",
                    help="configuration B as overrides of the recipe (repeatable); default: the demo's second trial")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel processes, 1 torch thread each (default 2)")
    ap.add_argument("--json", default=None, help="also write every run's numbers to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smoke test: 12 ids, 2 seeds, 1 epoch, rgbnt201")
    return ap.parse_args(argv)


def _value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def run_one(dataset: str, root: str, val_fraction: float, overrides: dict[str, Any], seed: int, epochs: int,
            device: str) -> dict[str, float]:
    """One run of the demo recipe with ``overrides``: its best validation mAP and the selected weights' test mAP."""
    import logging
    import warnings

    from stmi import engine
    from stmi.config import apply_overrides
    from stmi.recipes import recipe

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    cfg = apply_overrides(recipe("demo", dataset), {"data.root": root, "data.val_fraction": val_fraction,
                                                     "optim.seed": seed, "optim.epochs": epochs, **overrides})
    t0 = time.perf_counter()
    run = engine.prepare_run(cfg, device=device)
    n_val = len({t.pid for t in run.loaders.val_query_records})
    state = engine.fit(run, progress=False)
    return {"val_mAP": state.best["val_mAP"], "test_mAP": state.history[-1]["test_mAP"], "val_ids": n_val,
            "time_s": time.perf_counter() - t0}


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.quick:
        a.datasets, a.ids, a.val_fraction, a.seeds, a.epochs = "rgbnt201", "12", "0.35", 2, 1
    from orchestration.demo_data import DEMO_IMAGES_PER_ID
    from stmi.config import DATASETS
    from stmi.data.synth import make_synthetic

    datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        print(f"error: unknown dataset(s) {bad}; choose from {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    ids = [int(x) for x in a.ids.split(",")]
    fractions = [float(x) for x in a.val_fraction.split(",")]
    bad_b = [item for item in a.b if "=" not in item]
    if bad_b:
        print(f"error: --b {bad_b[0]!r}: expected FIELD=VALUE, e.g. optim.lr=3e-4", file=sys.stderr)
        return 2
    b = B_DEFAULT if not a.b else {k: _value(v) for k, v in (item.split("=", 1) for item in a.b)}
    configs = {"A": {}, "B": b}
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="stmi-selection-noise-")
    roots = {}
    for d in datasets:
        for n in ids:
            roots[(d, n)] = str(make_synthetic(d, Path(tmp.name) / f"{d}-{n}", ids=n, seed=0,
                                               images_per_id=DEMO_IMAGES_PER_ID))
    print(f"device {a.device}, torch {torch.__version__}; demo recipe, {a.epochs} epochs, seeds "
          f"1111..{1110 + a.seeds}; B = {b}; data made in {time.perf_counter() - t0:.0f} s", flush=True)
    tasks = [(d, n, f, c, s) for d in datasets for n in ids for f in fractions for c in configs
             for s in range(1111, 1111 + a.seeds)]
    done: dict[tuple, dict[str, float]] = {}
    with cf.ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
        futs = {pool.submit(run_one, d, roots[(d, n)], f, configs[c], s, a.epochs, a.device): (d, n, f, c, s)
                for d, n, f, c, s in tasks}
        for fut in cf.as_completed(futs):
            key = futs[fut]
            done[key] = r = fut.result()
            print(f"  [{len(done)}/{len(tasks)}] {key[0]} {key[1]} ids val {key[2]} {key[3]} seed {key[4]}: "
                  f"val mAP {r['val_mAP']:.3f} test mAP {r['test_mAP']:.3f} ({r['time_s']:.1f} s)", flush=True)
    print()
    print("| dataset  | ids | val fraction | val ids | A val mAP       | B val mAP       | A test | B test "
          "| gap / std |")
    print("|----------|-----|--------------|---------|-----------------|-----------------|--------|--------"
          "|-----------|")
    for d in datasets:
        for n in ids:
            for f in fractions:
                runs = {c: [done[(d, n, f, c, s)] for s in range(1111, 1111 + a.seeds)] for c in configs}
                val = {c: [r["val_mAP"] for r in rs] for c, rs in runs.items()}
                test = {c: statistics.fmean(r["test_mAP"] for r in rs) for c, rs in runs.items()}
                sd = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in val.values())
                gap = (statistics.fmean(val["A"]) - statistics.fmean(val["B"])) / sd if sd else float("nan")
                vids = statistics.fmean(r["val_ids"] for r in runs["A"])
                print(f"| {d:<8} | {n:>3} | {f:>12.2f} | {vids:>7.1f} | {_ms(val['A']):<15} | {_ms(val['B']):<15} | "
                      f"{test['A']:.3f}  | {test['B']:.3f}  | {gap:>+9.2f} |")
    print("(gap / std: A's mean validation mAP minus B's, in units of the larger of their seed standard deviations; "
          "|gap| > 2 is a difference a sweep can see)")
    if a.json:
        Path(a.json).write_text(json.dumps([{"dataset": k[0], "ids": k[1], "val_fraction": k[2], "config": k[3],
                                             "seed": k[4], **v} for k, v in done.items()], indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
