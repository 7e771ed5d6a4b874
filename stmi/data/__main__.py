"""``stmi-data synth|check`` (or ``python -m stmi.data``): make a synthetic dataset, or validate a real one."""

from __future__ import annotations

import argparse
import json
import os
import sys

from stmi.data.datasets import DATASETS, DatasetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stmi-data" if os.path.basename(sys.argv[0]) == "stmi-data" else "python -m stmi.data",
        description="Dataset tools for RGBNT201, RGBNT100 and MSVR310 (layouts, masks and captions: "
                    "docs/datasets.md).",
        epilog="Examples:\n"
               "  python -m stmi.data synth --dataset rgbnt201 --out /tmp/synth --ids 10\n"
               "  python -m stmi.data check --dataset rgbnt201 --root /tmp/synth",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{synth,check}")
    names = list(DATASETS)

    s = sub.add_parser(
        "synth", help="write a synthetic dataset in the real layout, with masks and captions",
        description="Write <out>/<DATASET FOLDER>/... in the dataset's real layout: identities distinguishable only "
                    "by their foreground (colour, shape, pattern) over shared cluttered backgrounds, a warm object "
                    "in the thermal frame, masks (also copied to .truth/masks/) and template captions. Pass --out "
                    "as cfg.data.root / --root afterwards.")
    s.add_argument("--dataset", required=True, choices=names, help="which layout to write")
    s.add_argument("--out", required=True, help="folder that receives the dataset folder (created if missing)")
    s.add_argument("--ids", required=True, type=int, help="number of identities (>= 2; ~70%% train, rest test)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same arguments give the same files (default 0)")
    s.add_argument("--images-per-id", type=int, default=8, help="triplets per identity (default 8)")
    s.add_argument("--cameras", type=int, default=3, help="cameras per identity (default 3)")

    c = sub.add_parser(
        "check", help="validate a dataset: counts per split and every problem, by path",
        description="Read every split as training would, decode every image and mask, and report the counts per "
                    "split (identities, triplets, cameras, triplets with a mask, triplets with a caption) and every "
                    "problem found, each naming its path. The counts go to stdout, each problem to stderr as one "
                    "'error: ...' line. Exit status 0 when there is no error, 1 otherwise.")
    c.add_argument("--dataset", required=True, choices=names, help="which layout to read")
    c.add_argument("--root", required=True, help="folder that contains the dataset folder (e.g. RGBNT201/)")
    c.add_argument("--json", action="store_true",
                   help='print one JSON object {"train": {...}, "query": {...}, "gallery": {...}, "errors": [...]} '
                        'to stdout instead (the errors are in it, nothing goes to stderr)')
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "synth":
        from stmi.data.synth import make_synthetic

        try:
            out = make_synthetic(args.dataset, args.out, args.ids, seed=args.seed, images_per_id=args.images_per_id,
                                 cameras=args.cameras, progress=True)
        except (ValueError, DatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.dataset} to {out}; use --root {out}")
        return 0
    from stmi.data.check import check_dataset

    report = check_dataset(args.dataset, args.root, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.table())
        if report.errors:
            print(report.error_lines(), file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
