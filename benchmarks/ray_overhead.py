"""Cost of running an STMI epoch under Ray Train (one worker) against the same epoch in a plain loop.

Both sides train the demo recipe (``stmi-tiny``) on the same synthetic RGBNT201, with the same seed, config, number
of steps, torch thread count and DataLoader workers (the recipe's 0):

- ``plain``: this process calls what :func:`orchestration.train.train_fn_per_worker` calls,
  :func:`stmi.engine.prepare_run` and :func:`stmi.engine.fit`, without its Ray and MLflow callbacks. It runs once
  before and once after the Ray run and the epoch figures pool both, so a load change on a shared machine shows
  (and averages out).
- ``ray``: :func:`orchestration.train.fit` with ``workers=1`` on a local Ray started here (local storage, no S3, no
  MLflow), i.e. OUR worker function on a ``TorchTrainer``: per epoch it also writes a checkpoint through Ray's
  storage and reports. On both sides evaluation is set to the last epoch only (``optim.eval_every = epochs``) so it
  is not in the epochs being compared.

Figures (epochs 2..N, i.e. without the first epoch's warm-up, median):

- epoch time: ``train_one_epoch``'s own ``time_s`` on both sides (Ray's comes back as the ``train_time_s``
  metric), so the ratio is the cost of running the same loop inside a Ray worker. Target: <= 1.10x.
- epoch period under Ray: the time between two consecutive reports seen by the Ray Train controller (a
  ``UserCallback`` writes their wall-clock times to a file), i.e. the epoch plus checkpoint + report.
- worker-group start: from the ``fit()`` call to the start of the first epoch, estimated as the first report's
  time minus epoch 0's ``train_time_s`` minus the median per-epoch checkpoint + report cost (period - epoch time).
  It includes the Train controller and worker actors starting, the worker importing torch/open_clip, the gloo
  process group and the worker's own set-up (tokenizer, loaders, model), which the plain set-up line shows alone.
- total: ``fit()`` wall-clock against the plain loop's set-up + epochs + final evaluation.

Threads: Ray sets ``OMP_NUM_THREADS`` to a worker's CPU count when the variable is unset; this benchmark sets it
(``--threads``, default 1) before ``ray.init`` so the workers inherit it, calls ``torch.set_num_threads`` with the
same value here, and checks the value an actor with the worker's CPUs sees.

Usage::

    python benchmarks/ray_overhead.py                  # 6 epochs, 40 synthetic identities
    python benchmarks/ray_overhead.py --epochs 8 --ids 60 --threads 2
    python benchmarks/ray_overhead.py --quick          # 3 epochs, 20 identities: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stmi.config import STMIConfig, apply_overrides  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6, help="epochs per side (>= 3: epochs 2..N are compared)")
    ap.add_argument("--ids", type=int, default=40, help="synthetic RGBNT201 identities (about 70%% train)")
    ap.add_argument("--images-per-id", type=int, default=10, help="triplets per identity")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on both sides (OMP_NUM_THREADS of the Ray worker); also its CPUs")
    ap.add_argument("--quick", action="store_true", help="3 epochs on 20 identities (smoke test)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (data, Ray storage) and print it")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.ids = 3, 20
    if args.epochs < 3:
        ap.error("--epochs must be >= 3 (epoch 1 is warm-up; the median is over epochs 2..N and needs two)")
    return args


def bench_config(root: Path, epochs: int) -> STMIConfig:
    """The demo recipe on ``root`` for ``epochs`` epochs, validating only after the last one."""
    from stmi.recipes import recipe

    return apply_overrides(recipe("demo", "rgbnt201"), {
        "data.root": str(root), "optim.epochs": epochs, "optim.eval_every": epochs})


def plain_loop(cfg: STMIConfig) -> dict[str, Any]:
    """The worker's training without Ray: the same :func:`stmi.engine.prepare_run` and :func:`stmi.engine.fit`
    (same seed, build order, epochs, validation and final test), with no checkpoint, report or MLflow callback."""
    from stmi.engine import Callback, fit, prepare_run

    class Collect(Callback):
        def __init__(self) -> None:
            self.epochs: list[dict[str, Any]] = []

        def on_epoch_end(self, run: Any, end: Any) -> None:
            self.epochs.append(end.metrics)

    t0 = time.perf_counter()
    run = prepare_run(cfg, device=torch.device("cpu"))
    setup = time.perf_counter() - t0
    collect = Collect()
    fit(run, callbacks=[collect], progress=False)
    end = time.perf_counter()
    epochs = [{"time_s": float(m["train_time_s"]), "steps": float(m["train_steps"])} for m in collect.epochs]
    return {"setup_s": setup, "epochs": epochs, "total_s": end - t0, "test_mAP": collect.epochs[-1]["test_mAP"]}


def _report_times_callback(path: Path) -> Any:
    """A Ray Train ``UserCallback`` that appends the wall-clock time and epoch metrics of every report to ``path``.

    It runs in the Train controller (another process), so it hands them over through a file; ``Result`` itself only
    keeps the metrics of the checkpoints it keeps (one here).
    """
    from ray.train.v2.api.callback import UserCallback

    class ReportTimes(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            with open(path, "a") as f:
                m = metrics[0]  # rank 0's report
                f.write(json.dumps({"t": time.time(), "epoch": m.get("epoch"), "train_time_s": m.get("train_time_s"),
                                    "train_steps": m.get("train_steps"), "test_mAP": m.get("test_mAP")}) + "\n")

    return ReportTimes()


def worker_threads(cpus: float) -> int:
    """torch's thread count in a Ray actor holding ``cpus`` CPUs (what a Train worker with them gets)."""
    import ray

    @ray.remote(num_cpus=cpus)
    def threads() -> int:
        import torch as t

        return t.get_num_threads()

    return int(ray.get(threads.remote()))


def ray_run(cfg: STMIConfig, tmp: Path, cpus: float) -> dict[str, Any]:
    """``fit()`` with one worker; per-epoch metrics, report times and wall-clock."""
    from orchestration.train import fit

    times_file = tmp / "report_times.jsonl"
    t_fit = time.time()
    result = fit(cfg, "ray-overhead", settings=None, run_id=None, workers=1, cpus_per_worker=cpus, max_failures=0,
                 callbacks=[_report_times_callback(times_file)], local_storage=str(tmp / "ray_storage"))
    t_end = time.time()
    if result.error is not None:
        raise RuntimeError(f"the Ray run failed: {result.error}")
    rows = [json.loads(line) for line in times_file.read_text().splitlines()]
    return {"t_fit": t_fit, "t_end": t_end, "epochs": rows, "reports": [r["t"] for r in rows],
            "test_mAP": float(rows[-1]["test_mAP"] if rows and rows[-1]["test_mAP"] is not None else float("nan"))}


def summarize(plain: dict[str, Any], plain_after: dict[str, Any], ray_res: dict[str, Any]) -> dict[str, float]:
    """The figures of the table (see the module docstring); plain epochs pool the runs before and after Ray."""
    before = [e["time_s"] for e in plain["epochs"]][1:]
    after = [e["time_s"] for e in plain_after["epochs"]][1:]
    p_ep = before + after
    r_ep = [float(e["train_time_s"]) for e in ray_res["epochs"]]
    rep = ray_res["reports"]
    periods = [b - a for a, b in zip(rep[:-1], rep[1:])]  # period k = epoch k+1 + its checkpoint/report
    # the last epoch also evaluates and tests: keep it out of the per-epoch periods
    steady = periods[:-1] if len(periods) > 1 else periods
    post = statistics.median([per - r_ep[i + 1] for i, per in enumerate(steady)])
    start = rep[0] - ray_res["t_fit"] - r_ep[0] - post
    return {
        "plain_epoch": statistics.median(p_ep), "ray_epoch": statistics.median(r_ep[1:]),
        "plain_epoch_min": min(p_ep), "ray_epoch_min": min(r_ep[1:]),
        "plain_before": statistics.median(before), "plain_after": statistics.median(after),
        "ray_period": statistics.median(steady), "post": post, "start": start,
        "plain_setup": plain["setup_s"], "plain_total": plain["total_s"],
        "ray_total": ray_res["t_end"] - ray_res["t_fit"],
        "steps": plain["epochs"][0]["steps"], "ray_steps": float(ray_res["epochs"][0]["train_steps"]),
    }


def print_table(s: dict[str, float], threads: int, ray_threads: int, init_s: float) -> None:
    print(f"\n{'':34s}{'plain':>10s}{'ray (1 worker)':>16s}{'ratio':>8s}")
    print(f"{'epoch time, median 2..N (s)':34s}{s['plain_epoch']:10.3f}{s['ray_epoch']:16.3f}"
          f"{s['ray_epoch'] / s['plain_epoch']:8.3f}x   target <= 1.10x")
    print(f"{'  plain before / after ray (s)':34s}{s['plain_before']:10.3f}{s['plain_after']:10.3f}"
          f"{'':14s}(load drift check)")
    print(f"{'epoch time, min 2..N (s)':34s}{s['plain_epoch_min']:10.3f}{s['ray_epoch_min']:16.3f}"
          f"{s['ray_epoch_min'] / s['plain_epoch_min']:8.3f}x")
    print(f"{'epoch period incl. ckpt+report (s)':34s}{s['plain_epoch']:10.3f}{s['ray_period']:16.3f}"
          f"{s['ray_period'] / s['plain_epoch']:8.3f}x")
    print(f"{'  of which checkpoint + report (s)':34s}{'-':>10s}{s['post']:16.3f}")
    print(f"{'set-up / worker-group start (s)':34s}{s['plain_setup']:10.3f}{s['start']:16.3f}"
          f"{'':8s}   ray: fit() call -> first epoch starts")
    print(f"{'total wall-clock (s)':34s}{s['plain_total']:10.3f}{s['ray_total']:16.3f}"
          f"{s['ray_total'] / s['plain_total']:8.3f}x   ray: fit() only")
    print("\nplain: median of epochs 2..N of a run before and one after the Ray run; set-up and total: the first run")
    print(f"steps per epoch: plain {s['steps']:.0f}, ray {s['ray_steps']:.0f}; torch threads: plain {threads}, "
          f"ray worker {ray_threads}; ray.init {init_s:.1f} s (not in the totals); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray >= 2.59 would otherwise enable token auth and write ~/.ray
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the Ray workers started below
    torch.set_num_threads(args.threads)
    from stmi.data.synth import make_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="rayov-", dir="/tmp"))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        make_synthetic("rgbnt201", tmp / "data", args.ids, seed=0, images_per_id=args.images_per_id)
        cfg = bench_config(tmp / "data", args.epochs)
        print(f"plain loop: {args.epochs} epochs ...", flush=True)
        plain = plain_loop(cfg)
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp / "r"), log_to_driver=False)
        init_s = time.perf_counter() - t0
        try:
            ray_threads = worker_threads(args.threads)
            print(f"ray: {args.epochs} epochs ...", flush=True)
            ray_res = ray_run(cfg, tmp, float(args.threads))
        finally:
            ray.shutdown()
        print(f"plain loop again: {args.epochs} epochs ...", flush=True)
        plain_after = plain_loop(cfg)
        if len(ray_res["reports"]) != args.epochs:
            raise RuntimeError(f"expected {args.epochs} reports from the Ray run, got {len(ray_res['reports'])}")
        s = summarize(plain, plain_after, ray_res)
        print_table(s, args.threads, ray_threads, init_s)
        print(f"test mAP after training: plain {plain['test_mAP']:.4f}, ray {ray_res['test_mAP']:.4f} "
              f"(same seed and steps: they should agree closely)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
