"""Cost of STMI's additions on one training step, side by side with the baseline (paper table 3).

Three models share the same CLIP towers (the very same weights) and batch; one step = forward + ``stmi_loss`` +
backward + Adam:

- ``baseline``: ``use_sfm=False, use_str=False, fusion="concat"`` (table 3 A, concatenated CLS tokens);
- ``sfm``: the baseline plus SFM (table 3 B);
- ``full``: SFM + STR + CHI + global fusion (table 3 D).

Real shapes by default: ``ViT-B-16`` (random init, no weights needed), 256x128, ``--batch`` triplets (default 4,
P x K with K = 2), on the CPU. Median of ``--steps`` timed steps after ``--warmup``, the variants' steps interleaved
round by round, so the ratios are comparable even when the machine is shared. Target: full <= 1.25 x baseline.

Usage::

    python benchmarks/train_step.py                 # ViT-B-16, 256x128, 4 triplets
    python benchmarks/train_step.py --batch 8
    python benchmarks/train_step.py --quick         # stmi-tiny smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stmi.config import LossConfig, ModelConfig  # noqa: E402
from stmi.losses import stmi_loss  # noqa: E402
from stmi.model.backbone import TextEncoder, VisualEncoder, build_clip  # noqa: E402
from stmi.model.network import STMI  # noqa: E402

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


def build_variants(base: ModelConfig, names: list[str]) -> dict[str, STMI]:
    """One STMI per variant, all on the same CLIP towers (so memory holds one backbone, and every variant runs
    exactly the same weights); each variant wraps the shared ViT in its own encoder (with or without SFM)."""
    torch.manual_seed(0)
    clip = build_clip(base)
    text = TextEncoder(clip)
    models = {}
    for name in names:
        cfg = dataclasses.replace(base, **VARIANTS[name])
        models[name] = STMI(cfg, VisualEncoder(clip.visual, cfg), text).train()
    return models


def time_variants(
    models: dict[str, STMI], batch: dict[str, torch.Tensor], steps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of each timed training step per variant.

    Steps are interleaved (one step of each variant per round, the order rotating every round), so a load change
    on a shared machine hits every variant alike and the ratios stay meaningful. One Adam over the union of the
    parameters: with ``set_to_none`` gradients, a step only touches the parameters of the variant that ran.
    """
    params = {id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}
    opt = torch.optim.Adam(list(params.values()), lr=1e-6)
    loss_cfg = LossConfig()
    names = list(models)
    text = next(iter(models.values())).tokenize(["a person walking"] * batch["rgb"].shape[0])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + steps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            model = models[name]
            t0 = time.perf_counter()
            out = model(batch["rgb"], batch["nir"], batch["tir"], mask=batch["mask"], text=text, camid=batch["camid"])
            total, _ = stmi_loss(out, batch["pids"], loss_cfg)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


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
    cfg = ModelConfig(pretrained=None, num_classes=num_classes, use_sie=True, num_cameras=2, K=4, **base)
    times = time_variants(build_variants(cfg, names), batch, args.steps, args.warmup)
    results = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}
    for name, t in results.items():
        print(f"  {name:9s} median {t * 1000:9.1f} ms/step   min {best[name] * 1000:9.1f} ms/step")
    if "baseline" in results:
        for name, t in results.items():
            if name != "baseline":
                print(f"  {name} / baseline = {t / results['baseline']:.3f}x (median), "
                      f"{best[name] / best['baseline']:.3f}x (min)")
        if "full" in results:
            ratio = results["full"] / results["baseline"]
            print(f"  target full <= 1.25x baseline: {'met' if ratio <= 1.25 else 'NOT met'} ({ratio:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
