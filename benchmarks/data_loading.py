"""Triplets per second through the training data path: today's per-item decode vs the decoded-frame cache.

Generates a synthetic RGBNT201 dataset (256x128 frames) in a temporary folder and times, side by side in one run,
the training DataLoader (P x K sampler, training augmentation, CLIP tokenizer) with 0, 1 and 2 worker processes:

- ``decode``: ``cfg.data.cache=false``, ``TripletDataset``: per item three JPEGs + a PNG decoded with PIL, the paired
  transform in NumPy (normalised float32 out), the caption tokenised, default collation;
- ``cache``: ``cfg.data.cache=true``, ``CachedTripletDataset``: whole batches copied from the memory-mapped frame
  cache with flip + pad/crop applied (uint8 out, erasing boxes drawn), captions tokenised once;
- ``cache+dev``: the same plus the device-side step (``prepare_batch``: uint8 -> float, CLIP normalisation, random
  erasing per modality) on the benchmark's device, in the consuming process: augmented batches ready for the model.

Settings are interleaved round by round (``--rounds``) and the best round is reported, so a burst of load from other
processes on a shared machine hits both paths alike; the load average is printed with each round. The first batch
(worker start-up) is excluded. Also printed: the one-off cache build (time, size, vs one epoch of the decode path)
and the device-side augmentation rate alone (on CUDA when a GPU is present: the benchmark runs there unchanged).

    python benchmarks/data_loading.py [--ids 24] [--images-per-id 16] [--seconds 3] [--rounds 2] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from stmi.data import RandomIdentitySampler, TripletDataset, load_dataset  # noqa: E402
from stmi.data.batch_transforms import prepare_batch  # noqa: E402
from stmi.data.cached_dataset import CachedTripletDataset, collate_batch  # noqa: E402
from stmi.data.frame_cache import ensure_cache  # noqa: E402
from stmi.data.synth import make_synthetic  # noqa: E402

SIZE = (256, 128)


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids`` (Linux ``/proc``; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(ds, records: list, workers: int, batch_size: int, k: int, seconds: float, min_batches: int,  # noqa: ANN001
            device: torch.device | None, cached: bool) -> tuple[float, float]:
    """(triplets per wall second, triplets per CPU second of this process + its loader workers), steady state
    (first batch excluded); ``device``: also run prepare_batch on every batch.

    The CPU-second figure is the per-core throughput, nearly independent of how loaded a shared machine is.
    """
    sampler = RandomIdentitySampler([t.pid for t in records], batch_size, k, seed=0)
    extra = {"collate_fn": collate_batch} if cached else {}
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device is not None and device.type == "cuda",
                        **extra)
    n, seen, t0, c0, epoch = 0, 0, 0.0, 0.0, 0
    pids: list[int] = []
    done = False
    while not done:
        sampler.set_epoch(epoch)
        for b in loader:
            if device is not None:
                b = prepare_batch(b, device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            if n == 0:
                it = getattr(loader, "_iterator", None)
                pids = [w.pid for w in getattr(it, "_workers", [])]
                t0, c0 = time.perf_counter(), time.process_time() + _proc_cpu(pids)
            else:
                seen += b["pid"].shape[0]
            n += 1
            if n > min_batches and time.perf_counter() - t0 >= seconds:
                done = True
                break
        epoch += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() + _proc_cpu(pids) - c0
    del loader
    return seen / wall, seen / cpu


def device_rate(ds: CachedTripletDataset, batch_size: int, device: torch.device, seconds: float) -> float:
    """Triplets/s of prepare_batch alone (uint8 batch already in host memory; includes the host-to-device copy)."""
    b = ds.__getitems__(list(range(batch_size)))
    if device.type == "cuda":
        b["frames"] = b["frames"].pin_memory()
    for _ in range(3):
        prepare_batch(b, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        prepare_batch(b, device)
        n += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=24, help="synthetic identities (default 24)")
    p.add_argument("--images-per-id", type=int, default=16, help="triplets per identity (default 16)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per setting and round (default 3)")
    p.add_argument("--min-batches", type=int, default=5, help="at least this many timed batches (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is reported (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="triplets per batch (default 32, K = 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default 0 1 2)")
    p.add_argument("--no-text", action="store_true", help="skip caption tokenisation")
    p.add_argument("--device", default=None, help="device of the device-side step (default: cuda if available)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads of the main process (default: torch's choice)")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    tokenizer = None
    if not args.no_text:
        import open_clip

        tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = make_synthetic("rgbnt201", Path(tmp) / "data", ids=args.ids, seed=0,
                              images_per_id=args.images_per_id, cameras=3)
        gen = time.perf_counter() - t0
        records = load_dataset("rgbnt201", root).train
        relabel = {p: i for i, p in enumerate(sorted({t.pid for t in records}))}
        print(f"synthetic rgbnt201: {len(records)} training triplets at {SIZE[0]}x{SIZE[1]} (generated in {gen:.1f} s);"
              " "
              f"batch {args.batch_size}, K 4, tokenizer {'off' if tokenizer is None else 'ViT-B-16'}; "
              f"{os.cpu_count()} CPUs, main-process torch threads {torch.get_num_threads()}; device: {device.type}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
        print(f"load average before: {_load()} (1/5/15 min)")

        t0 = time.perf_counter()
        cache = ensure_cache("rgbnt201", records, SIZE, Path(tmp) / "cache")
        build = time.perf_counter() - t0
        size_mb = (cache.path / "frames.npy").stat().st_size / 1e6

        decode_ds = TripletDataset(records, SIZE, train=True, tokenizer=tokenizer, relabel=relabel)
        cached_ds = CachedTripletDataset(cache, records, True, tokenizer, relabel=relabel)
        cols = ("decode", "cache", "cache+dev")
        rows = {w: {c: (0.0, 0.0) for c in cols} for w in args.workers}
        for r in range(args.rounds):
            for w in args.workers:
                common = (records, w, args.batch_size, 4, args.seconds, args.min_batches)
                for c, ds, dev in (("decode", decode_ds, None), ("cache", cached_ds, None),
                                   ("cache+dev", cached_ds, device)):
                    got = measure(ds, *common, device=dev, cached=c != "decode")
                    rows[w][c] = (max(rows[w][c][0], got[0]), max(rows[w][c][1], got[1]))
            print(f"round {r + 1}/{args.rounds} done, load average {_load()}", flush=True)

        print("\ntriplets/s (wall clock, best round) and triplets per CPU-second (this process + its workers: the "
              "per-core rate)")
        print(f"{'workers':>7} | {'decode':>7} {'cache':>7} {'ratio':>6} {'cache+dev':>9} {'ratio':>6} | "
              f"{'decode':>7} {'cache':>7} {'ratio':>6} {'cache+dev':>9} {'ratio':>6}   per CPU-s")
        for w in args.workers:
            line = f"{w:>7} |"
            for j in (0, 1):
                d, c, cd = (rows[w][col][j] for col in cols)
                line += f" {d:>7.0f} {c:>7.0f} {c / d:>5.1f}x {cd:>9.0f} {cd / d:>5.1f}x |"
            print(line)
        best_decode = max(rows[w]["decode"][0] for w in args.workers)
        epoch_s = len(records) / best_decode
        print(f"\ncache build: {build:.2f} s for {len(records)} triplets ({len(records) / build:.0f} triplets/s, "
              f"{len(os.sched_getaffinity(0))} threads), {size_mb:.1f} MB ({size_mb * 1e3 / len(records):.0f} KB "
              f"per triplet); one epoch of the decode path at its best wall-clock rate: {epoch_s:.2f} s "
              f"(build / epoch = {build / epoch_s:.2f})")
        dr = device_rate(cached_ds, args.batch_size, device, args.seconds)
        print(f"device-side augmentation (uint8 -> normalised + erased, host-to-device copy included) on "
              f"{device.type}: {dr:.0f} triplets/s")
        print(f"load average after: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
