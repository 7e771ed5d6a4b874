"""Does modality dropout make STMI robust to missing modalities? The missing-modality table on synthetic RGBNT201.

Trains the ``demo`` recipe's tiny model (``stmi-tiny-p8``, random init, 64x32 inputs) on synthetic RGBNT201 made by
``stmi.data.synth`` twice per seed, without modality dropout (``data.modality_dropout=0``, the paper recipe) and
with it (``--dropout``, each modality of a training triplet dropped with that probability, never all three), and
evaluates both on the test set with the missing-modality protocols of ``stmi.eval_missing``:

- the complete triplet (``RNT``);
- TOP-ReID's six settings: query and gallery both lack the same modalities (``NT`` = RGB missing, ... ``R`` = only
  RGB left), and their mean;
- with ``--protocol any2any`` or ``all``, MDReID's any-to-any grid (query and gallery each any non-empty subset).

Printed as mean +- std over the seeds, the two models side by side, with the difference. The model is the last
epoch's (no validation split here: every training identity trains). ``--absent zero`` evaluates the successors'
simulation instead (the absent frame zeroed and fed as present, no presence mask).

Pure PyTorch (``stmi.engine`` / ``stmi.data`` / ``stmi.eval_missing``), no Ray. Runs on CUDA unchanged
(``--device cuda``; the default picks CUDA when present) and prints the device and the wall time of every run.

Measured (2-core CPU, otherwise idle; hard data, 40 ids x 8 images, 4 cameras; 10 epochs of the demo recipe
(``stmi-tiny-p8``, lr 3e-3 since 2026-12-07); seeds 0-2; test mAP / R1 in percent, mean +- std; 83 s in all)::

    python benchmarks/missing_modalities.py --ids 40 --epochs 10 --seeds 3 --jobs 2 --threads 1
    | setting              | no dropout mAP | dropout mAP    | diff  | no dropout R1  | dropout R1     |
    |----------------------|----------------|----------------|-------|----------------|----------------|
    | complete RNT         | 71.7 +- 3.4    | 42.5 +- 6.8    | -29.2 | 69.8 +- 1.8    | 35.8 +- 10.2   |
    | TOP-ReID NT          | 25.6 +- 1.6    | 13.6 +- 3.3    | -11.9 | 13.5 +- 2.1    |  2.1 +- 1.8    |
    | TOP-ReID RT          | 62.1 +- 5.6    | 38.6 +- 4.9    | -23.5 | 53.8 +- 7.9    | 30.9 +- 8.4    |
    | TOP-ReID RN          | 78.9 +- 2.8    | 51.5 +- 6.4    | -27.4 | 83.3 +- 2.8    | 43.8 +- 11.0   |
    | TOP-ReID T           |  6.3 +- 0.3    |  7.1 +- 0.2    |  +0.9 |  0.0 +- 0.0    |  0.3 +- 0.6    |
    | TOP-ReID N           | 38.6 +- 1.9    | 18.5 +- 4.6    | -20.1 | 30.6 +- 5.2    |  7.3 +- 4.2    |
    | TOP-ReID R           | 72.3 +- 3.4    | 51.5 +- 5.5    | -20.8 | 76.0 +- 1.0    | 45.1 +- 5.7    |
    | TOP-ReID mean        | 47.3 +- 2.4    | 30.1 +- 4.0    | -17.1 | 42.9 +- 2.3    | 21.6 +- 4.7    |

At 10 epochs both models have learnt (the untrained model scores about 9 % on such data,
``benchmarks/ablation.py``), and modality dropout 0.3 is WORSE in every setting but TIR alone, by 12-29 points,
including the RGB-only and RGB+NIR settings it trains for. The synthetic TIR frame carries no identity (the warm
silhouette is the same for every identity, so TIR alone scores chance, 6.3 %): only RGB and NIR identify, and
dropout takes at least one of them from about half of the training samples. At the former lr 1e-3 the same held
(complete 60.4 +- 3.8 vs 34.7 +- 3.2), and at 30 epochs (``--ids 40 --epochs 30 --seeds 2``, 174 s, lr 1e-3) the gap
narrowed (complete 84.6 +- 0.5 vs 70.1 +- 3.0, TOP-ReID mean 56.4 +- 1.1 vs 46.1 +- 0.7) but dropout was still worse
in every setting but TIR alone, NIR alone included (51.0 vs 34.8), which only the dropout model ever trained on. So
it learns slower, and not only that. Not because of the presence mask: dropping only TIR
(``--set data.modality_dropout_scale=0,0,1``, 72 s) costs the complete triplet 3.9 points (67.8 +- 3.9), and about as
much (6.0 +- 8.2 points, 65.7) when the dropped frame is fed as zeros in training and test
(``--train-absent zero --absent zero``, 74 s), while the mask is what makes a partial query work (the model without
dropout: RGB+NIR 78.9 through the mask, 66.3 with a zero TIR frame). Dropout buys no robustness on this data: the
settings it trains for get no better (RN 73.2 vs 78.9 masked, 65.7 vs 66.3 as zero frames); docs/design.md has the
table. With 24 ids and 3 epochs (``--ids 24 --epochs 3``, 42 s, lr 1e-3) neither model learnt much (complete 16.5
+- 1.9 / 13.2 +- 0.7) and the differences were small.

Usage::

    python benchmarks/missing_modalities.py                        # 40 ids, 3 seeds, 4 epochs, dropout 0.3
    python benchmarks/missing_modalities.py --jobs 2               # two runs at a time
    python benchmarks/missing_modalities.py --protocol all --seeds 5 --epochs 10
    python benchmarks/missing_modalities.py --quick                # smoke test: 12 ids, 1 seed, 1 epoch
    python benchmarks/missing_modalities.py --train-absent zero --absent zero   # dropout as zero frames
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stmi.config import ConfigError, apply_overrides, parse_assignments  # noqa: E402
from stmi.data.synth import make_synthetic  # noqa: E402
from stmi.engine import prepare_run, train_one_epoch  # noqa: E402
from stmi.eval_missing import FeatureBank, Setting, evaluate_missing, evaluate_settings, missing_table  # noqa: E402
from stmi.recipes import recipe  # noqa: E402

VARIANTS = ("no dropout", "dropout")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ids", type=int, default=40, help="identities of the synthetic dataset (70%% train; default 40)")
    ap.add_argument("--images-per-id", type=int, default=8, help="triplets per identity (default 8)")
    ap.add_argument("--cameras", type=int, default=4, help="cameras (default 4, RGBNT201's count)")
    ap.add_argument("--difficulty", default="hard", choices=("hard", "easy"), help="synthetic data mode")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the dataset (default 0)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per model (default 3)")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs (default 4, the demo recipe's budget)")
    ap.add_argument("--dropout", type=float, default=0.3,
                    help="data.modality_dropout of the second model (default 0.3; the first has 0)")
    ap.add_argument("--protocol", default="topreid", choices=("topreid", "any2any", "all"),
                    help="which protocols to tabulate (default topreid: the complete triplet and TOP-ReID's six)")
    ap.add_argument("--absent", default="mask", choices=("mask", "zero"),
                    help="how an absent modality reaches the model at test: presence mask (default) or zero frame")
    ap.add_argument("--train-absent", default="mask", choices=("mask", "zero"),
                    help="how a dropped modality reaches the model in training: presence mask (default, the "
                         "platform's) or zero frame marked present")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="extra override of the demo recipe for both models (repeatable), e.g. model.p=0.0")
    ap.add_argument("--data", default=None, help="reuse/keep the dataset in this folder (default: a temp dir)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default, or 1 with "
                                                           "--jobs)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    ap.add_argument("--json", default=None, help="also write every run's numbers to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smoke test: 12 ids, 1 seed, 1 epoch")
    return ap.parse_args(argv)


class ZeroFramesInTraining(torch.nn.Module):
    """``--train-absent zero``: a training batch's dropped modalities reach the model as zero frames marked present
    (the successors' simulation), not through the presence mask. The wrapped model's parameters are the ones trained.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, rgb: torch.Tensor, nir: torch.Tensor, tir: torch.Tensor, presence: torch.Tensor | None = None,
                **kw: Any) -> Any:
        if presence is not None:
            p = presence.to(rgb.device)
            rgb, nir, tir = (x.masked_fill(~p[:, m].view(-1, 1, 1, 1), 0.0) for m, x in enumerate((rgb, nir, tir)))
        return self.model(rgb, nir, tir, **kw)


def run_one(root: Path, overrides: dict[str, Any], seed: int, epochs: int, device: str, protocol: str,
            absent: str, train_absent: str = "mask") -> dict[str, Any]:
    """Train one model for ``epochs`` and return ``{setting: {"mAP", "R1"}}`` of the test set, plus its time."""
    cfg = apply_overrides(recipe("demo", "rgbnt201"), {
        "data.root": str(root), "data.val_fraction": 0.0, "data.num_workers": 0, "optim.epochs": max(epochs, 1),
        "optim.seed": seed, **overrides})
    t0 = time.perf_counter()
    run = prepare_run(cfg, device=device)
    loss = float("nan")
    model = ZeroFramesInTraining(run.model) if train_absent == "zero" else run.model
    for epoch in range(epochs):
        loss = train_one_epoch(model, run.loaders.train, run.optimizer, run.scheduler, cfg.loss, device, epoch,
                               amp=cfg.optim.amp, progress=False,
                               modality_dropout=cfg.data.modality_dropout_rates())["loss"]
    bank = FeatureBank(run.core, run.loaders.query, run.loaders.gallery, device, absent=absent)
    res = evaluate_missing(run.core, run.loaders.query, run.loaders.gallery, device, missing=protocol,
                           use_scenes=run.loaders.uses_scenes, bank=bank)
    if "any2any" not in res:  # the complete triplet beside TOP-ReID's six (the any-to-any grid has it already)
        complete = Setting("any2any", "RNT_to_RNT", "RNT", "RNT")
        res = {"any2any": evaluate_settings(run.core, run.loaders.query, run.loaders.gallery, device, [complete],
                                            use_scenes=run.loaders.uses_scenes, bank=bank), **res}
    table = missing_table(res)
    rows = {f"{p}/{s}": {"mAP": m, "R1": r} for p, s, m, r in zip(table["protocol"], table["setting"], table["mAP"],
                                                                   table["R1"])}
    return {"rows": rows, "loss": loss, "time_s": time.perf_counter() - t0}


def _ms(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:4.1f} +- {100 * s:3.1f}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.quick:
        a.ids, a.seeds, a.epochs = 12, 1, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        extra = parse_assignments(a.set)
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    tmp = None
    if a.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="stmi-missing-")
        root = Path(tmp.name)
    else:
        root = Path(a.data)
    t0 = time.perf_counter()
    make_synthetic("rgbnt201", root, ids=a.ids, seed=a.data_seed, images_per_id=a.images_per_id, cameras=a.cameras,
                   difficulty=a.difficulty)
    print(f"device {a.device} ({torch.get_num_threads()} threads), torch {torch.__version__}; synthetic RGBNT201 "
          f"({a.difficulty}): {a.ids} ids x {a.images_per_id} images, {a.cameras} cameras, data seed {a.data_seed}, "
          f"made in {time.perf_counter() - t0:.1f} s; demo recipe, {a.epochs} epochs, seeds 0..{a.seeds - 1}; "
          f"modality dropout 0 vs {a.dropout}; protocol {a.protocol}, absent modalities as {a.absent} at test, "
          f"dropped ones as {a.train_absent} in training"
          + (f"; overrides {extra}" if extra else ""), flush=True)
    seeds = list(range(a.seeds))
    plan = {"no dropout": {**extra, "data.modality_dropout": 0.0},
            "dropout": {**extra, "data.modality_dropout": a.dropout}}
    tasks = [(name, ov, seed) for name, ov in plan.items() for seed in seeds]
    done: dict[tuple[str, int], dict[str, Any]] = {}

    def show(name: str, seed: int, r: dict[str, Any]) -> None:
        done[(name, seed)] = r
        complete = r["rows"].get("any2any/RNT_to_RNT", {}).get("mAP", float("nan"))
        mean = r["rows"].get("topreid/mean", {}).get("mAP", float("nan"))
        print(f"  [{len(done)}/{len(tasks)}] {name:<10} seed {seed}: complete mAP {complete:.3f}, TOP-ReID mean "
              f"{mean:.3f}, loss {r['loss']:.3f} ({r['time_s']:.1f} s)", flush=True)

    args = (a.epochs, a.device, a.protocol, a.absent, a.train_absent)
    if a.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                    initargs=(a.threads or 1,)) as pool:
            futs = {pool.submit(run_one, root, ov, seed, *args): (name, seed) for name, ov, seed in tasks}
            for f in cf.as_completed(futs):
                show(*futs[f], f.result())
    else:
        for name, ov, seed in tasks:
            show(name, seed, run_one(root, ov, seed, *args))

    settings = list(done[(VARIANTS[0], 0)]["rows"])
    cols = ["setting", "no dropout mAP", "dropout mAP", "diff", "no dropout R1", "dropout R1"]
    widths = [20, 14, 14, 5, 14, 14]
    print()
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for key in settings:
        vals = {v: [done[(v, s)]["rows"][key] for s in seeds] for v in VARIANTS}
        diff = statistics.fmean(r["mAP"] for r in vals["dropout"]) - statistics.fmean(
            r["mAP"] for r in vals["no dropout"])
        label = key.replace("any2any/RNT_to_RNT", "complete RNT").replace("topreid/", "TOP-ReID ").replace(
            "any2any/", "")
        print(f"| {label:<20} | {_ms([r['mAP'] for r in vals['no dropout']]):<14} | "
              f"{_ms([r['mAP'] for r in vals['dropout']]):<14} | {100 * diff:+5.1f} | "
              f"{_ms([r['R1'] for r in vals['no dropout']]):<14} | {_ms([r['R1'] for r in vals['dropout']]):<14} |")
    print("(percent; TOP-ReID X: query and gallery both carry only the modalities X, R = RGB, N = NIR, T = TIR; "
          "mean +- sample std over the seeds)")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": {f"{k[0]}/seed{k[1]}": v for k, v in
                                                                       done.items()}}, indent=1), encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
