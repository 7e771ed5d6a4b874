"""Cost of STMI's additions on one training step, side by side with the baseline (SPEC 2, paper table 3).

Three models share the same backbone config and batch; one step = forward + ``stmi_loss`` + backward + Adam:

- ``baseline``: ``use_sfm=False, use_str=False, fusion="concat"`` (table 3 A, concatenated CLS tokens);
- ``sfm``: the baseline plus SFM (table 3 B);
- ``full``: SFM + STR + CHI + global fusion (table 3 D).

Real shapes by default: ``ViT-B-16`` (random init, no weights needed), 256x128, ``--batch`` triplets (default 4,
P x K with K = 2), on the CPU. Median of ``--steps`` timed steps after ``--warmup``; the ratios come
from one run, so they are comparable even when the machine is shared. Target: full <= 1.25 x baseline.

Usage::

    python benchmarks/train_step.py                 # ViT-B-16, 256x128, 4 triplets
    python benchmarks/train_step.py --batch 8
    python benchmarks/train_step.py --quick         # stmi-tiny smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stmi.config import LossConfig, ModelConfig  # noqa: E402
from stmi.losses import stmi_loss  # noqa: E402
from stmi.model.stmi import build_model  # noqa: E402

VARIANTS = {
    "baseline": dict(use_sfm=False, use_str=False, fusion="concat"),
    "sfm": dict(use_sfm=True, use_str=False, fusion="concat"),
    "full": dict(use_sfm=True, use_str=True, fusion="chi"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="triplets per step (even: P x 2 identities)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    ap.add_argument("--quick", action="store_true", help="stmi-tiny at 64x32 for a smoke test")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--variants", default="baseline,sfm,full", help="comma-separated subset of " + ",".join(VARIANTS))
    return ap.parse_args(argv)


def make_batch(b: int, h: int, w: int, num_classes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, 1, h, w)
    mask[:, :, h // 8 : 7 * h // 8, w // 4 : 3 * w // 4] = 1.0
    return {
        "rgb": torch.randn(b, 3, h, w, generator=g),
        "nir": torch.randn(b, 3, h, w, generator=g),
        "tir": torch.randn(b, 3, h, w, generator=g),
        "mask": mask,
        "camid": torch.arange(b) % 2,
        "pids": (torch.arange(b) // 2) % num_classes,
    }


def time_variant(cfg: ModelConfig, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> float:
    """Median seconds of one full training step."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    text = model.tokenize(["a person walking"] * batch["rgb"].shape[0])
    loss_cfg = LossConfig()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(batch["rgb"], batch["nir"], batch["tir"], mask=batch["mask"], text=text, camid=batch["camid"])
        total, _ = stmi_loss(out, batch["pids"], loss_cfg)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        base = dict(clip_model="stmi-tiny", image_size=(64, 32), str_heads=4)
    else:
        base = dict(clip_model="ViT-B-16", image_size=(256, 128), str_heads=8)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    h, w = base["image_size"]
    num_classes = max(2, args.batch // 2)
    batch = make_batch(args.batch, h, w, num_classes)
    print(f"train step: {base['clip_model']} {h}x{w}, batch {args.batch} triplets, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} after {args.warmup} warm-up")
    results: dict[str, float] = {}
    for name in names:
        cfg = ModelConfig(pretrained=None, num_classes=num_classes, use_sie=True, num_cameras=2, K=4,
                          **base, **VARIANTS[name])
        results[name] = time_variant(cfg, batch, args.steps, args.warmup)
        print(f"  {name:9s} {results[name] * 1000:9.1f} ms/step", flush=True)
    if "baseline" in results:
        for name, t in results.items():
            if name != "baseline":
                print(f"  {name} / baseline = {t / results['baseline']:.3f}x")
        if "full" in results:
            ratio = results["full"] / results["baseline"]
            print(f"  target full <= 1.25x baseline: {'met' if ratio <= 1.25 else 'NOT met'} ({ratio:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
