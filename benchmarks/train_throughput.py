"""Throughput of the full STMI training step, data loading included, against the baseline model, on the best device.

One step = wait for the next P x K batch from the real training loader (``stmi.data.build_loaders`` over a synthetic
dataset written by ``stmi.data.synth``; ``--data memory`` replays one pre-loaded batch instead) and move it to the
device, forward + ``stmi_loss`` under bf16 autocast (CUDA), backward, Adam. Two models, stepped in interleaved
rounds so a load change on a shared machine hits both alike:

- ``stmi``: the full model (SFM + STR + CHI + global fusion, ``ModelConfig`` defaults);
- ``baseline``: ``use_sfm=False, use_str=False, fusion="concat"`` (paper table 3 A).

Reported per model: triplets per second (all ranks), the step split into data wait / forward / backward / optimizer
(the device is synchronised between phases; the split is of the median step), peak memory (CUDA: max allocated;
CPU: the process's peak RSS), model FLOPs per step (``torch.utils.flop_counter`` over one forward + backward) and
model FLOPs utilisation against the device's dense bf16 peak (A100 / H100 / H200 table, or ``--peak-tflops``; n/a
on a CPU). Targets (H100-class GPU): STMI >= 1,500 triplets/s in bf16 with data loading, >= 35 % MFU, STMI step
<= 1.15x the baseline step.

    python benchmarks/train_throughput.py                     # ViT-B/16 random init, 256x128, 72 = 9 x 8
    python benchmarks/train_throughput.py --compile --workers 8
    python benchmarks/train_throughput.py --tiny              # stmi-tiny smoke run (the test suite runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stmi.config import DataConfig, LossConfig, ModelConfig, OptimConfig, STMIConfig  # noqa: E402
from stmi.engine import build_optimizer, model_inputs  # noqa: E402
from stmi.losses import stmi_loss  # noqa: E402
from stmi.model.network import STMI, build_model, needs_find_unused_parameters  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "stmi": {},
    "baseline": dict(use_sfm=False, use_str=False, fusion="concat"),
}
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets; SXM parts; a PCIe H100 is 756: pass --peak-tflops)."""
PHASES = ("data", "forward", "backward", "optimizer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="stmi-tiny at 64x32, batch 8 = 4 x 2, 2+2 steps (smoke test)")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip config (random init; default ViT-B-16)")
    ap.add_argument("--image-size", default="256x128", help="H x W (default 256x128)")
    ap.add_argument("--batch", type=int, default=72, help="triplets per step over all ranks (default 72)")
    ap.add_argument("--instances", type=int, default=8, help="K of the P x K sampler (default 8: 9 x 8)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (compilation happens here)")
    ap.add_argument("--data", choices=("synth", "memory"), default="synth",
                    help="synth: the real loaders over a synthetic dataset (default); memory: one pre-loaded batch")
    ap.add_argument("--data-root", default="", help="existing dataset root for --data synth (default: write one in "
                    "a temporary folder)")
    ap.add_argument("--dataset", default="rgbnt201", help="dataset layout (default rgbnt201)")
    ap.add_argument("--loader-workers", type=int, default=-1,
                    help="DataLoader workers per rank (default: the node's CPUs / ranks, at most 8)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--workers", type=int, default=1, help="DDP ranks on this node (GPUs, or CPU processes)")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto (CUDA when present)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (bf16 autocast is the default there)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--sfm-kernel", default="auto", choices=("auto", "flex", "explicit"), help="model.sfm_kernel")
    ap.add_argument("--variants", default="stmi,baseline", help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: torch's default)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.image_size, args.batch, args.instances = "stmi-tiny", "64x32", 8, 2
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 2)
    args.variant_names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_names if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if args.batch % args.workers or (args.batch // args.workers) % args.instances:
        ap.error(f"--batch {args.batch} must split into {args.workers} ranks of whole identities of "
                 f"--instances {args.instances}")
    return args


def loader_workers(requested: int, ranks: int) -> int:
    """Loader workers per rank: ``requested``, or the node's CPUs shared by the ranks (one left for the trainer),
    capped at 8. The same formula suits the sweep's paper preset (data.num_workers from the node)."""
    if requested >= 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // ranks - 1))


def peak_tflops(device: torch.device, override: float) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def run_config(args: argparse.Namespace, root: str, variant: str) -> STMIConfig:
    h, w = (int(x) for x in args.image_size.lower().split("x"))
    model = ModelConfig(clip_model=args.model, pretrained=None, image_size=(h, w), sfm_kernel=args.sfm_kernel,
                        str_heads=4 if args.model == "stmi-tiny" else 8, **VARIANTS[variant])
    data = DataConfig(dataset=args.dataset, root=root, batch_size=args.batch, num_instances=args.instances,
                      num_workers=loader_workers(args.loader_workers, args.workers), val_fraction=0.0)
    return STMIConfig(model=model, loss=LossConfig(), data=data, optim=OptimConfig(lr=3.5e-6), recipe="benchmark")


def make_dataset(args: argparse.Namespace) -> str:
    """A synthetic dataset with enough training identities for P x K batches (written once, on rank 0)."""
    if args.data_root:
        return args.data_root
    from stmi.data.synth import make_synthetic

    p = args.batch // args.instances
    ids = int((2 * p) / 0.7) + 2  # ~70 % of the identities are training ones: 2 P of them
    out = Path(tempfile.mkdtemp(prefix="stmi-throughput-"))
    print(f"writing a synthetic {args.dataset} with {ids} identities x {max(args.instances, 8)} triplets to {out}",
          flush=True)
    make_synthetic(args.dataset, out, ids=ids, images_per_id=max(args.instances, 8), progress=False)
    return str(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model with its loader iterator and optimizer; :meth:`step` runs one timed training step."""

    def __init__(self, cfg: STMIConfig, device: torch.device, rank: int, world: int, args: argparse.Namespace) -> None:
        from stmi.data.loaders import build_loaders

        torch.manual_seed(0)
        probe = build_model(cfg.model)  # num_classes / cameras come from the data, as in training
        self.loaders = build_loaders(cfg, probe.tokenize, rank, world)
        mcfg = dataclasses.replace(cfg.model, num_classes=self.loaders.num_classes,
                                   num_cameras=self.loaders.num_cameras)
        torch.manual_seed(0)
        self.model: torch.nn.Module = build_model(mcfg).to(device).train()
        self.core: STMI = self.model  # type: ignore[assignment]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.device, self.loss_cfg = device, cfg.loss
        self.amp = device.type == "cuda" and not args.no_amp
        self.memory = args.data == "memory"
        self.epoch = 0
        self._it = self._new_iter()
        self._fixed = next(self._it) if self.memory else None
        self.flops = self._count_flops()  # before DDP wraps the model (its hooks expect a DDP forward)
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=needs_find_unused_parameters(mcfg))
        self.fwd = torch.compile(self.model) if args.compile else self.model

    def _new_iter(self):  # noqa: ANN202
        self.loaders.train_sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loaders.train)

    def _next(self) -> dict[str, Any]:
        if self._fixed is not None:
            return self._fixed
        try:
            return next(self._it)
        except StopIteration:
            self._it = self._new_iter()
            return next(self._it)

    def step(self) -> dict[str, float]:
        dev = self.device
        t0 = time.perf_counter()
        batch = self._next()
        imgs, kw = model_inputs(batch, dev)
        pids = torch.as_tensor(batch["pid"]).to(dev, dtype=torch.long)
        _sync(dev)
        t1 = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.fwd(*imgs, **kw)
            loss, _ = stmi_loss(out, pids, self.loss_cfg)
        _sync(dev)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(dev)
        t3 = time.perf_counter()
        self.optimizer.step()
        _sync(dev)
        t4 = time.perf_counter()
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(f"loss is {float(loss)}: the benchmark's step diverged")
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0,
                "triplets": float(imgs[0].shape[0])}

    def _count_flops(self) -> int:
        """Model FLOPs of one forward + backward on the next batch (eager, uncompiled: counted per aten op)."""
        from torch.utils.flop_counter import FlopCounterMode

        batch = self._next()
        imgs, kw = model_inputs(batch, self.device)
        pids = torch.as_tensor(batch["pid"]).to(self.device, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.core(*imgs, **kw)
            loss, _ = stmi_loss(out, pids, self.loss_cfg)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


def worker(rank: int, args: argparse.Namespace, root: str, port: int) -> dict[str, Any] | None:
    world = args.workers
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        runners = {}
        for v in args.variant_names:
            if rank == 0:
                print(f"  building {v} and counting its FLOPs (one forward + backward)", flush=True)
            runners[v] = Runner(run_config(args, root, v), device, rank, world, args)
        flops = {v: r.flops for v, r in runners.items()}
        times: dict[str, list[dict[str, float]]] = {v: [] for v in runners}
        names = list(runners)
        rounds = args.warmup + args.steps
        for i in range(rounds):
            order = names[i % len(names):] + names[: i % len(names)]
            for v in order:
                rec = runners[v].step()
                if i >= args.warmup:
                    times[v].append(rec)
            if rank == 0:
                print(f"  round {i + 1}/{rounds}" + (" (warm-up)" if i < args.warmup else ""), flush=True)
        mem = peak_memory(device)
        return {"times": times, "flops": flops, "device": device, "mem": mem, "world": world,
                "batch_rank": args.batch // world} if rank == 0 else None
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _spawned(rank: int, args: argparse.Namespace, root: str, port: int, out: str) -> None:
    res = worker(rank, args, root, port)
    if res is not None:
        res["device"] = str(res["device"])
        torch.save(res, out)


def report(args: argparse.Namespace, res: dict[str, Any]) -> None:
    device = torch.device(res["device"])
    peak = peak_tflops(device, args.peak_tflops)
    world = res["world"]
    print(f"\n{'model':<9} {'triplets/s':>11} {'step ms':>9} " + " ".join(f"{p + ' ms':>12}" for p in PHASES)
          + f" {'peak GiB':>9} {'GFLOP/step':>11} {'MFU':>7}")
    med: dict[str, float] = {}
    for v, recs in res["times"].items():
        step = statistics.median(r["total"] for r in recs)
        med[v] = step
        split = {p: statistics.median(r[p] for r in recs) for p in PHASES}
        tps = res["batch_rank"] * world / step
        flops = res["flops"][v] * world  # every rank runs the same model FLOPs
        mfu = "n/a" if peak is None else f"{flops / step / (peak * 1e12 * world) * 100:.1f}%"
        print(f"{v:<9} {tps:>11.1f} {step * 1e3:>9.1f} " + " ".join(f"{split[p] * 1e3:>12.1f}" for p in PHASES)
              + f" {res['mem']:>9.2f} {res['flops'][v] / 1e9:>11.1f} {mfu:>7}")
    if "stmi" in med:
        tps = res["batch_rank"] * world / med["stmi"]
        print(f"target >= 1500 triplets/s (one H100-class GPU, bf16, data included): "
              f"{'met' if tps >= 1500 else 'NOT met'} ({tps:.1f} on {world} x {device.type})")
        if peak is not None:
            mfu = res["flops"]["stmi"] / med["stmi"] / (peak * 1e12) * 100
            print(f"target MFU >= 35 %: {'met' if mfu >= 35 else 'NOT met'} ({mfu:.1f} %)")
        else:
            print("target MFU >= 35 %: n/a (no bf16 peak known for this device; pass --peak-tflops)")
    if "stmi" in med and "baseline" in med:
        ratio = med["stmi"] / med["baseline"]
        print(f"target STMI step <= 1.15x baseline: {'met' if ratio <= 1.15 else 'NOT met'} ({ratio:.3f}x)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and args.workers > torch.cuda.device_count():
        print(f"--workers {args.workers}: only {torch.cuda.device_count()} GPUs here", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name() if use_cuda else f"CPU ({torch.get_num_threads()} threads)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    h, w = args.image_size.split("x")
    print(f"train throughput: {args.model} {h}x{w}, batch {args.batch} = {args.batch // args.instances} x "
          f"{args.instances}, {args.workers} x {where}, {'bf16 autocast' if use_cuda and not args.no_amp else 'fp32'}"
          f", data {args.data}, loader workers/rank {loader_workers(args.loader_workers, args.workers)}"
          f"{', compiled' if args.compile else ''}, torch {torch.__version__}, load average {load:.2f}; "
          f"median of {args.steps} after {args.warmup} warm-up", flush=True)
    root = make_dataset(args)
    try:
        res = _run(args, root)
    finally:
        if not args.data_root:  # the synthetic dataset this run wrote
            shutil.rmtree(root, ignore_errors=True)
    report(args, res)
    return 0


def _run(args: argparse.Namespace, root: str) -> dict[str, Any]:
    if args.workers == 1:
        res = worker(0, args, root, 0)
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(Path(tempfile.mkdtemp(prefix="stmi-throughput-res-")) / "rank0.pt")
        mp.spawn(_spawned, args=(args, root, port, out), nprocs=args.workers, join=True)
        res = torch.load(out, weights_only=False)
        shutil.rmtree(Path(out).parent, ignore_errors=True)
    assert res is not None
    return res


if __name__ == "__main__":
    raise SystemExit(main())
