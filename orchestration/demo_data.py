"""Synthetic demo datasets, generated once on first use and shared by runs and trials.

Location: ``$STMI_DEMO_DATA`` or ``~/.cache/stmi/demo``. Generation goes to a temporary folder renamed into place,
under a file lock, so concurrent drivers never see (or write) a half-made dataset.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

DEMO_IDS = 20
"""Identities of every synthetic demo dataset (the layouts and camera counts come from ``stmi.data.layouts``)."""
DEMO_IMAGES_PER_ID = 10


def demo_root() -> Path:
    return Path(os.environ.get("STMI_DEMO_DATA", Path.home() / ".cache" / "stmi" / "demo")).expanduser().absolute()


def ensure_demo_dataset(dataset: str, ids: int | None = None, seed: int = 0) -> Path:
    """The root (``cfg.data.root``) of the synthetic ``dataset``, generating it when absent."""
    from stmi.data.synth import make_synthetic

    base = demo_root()
    base.mkdir(parents=True, exist_ok=True)
    done = base / dataset / ".complete"
    if done.exists():
        return base / dataset
    with open(base / f".{dataset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            tmp = base / f".{dataset}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            make_synthetic(dataset, tmp, ids or DEMO_IDS, seed=seed, images_per_id=DEMO_IMAGES_PER_ID)
            shutil.rmtree(base / dataset, ignore_errors=True)
            tmp.rename(base / dataset)
            done.touch()
    return base / dataset
