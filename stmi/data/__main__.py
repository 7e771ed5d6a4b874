"""``stmi-data synth|check|cache`` (or ``python -m stmi.data``): make a synthetic dataset, validate a dataset before a
sweep, or prebuild a node's decoded-frame cache."""

from __future__ import annotations

import argparse
import json
import os
import sys

from stmi.data.layouts import DATASETS, DatasetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stmi-data" if os.path.basename(sys.argv[0]) == "stmi-data" else "python -m stmi.data",
        description="Dataset tools for RGBNT201, RGBNT100 and MSVR310 (layouts, masks and captions: "
                    "docs/datasets.md).",
        epilog="Examples:\n"
               "  python -m stmi.data synth --dataset rgbnt201 --out /tmp/synth --ids 10\n"
               "  python -m stmi.data check --dataset rgbnt201 --root /tmp/synth\n"
               "  python -m stmi.data cache --dataset rgbnt201 --root /tmp/synth",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{synth,check,cache}")
    names = list(DATASETS)

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
                    "problem found, each naming its path. The counts go to stdout, each problem to stderr as one "
                    "'error: ...' line. Exit status 0 when there is no error, 1 otherwise.")
    c.add_argument("--dataset", required=True, choices=names, help="which layout to read")
    c.add_argument("--root", required=True, help="folder that contains the dataset folder (e.g. RGBNT201/)")
    c.add_argument("--json", action="store_true",
                   help='print one JSON object {"train": {...}, "query": {...}, "gallery": {...}, "errors": [...]} '
                        'to stdout instead (the errors are in it, nothing goes to stderr)')
    _add_cache_parser(sub, names)
    return p


# ------------------------------------------------------------------------------------------ cache (issue 13)
def _add_cache_parser(sub: argparse._SubParsersAction, names: list[str]) -> None:
    k = sub.add_parser(
        "cache", help="prebuild the decoded-frame cache of a dataset on this node (what training reads)",
        description="Decode every split once into the node-local frame cache that training memory-maps "
                    "(cfg.data.cache=true): frames resized to the input size exactly as the transforms do, and "
                    "masks. A valid cache is reused; a changed dataset gets a new one. Run it once per node before "
                    "a sweep so the first trials do not wait for the build. Bad files are reported by path.")
    k.add_argument("--dataset", required=True, choices=names, help="which layout to read")
    k.add_argument("--root", required=True, help="folder that contains the dataset folder (cfg.data.root)")
    k.add_argument("--cache-dir", default="",
                   help="cache folder (cfg.data.cache_dir; default $STMI_CACHE_DIR or ~/.cache/stmi/frames)")
    k.add_argument("--image-size", default=None,
                   help="input size HxW of the runs that will read it (cfg.model.image_size; default the paper "
                        "recipe's: 256x128 for rgbnt201, 128x256 for rgbnt100 and msvr310)")
    k.add_argument("--threads", type=int, default=None, help="decoding threads (default: the usable CPUs)")
    k.add_argument("--verify", action="store_true",
                   help="also check every byte of each cache against its checksum (and rebuild a damaged one)")


def _cache_main(args: argparse.Namespace) -> int:
    import shutil

    from stmi.data.frame_cache import CacheError, ensure_cache, resolve_cache_dir, validate
    from stmi.data.layouts import load_dataset
    from stmi.recipes import recipe

    if args.image_size is None:  # the paper recipe's input size for the dataset
        args.image_size = "x".join(map(str, recipe("paper", args.dataset).model.image_size))
    try:
        size = tuple(int(v) for v in args.image_size.lower().replace(",", "x").split("x"))
        if len(size) != 2 or min(size) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --image-size {args.image_size!r} must be HxW, e.g. 256x128", file=sys.stderr)
        return 2
    try:
        splits = load_dataset(args.dataset, args.root)
        print(f"frame cache of {args.dataset} at {size[0]}x{size[1]} in {resolve_cache_dir(args.cache_dir)}")
        done: set[int] = set()
        for name in ("train", "query", "gallery"):
            records = getattr(splits, name)
            if id(records) in done:
                continue
            done.add(id(records))
            c = ensure_cache(args.dataset, records, size, args.cache_dir, progress=sys.stderr.isatty(),
                             threads=args.threads)
            status = f"built in {c.manifest['build_s']:.1f} s, {c.manifest['created']}"
            if args.verify:
                if validate(c.path, full=True)[0] is None:
                    shutil.rmtree(c.path)
                    c = ensure_cache(args.dataset, records, size, args.cache_dir, progress=sys.stderr.isatty(),
                                     threads=args.threads)
                    status += "; was damaged: rebuilt"
                else:
                    status += "; verified ok"
            print(f"  {records[0].split_folder:<20} {len(records):>6} triplets {c.nbytes / 1e6:>9.1f} MB  "
                  f"{c.path}  ({status})")
    except CacheError as e:
        print(f"error: {e} (here: --cache-dir)", file=sys.stderr)
        return 2
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
# ------------------------------------------------------------------------------------------ end of cache


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "cache":
        return _cache_main(args)
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
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.table())
        if report.errors:
            print(report.error_lines(), file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
