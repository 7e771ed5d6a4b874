"""Synthetic demo datasets, generated once on first use and shared by runs and trials.

Location: ``$STMI_DEMO_DATA`` or ``~/.cache/stmi/demo``. Generation goes to a temporary folder renamed into place,
under a file lock, so concurrent drivers never see (or write) a half-made dataset. The ``.complete`` marker records
how a dataset was made (identities, images per identity, data seed); a dataset made otherwise (an older version's
cache, or other ``ids``) is made again, never silently reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

DEMO_IDS = 80
"""Identities of every synthetic demo dataset (the layouts and camera counts come from ``stmi.data.layouts``).

80: the demo recipe's validation fraction (0.35) then holds out 20 of the 56 training identities, and an epoch is
18 batches. At 40 identities (10 held out, 9 batches; recipe lr 3e-3, 4 epochs) the demo's two trials were 1.0-1.8
stds of the gap's seed noise apart on average, and 2 of 15 seed-dataset pairs ranked them the other way; at 80 the
recipe's point is ahead on all 15, by 1.9-3.0 stds on average (``benchmarks/selection_noise.py``, 5 seeds). 20
identities, the demo's first size, held out 3 and could tell no two configurations apart."""
DEMO_IMAGES_PER_ID = 10


def demo_root() -> Path:
    return Path(os.environ.get("STMI_DEMO_DATA", Path.home() / ".cache" / "stmi" / "demo")).expanduser().absolute()


def _made_as(ids: int, seed: int) -> dict[str, int]:
    return {"ids": ids, "images_per_id": DEMO_IMAGES_PER_ID, "seed": seed}


def _is_complete(done: Path, made_as: dict[str, int]) -> bool:
    try:
        return json.loads(done.read_text() or "{}") == made_as
    except (OSError, ValueError):
        return False


def ensure_demo_dataset(dataset: str, ids: int | None = None, seed: int = 0) -> Path:
    """The root (``cfg.data.root``) of the synthetic ``dataset``, generating it when absent or made otherwise."""
    from stmi.data.synth import make_synthetic

    base = demo_root()
    base.mkdir(parents=True, exist_ok=True)
    done = base / dataset / ".complete"
    made_as = _made_as(ids or DEMO_IDS, seed)
    if _is_complete(done, made_as):
        return base / dataset
    with open(base / f".{dataset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(done, made_as):
            print(f"making the synthetic {dataset} demo dataset ({made_as['ids']} identities) under {base} ...",
                  flush=True)
            tmp = base / f".{dataset}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            make_synthetic(dataset, tmp, made_as["ids"], seed=seed, images_per_id=DEMO_IMAGES_PER_ID)
            (tmp / ".complete").write_text(json.dumps(made_as))
            shutil.rmtree(base / dataset, ignore_errors=True)
            tmp.rename(base / dataset)
    return base / dataset
