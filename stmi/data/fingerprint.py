"""Fingerprints of the files a run reads: one digest per split, over images, masks and caption files.

A fingerprint hashes, for every file a split reads, its path relative to the dataset folder, its size and its
modification time (``mtime_ns``); ``content=True`` hashes the bytes instead of the mtime (slower: every file is read,
but a copy of the data set to another machine keeps its digest). Touching, replacing, adding or removing a file
changes the digest; moving the whole dataset folder does not (paths are relative).

Used by ``python -m stmi.data check`` (prints them), by the training runs (logged as MLflow dataset inputs, so a run
says which data it saw) and by ``--rerun`` (which compares them with the current data).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stmi.data.layouts import SPLITS, DatasetSplits, Triplet

FINGERPRINT_VERSION = "v1"


@dataclass(frozen=True)
class Fingerprint:
    """The digest of one split and what it covers."""

    split: str
    digest: str
    """``v1:`` + hex sha256 (first 32 characters); the scheme is part of the value."""
    files: int
    bytes: int
    content: bool

    def to_json(self) -> dict[str, object]:
        return {"split": self.split, "digest": self.digest, "files": self.files, "bytes": self.bytes,
                "content": self.content}


def split_files(records: Iterable[Triplet], dataset_root: Path, text_split: str | None = None) -> list[Path]:
    """Every file the records read (three modality images, the mask) plus the split's caption files, deduplicated.

    RGBNT100 packs the three modalities into one file: it is listed once.
    """
    files: set[Path] = set()
    for t in records:
        files.update((t.rgb, t.nir, t.tir))
        if t.mask is not None:
            files.add(t.mask)
    if text_split is not None:
        text = dataset_root / "text"
        for name in (f"{text_split}.json", *(f"{text_split}_{m}.json" for m in ("RGB", "NI", "TI"))):
            if (text / name).is_file():
                files.add(text / name)
    return sorted(files)


def fingerprint_files(files: Iterable[Path], dataset_root: Path, split: str = "", content: bool = False) -> Fingerprint:
    """Digest of ``files`` (see the module docstring); paths are taken relative to ``dataset_root``."""
    h = hashlib.sha256()
    n = total = 0
    root = Path(dataset_root)
    for p in sorted(Path(f) for f in files):
        st = os.stat(p)
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:  # a file outside the dataset folder (should not happen): keep its absolute path
            rel = p.as_posix()
        if content:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    fh.update(chunk)
            stamp = fh.hexdigest()
        else:
            stamp = str(st.st_mtime_ns)
        h.update(f"{rel}\t{st.st_size}\t{stamp}\n".encode())
        n += 1
        total += st.st_size
    return Fingerprint(split, f"{FINGERPRINT_VERSION}:{h.hexdigest()[:32]}", n, total, content)


def fingerprint_split(splits: DatasetSplits, split: str, content: bool = False) -> Fingerprint:
    """The fingerprint of one split (``train | query | gallery``) of a read dataset."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    files = split_files(getattr(splits, split), splits.root, splits.layout.text_splits[split])
    return fingerprint_files(files, splits.root, split, content)


def fingerprint_dataset(splits: DatasetSplits, content: bool = False) -> dict[str, Fingerprint]:
    """``{split: Fingerprint}`` for the three splits (RGBNT201's shared test list gives query == gallery)."""
    return {s: fingerprint_split(splits, s, content) for s in SPLITS}
