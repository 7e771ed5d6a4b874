"""``python -m stmi.data synth|check``: make a synthetic dataset, or validate a dataset before a sweep."""

from __future__ import annotations

import argparse
import json
import sys

from stmi.data.datasets import LAYOUTS, DatasetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stmi.data",
        description="Dataset tools for RGBNT201, RGBNT100 and MSVR310 (layouts as in DATASETS.md).",
        epilog="Examples:\n"
               "  python -m stmi.data synth --dataset rgbnt201 --out /tmp/synth --ids 10\n"
               "  python -m stmi.data check --dataset rgbnt201 --root /tmp/synth",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{synth,check}")
    names = sorted(LAYOUTS)

    s = sub.add_parser(
        "synth", help="write a synthetic dataset in the real layout, with masks and captions",
        description="Write <out>/<DATASET FOLDER>/... in the dataset's real layout, with masks (the exact ones "
                    "also in .truth/masks/) and captions. --difficulty hard (default) is a benchmark: each camera "
                    "films its own cluttered scene behind every identity, an identity is a combination of upper "
                    "colour, lower colour and a mark (no single attribute singles it out), the object covers "
                    "25-45%% of the frame, captions name only part of the attributes and masks have boundary "
                    "errors and missed parts; the thermal frame shows a warm object. --difficulty easy is "
                    "trivially learnable (for smoke tests). Pass --out as cfg.data.root / --root afterwards.")
    s.add_argument("--dataset", required=True, choices=names, help="which layout to write")
    s.add_argument("--out", required=True, help="folder that receives the dataset folder (created if missing)")
    s.add_argument("--ids", required=True, type=int, help="number of identities (>= 2; ~70%% train, rest test)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same arguments give the same files (default 0)")
    s.add_argument("--images-per-id", type=int, default=8, help="triplets per identity (default 8)")
    s.add_argument("--cameras", type=int, default=3, help="cameras per identity (default 3)")
    h = s.add_argument_group("difficulty (hard mode; see stmi/data/synth.py)")
    h.add_argument("--difficulty", choices=("hard", "easy"), default="hard",
                   help="hard: the benchmark (default); easy: distinct colour/shape per identity on shared "
                        "backgrounds, full captions, exact masks")
    h.add_argument("--caption-attrs", type=int, default=1,
                   help="attributes (of upper, lower, mark) each caption names, a random subset per image (default 1)")
    h.add_argument("--caption-error-p", type=float, default=0.1,
                   help="probability that a colour a caption names is wrong (default 0.1)")
    h.add_argument("--mask-noise", type=float, default=2.0,
                   help="boundary error of the masks in masks/, in pixels (default 2; 0: exact)")
    h.add_argument("--mask-miss-p", type=float, default=0.25,
                   help="probability that a mask misses a band of the object (default 0.25; 0: never)")
    h.add_argument("--clutter", type=float, default=1.0,
                   help="contrast of the camera scenes around their mean colour (default 1; 0: flat scenes)")

    c = sub.add_parser(
        "check", help="validate a dataset: counts per split and every problem, by path",
        description="Read every split as training would, decode every image and mask, and report the counts per "
                    "split (identities, triplets, cameras, triplets with a mask, triplets with a caption) and every "
                    "problem found, each naming its path. Exit status 0 when there is no error, 1 otherwise.")
    c.add_argument("--dataset", required=True, choices=names, help="which layout to read")
    c.add_argument("--root", required=True, help="folder that contains the dataset folder (e.g. RGBNT201/)")
    c.add_argument("--json", action="store_true",
                   help='print one JSON object {"train": {...}, "query": {...}, "gallery": {...}, "errors": [...]}')
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "synth":
        from stmi.data.synth import make_synthetic

        try:
            out = make_synthetic(args.dataset, args.out, args.ids, seed=args.seed, images_per_id=args.images_per_id,
                                 cameras=args.cameras, progress=True, difficulty=args.difficulty,
                                 caption_attrs=args.caption_attrs, caption_error_p=args.caption_error_p,
                                 mask_noise=args.mask_noise, mask_miss_p=args.mask_miss_p, clutter=args.clutter)
        except (ValueError, DatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.dataset} to {out}; use --root {out}")
        return 0
    from stmi.data.check import check_dataset

    report = check_dataset(args.dataset, args.root, progress=not args.json and sys.stderr.isatty())
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
