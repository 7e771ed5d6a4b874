"""Triplets per second through the training pipeline (decode 3 JPEGs + mask, paired transforms, tokenise, collate).

Generates a synthetic RGBNT201 dataset (256x128 frames) in a temporary folder, then times the training DataLoader
(P x K sampler, training transforms, CLIP tokenizer) with 0, 1 and 2 worker processes. The first batch (worker
start-up) is excluded; the figure is steady-state throughput. For scale: IDEA reports ~163 triplets/s on one GPU
(0.39 s per batch of 64 in its paper), so the loader must deliver at least that per GPU.

    python benchmarks/data_loading.py [--ids 24] [--images-per-id 16] [--batches 20] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DataLoader  # noqa: E402

from stmi.data import RandomIdentitySampler, TripletDataset, load_dataset  # noqa: E402
from stmi.data.synth import make_synthetic  # noqa: E402


def measure(records: list, tokenizer, workers: int, batch_size: int, k: int, batches: int) -> float:  # noqa: ANN001
    """Steady-state triplets/s of the training loader, first batch excluded."""
    ds = TripletDataset(records, (256, 128), train=True, tokenizer=tokenizer)
    pids = {p: i for i, p in enumerate(sorted({t.pid for t in records}))}
    ds.relabel = pids
    sampler = RandomIdentitySampler([t.pid for t in records], batch_size, k, seed=0)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    n, seen, t0, epoch = 0, 0, 0.0, 0
    while n <= batches:
        sampler.set_epoch(epoch)
        for b in loader:
            if n == 0:
                t0 = time.perf_counter()
            else:
                seen += b["rgb"].shape[0]
            n += 1
            if n > batches:
                break
        epoch += 1
    return seen / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=24, help="synthetic identities (default 24)")
    p.add_argument("--images-per-id", type=int, default=16, help="triplets per identity (default 16)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="triplets per batch (default 32, K = 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default 0 1 2)")
    p.add_argument("--no-text", action="store_true", help="skip caption tokenisation")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads of the main process (default: torch's choice); with 0 workers the "
                        "batch collation runs there and contends with other processes for cores")
    args = p.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    tokenizer = None
    if not args.no_text:
        import open_clip

        tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = make_synthetic("rgbnt201", tmp, ids=args.ids, seed=0, images_per_id=args.images_per_id, cameras=3)
        gen = time.perf_counter() - t0
        records = load_dataset("rgbnt201", root).train
        print(f"synthetic rgbnt201: {len(records)} training triplets at 256x128 (generated in {gen:.1f} s); "
              f"batch {args.batch_size}, K 4, tokenizer {'off' if tokenizer is None else 'ViT-B-16'}, "
              f"main-process torch threads {__import__('torch').get_num_threads()}")
        print(f"{'workers':>8} {'triplets/s':>11} {'vs 0 workers':>13}")
        base = None
        for w in args.workers:
            r = measure(records, tokenizer, w, args.batch_size, 4, args.batches)
            base = base or r
            print(f"{w:>8} {r:>11.1f} {r / base:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
