"""``stmi.data check``: validate a dataset before a sweep and report every problem at once.

It runs the same readers as training in collecting mode (so it reports exactly what training would reject) and then
decodes every image and mask, which the readers leave to load time: a corrupt JPEG or a wrong-size mask is found
here in minutes instead of hours into a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stmi.data.layouts import SPLITS, DatasetError, Reporter, Triplet, read_all
from stmi.data.triplet_dataset import load_mask, open_image

STAT_KEYS = ("ids", "images", "cameras", "masks", "captions")


@dataclass
class CheckReport:
    """Per-split counts (``ids``, ``images`` = triplets, ``cameras``, ``masks``, ``captions``) and all errors."""

    dataset: str
    root: str
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Per split, the digest a training run logs as its MLflow dataset input (``stmi.data.fingerprint``)."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        """``{"train": {...}, "query": {...}, "gallery": {...}, "errors": [...], "fingerprints": {split: digest}}``
        (splits present only)."""
        return {**self.splits, "errors": list(self.errors), "fingerprints": dict(self.fingerprints)}

    def table(self) -> str:
        """The counts of :meth:`to_json` for a human, with the shares of masks and captions, and the error count.

        The errors themselves are not in it: the command line prints them to stderr (:meth:`error_lines`).
        """
        lines = [f"{self.dataset} under {self.root}", ""]
        lines.append(f"{'split':<8} {'ids':>6} {'images':>8} {'cameras':>8} {'masks':>16} {'captions':>16}")
        for s, st in self.splits.items():
            n = max(st["images"], 1)
            masks = f"{st['masks']} ({100 * st['masks'] / n:.1f}%)"
            caps = f"{st['captions']} ({100 * st['captions'] / n:.1f}%)"
            lines.append(f"{s:<8} {st['ids']:>6} {st['images']:>8} {st['cameras']:>8} {masks:>16} {caps:>16}")
        if self.fingerprints:
            lines.append("")
            lines.append("fingerprints (what a run logs as its dataset inputs): " + ", ".join(
                f"{s} {d}" for s, d in self.fingerprints.items()))
        lines.append("")
        lines.append(f"{len(self.errors)} error(s), listed on stderr" if self.errors else "no errors")
        return "\n".join(lines)

    def error_lines(self) -> str:
        """One ``error: <problem naming its path and the fix>`` line per problem."""
        return "\n".join(f"error: {e}" for e in self.errors)


def _split_stats(records: list[Triplet]) -> dict[str, int]:
    return {"ids": len({t.pid for t in records}), "images": len(records), "cameras": len({t.camid for t in records}),
            "masks": sum(t.mask is not None for t in records),
            "captions": sum(t.caption is not None for t in records)}


def _verify(t: Triplet, rep: Reporter) -> None:
    """Decode every file of a triplet; each failure is reported with its path."""
    frame_size = None
    paths = (t.rgb,) if t.frames is not None else (t.rgb, t.nir, t.tir)
    for p in paths:
        try:
            im = open_image(p)
        except DatasetError as e:
            rep.error(str(e))
            continue
        if p == t.rgb:
            frame_size = im.size
            if t.frames is not None:
                if im.size[0] % 3:
                    rep.error(f"{p} is {im.size[0]}x{im.size[1]}: a packed RGBNT100 file holds three frames side "
                              f"by side (width a multiple of 3, e.g. 768x128); re-export it")
                    return
                frame_size = (im.size[0] // 3, im.size[1])
    if frame_size is not None:
        try:
            load_mask(t, frame_size)
        except DatasetError as e:
            rep.error(str(e))


def check_dataset(dataset: str, root: str | Path, progress: bool = False) -> CheckReport:
    """Read and decode the whole dataset, collecting every problem instead of stopping at the first."""
    report = CheckReport(dataset=dataset, root=str(root))
    rep = Reporter(strict=False)
    try:
        splits = read_all(dataset, root, rep)
    except DatasetError as e:
        report.errors = [*rep.errors, str(e)] if str(e) not in rep.errors else list(rep.errors)
        return report
    seen: set[Path] = set()
    unique = []
    for s in SPLITS:
        records = getattr(splits, s)
        if records:
            report.splits[s] = _split_stats(records)
        for t in records:
            if t.rgb not in seen:
                seen.add(t.rgb)
                unique.append(t)
    for t in tqdm(unique, desc="decoding", unit="triplet", disable=not progress):
        _verify(t, rep)
    report.errors = rep.errors
    try:
        from stmi.data.fingerprint import fingerprint_split

        report.fingerprints = {s: fingerprint_split(splits, s).digest for s in report.splits}
    except OSError as e:  # a file vanished while checking: that is an error of its own
        report.errors.append(f"cannot fingerprint {root}: {e}; check the dataset is not being modified")
    return report
