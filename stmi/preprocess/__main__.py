"""``python -m stmi.preprocess masks|captions``: make the masks and captions STMI trains with (docs/datasets.md).

Both commands read the dataset through ``stmi.data`` (the real layouts of docs/datasets.md) and write next to it;
neither runs during training. Exit codes: 0 success, 1 some triplets failed (listed), 2 the run could not start or was
stopped (the message says what to fix).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from stmi.config import DATASETS

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stmi.preprocess",
        description="Offline preprocessing for STMI: foreground masks and multi-modal captions.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "masks", help="write one foreground mask per triplet to <dataset dir>/masks/",
        description="Write <dataset dir>/masks/<split folder>/<RGB stem>.png (0/255, one frame's size) for every "
                    "triplet. Existing masks are kept unless --overwrite.",
    )
    m.add_argument("--dataset", required=True, choices=DATASETS)
    m.add_argument("--root", required=True, help="folder that contains the dataset folder (e.g. RGBNT201/)")
    m.add_argument("--method", choices=("thermal", "sam2"), default="thermal",
                   help="thermal: warm region of the TIR frame, no weights (default); sam2: SAM2 prompted with the "
                        "thermal mask's box (needs pip install 'stmi[sam2]' and --checkpoint)")
    m.add_argument("--overwrite", action="store_true", help="recompute masks that already exist")
    m.add_argument("--checkpoint", help="sam2: path of a local SAM2 checkpoint (e.g. sam2.1_hiera_large.pt)")
    m.add_argument("--sam2-config", help="sam2: model config name when it cannot be inferred from the checkpoint "
                                         "name (e.g. configs/sam2.1/sam2.1_hiera_l.yaml)")
    m.add_argument("--sam2-image", choices=("rgb", "nir", "tir"), default="rgb",
                   help="sam2: the frame SAM2 segments (default rgb)")
    m.add_argument("--device", default="cpu", help="sam2: torch device (cpu, cuda, cuda:1 ...)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser(
        "captions", help="write text/{train,test}.json from a multi-modal LLM",
        description="Extract attributes from RGB, NIR, TIR and the three frames side by side with any "
                    "OpenAI-compatible chat-completions endpoint that accepts images, fuse them by confidence and "
                    "write one caption per triplet (plus an audit file and a reply cache under text/).",
    )
    c.add_argument("--dataset", required=True, choices=DATASETS)
    c.add_argument("--root", required=True, help="folder that contains the dataset folder (e.g. RGBNT201/)")
    c.add_argument("--endpoint", required=True,
                   help="base URL of the API, e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (vLLM), "
                        "http://localhost:11434/v1 (Ollama)")
    c.add_argument("--model", required=True, help="model name served by the endpoint (must accept images)")
    c.add_argument("--api-key-env", default=None,
                   help=f"name of the environment variable holding the API key (default {DEFAULT_KEY_ENV}; when "
                        f"the default is unset, requests go without a key, as local servers expect)")
    c.add_argument("--concurrency", type=int, default=4, help="triplets in flight at once (default 4)")
    c.add_argument("--min-confidence", type=float, default=0.5,
                   help="fused attributes below this confidence are left out (default 0.5)")
    c.add_argument("--rewrite", action="store_true", help="let the LLM reword the template description")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    c.add_argument("--max-retries", type=int, default=4,
                   help="retries per request on 429/5xx/timeouts/invalid replies (default 4)")
    c.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled each retry; Retry-After wins (default 1)")
    c.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default 0); a negative value omits it, for models that reject it")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _masks(args: argparse.Namespace) -> int:
    from stmi.preprocess.masks import run_masks

    summary = run_masks(
        args.dataset, args.root, method=args.method, overwrite=args.overwrite, checkpoint=args.checkpoint,
        sam2_config=args.sam2_config, device=args.device, sam2_image=args.sam2_image, progress=not args.quiet,
    )
    print(summary.format())
    return 0


def _captions(args: argparse.Namespace) -> int:
    from stmi.preprocess.captions import run_captions

    var = args.api_key_env or DEFAULT_KEY_ENV
    api_key = os.environ.get(var) or None
    if api_key is None:
        if args.api_key_env:
            print(f"error: environment variable {var} (named by --api-key-env) is not set or empty; export it "
                  f"with your API key", file=sys.stderr)
            return 2
        logging.getLogger(__name__).info("%s is not set: sending requests without an API key", var)
    else:
        logging.getLogger(__name__).info("API key read from $%s", var)
    summary = run_captions(
        args.dataset, args.root, args.endpoint, args.model, api_key, concurrency=args.concurrency,
        min_confidence=args.min_confidence, rewrite=args.rewrite, timeout=args.timeout,
        max_retries=args.max_retries, backoff=args.backoff,
        temperature=None if args.temperature < 0 else args.temperature, progress=not args.quiet,
    )
    print(summary.format())
    if summary.failures:
        print(f"error: {len(summary.failures)} triplet(s) have no caption (listed above); rerun the same command "
              f"to retry only those (successful replies are cached)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stmi.data.layouts import DatasetError
    from stmi.preprocess.chat_client import FatalChatError
    from stmi.preprocess.sam2_predictor import Sam2Unavailable

    try:
        return _masks(args) if args.command == "masks" else _captions(args)
    except (DatasetError, Sam2Unavailable, FatalChatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished work is kept)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
