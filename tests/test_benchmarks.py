"""The selection-noise and missing-modality benchmarks run (their smoke tests) and print their tables, so they cannot
rot; the missing-modality benchmark's zero-frame training path feeds the model exactly the zeroed frames, unmasked."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):  # noqa: ANN202 - the benchmark module
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_zero_frames_in_training_feeds_the_zeroed_frames_as_present() -> None:
    class Echo(torch.nn.Module):  # what the wrapped model is called with
        def forward(self, rgb, nir, tir, presence=None, **kw):  # noqa: ANN001, ANN202
            return rgb, nir, tir, presence, kw

    wrapped = _bench("missing_modalities").ZeroFramesInTraining(Echo())
    frames = [torch.randn(3, 3, 4, 2) + 5 for _ in range(3)]
    presence = torch.tensor([[True, True, False], [False, True, True], [True, True, True]])
    rgb, nir, tir, seen, kw = wrapped(*frames, presence=presence, text="t")
    assert seen is None and kw == {"text": "t"}
    for m, x in enumerate((rgb, nir, tir)):
        for i in range(3):
            expected = frames[m][i] if presence[i, m] else torch.zeros_like(frames[m][i])
            assert torch.equal(x[i], expected), (m, i)
    out = wrapped(*frames)  # no dropout drawn: the batch as it is
    assert all(a is b for a, b in zip(out[:3], frames)) and out[3] is None


@pytest.mark.slow
def test_selection_noise_smoke_test_prints_its_table() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "selection_noise.py"), "--quick", "--jobs", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = re.search(r"^\| rgbnt201 \|\s+12 \|\s+0\.35 \|\s+([\d.]+) \| ([\d.]+) \+- ([\d.]+)\s+\| ([\d.]+) \+- ([\d.]+)"
                    r"\s+\| ([\d.]+)\s+\| ([\d.]+)\s+\|\s+([+-][\d.]+|nan) \| (-?[\d.]+) \+- ([\d.]+)\s+\|"
                    r"\s+([+-][\d.]+|[+-]?nan|[+-]inf) \|\s+(\d)/2\s+\|\s+([+-][\d.]+) \|$", proc.stdout, re.M)
    assert row, proc.stdout
    val_ids, a_mean, _, b_mean, _, a_test, b_test, _, diff_mean, _, _, b_ahead, first_diff = row.groups()
    assert float(val_ids) >= 2 and all(0 < float(x) <= 1 for x in (a_mean, b_mean, a_test, b_test))
    assert float(diff_mean) == pytest.approx(float(a_mean) - float(b_mean), abs=2e-3)  # the paired columns
    assert 0 <= int(b_ahead) <= 2 and abs(float(first_diff)) <= 1
    assert "[4/4]" in proc.stdout and "device cpu" in proc.stdout
    # B is the demo sweep's own second trial, drawn by the sweep's searcher: not the recipe's point
    draw = re.search(r"rgbnt201: A = the recipe \+ \{\}; B = the recipe \+ (\{.*\})$", proc.stdout, re.M)
    assert draw and "'optim.lr'" in draw.group(1) and "'model.K'" in draw.group(1), proc.stdout


def test_selection_noise_measures_the_demo_as_it_runs() -> None:
    """Its defaults are the demo sweep's data, split and budget, and its B is the sweep's second trial: the seed noise
    the demo's report quotes is measured on what the demo trains."""
    from orchestration.demo_data import DEMO_IDS
    from orchestration.search_space import load_search_space
    from orchestration.sweep import PRESETS, SAMPLER_SEED, optuna_search, recipe_point
    from stmi.recipes import recipe

    bench = _bench("selection_noise")
    a = bench.parse_args([])
    demo = recipe("demo", "rgbnt201")
    assert a.ids == str(DEMO_IDS) and float(a.val_fraction) == demo.data.val_fraction
    assert a.epochs == PRESETS["demo"]["max_epochs"] == demo.optim.epochs
    assert a.datasets.split(",") == ["rgbnt201", "rgbnt100", "msvr310"]

    ss = load_search_space("demo")
    searcher = optuna_search(ss, [recipe_point("demo", "msvr310", ss)], SAMPLER_SEED, "test")
    first, second = searcher.suggest("1"), searcher.suggest("2")
    assert first == recipe_point("demo", "msvr310", ss) and first["optim.lr"] == demo.optim.lr  # the recipe, in range
    draw = bench.sweep_draw("msvr310")
    assert draw == second and draw != first
    assert set(draw) == set(ss.params) and all(ss.params[k].low <= v <= ss.params[k].high for k, v in draw.items())
