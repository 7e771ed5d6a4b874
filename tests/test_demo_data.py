"""The demo datasets' cache: made on first use, reused when made the same way, made again when not; the seed noise the
demo's report puts beside each trial's gap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestration import demo_data
from stmi.data.layouts import read_split


def _pids(root: Path) -> set[int]:
    return {t.pid for t in read_split("rgbnt201", root, "train")}


def test_a_cache_made_otherwise_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STMI_DEMO_DATA", str(tmp_path))
    root = demo_data.ensure_demo_dataset("rgbnt201", ids=6)
    assert root == tmp_path / "rgbnt201"
    marker = root / ".complete"
    assert json.loads(marker.read_text()) == {"ids": 6, "images_per_id": demo_data.DEMO_IMAGES_PER_ID, "seed": 0}
    first = _pids(root)

    stamp = marker.stat().st_mtime_ns
    assert demo_data.ensure_demo_dataset("rgbnt201", ids=6) == root  # the same request: reused, not made again
    assert marker.stat().st_mtime_ns == stamp

    more = demo_data.ensure_demo_dataset("rgbnt201", ids=8)  # other identities: made again
    assert json.loads((more / ".complete").read_text())["ids"] == 8
    assert len(_pids(more)) > len(first)

    marker.write_text("")  # an older version's marker (empty): not trusted, made again
    again = demo_data.ensure_demo_dataset("rgbnt201", ids=6)
    assert json.loads((again / ".complete").read_text())["ids"] == 6 and _pids(again) == first
    assert not (tmp_path / ".rgbnt201.partial").exists()


def test_the_demo_report_puts_each_gap_beside_the_seed_noise() -> None:
    from infra.local.demo import DEMO_SEED_NOISE, gap_note
    from stmi.config import DATASETS

    assert set(DEMO_SEED_NOISE) == set(DATASETS) and all(0 < v < 0.2 for v in DEMO_SEED_NOISE.values())
    assert gap_note(0.078, 0.031) == "  (0.078 behind: 2.5x the seed noise)"
    assert gap_note(0.078, None) == "  (0.078 behind)"  # data whose noise was not measured: the gap alone
