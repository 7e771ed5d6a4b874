"""benchmarks/train_throughput.py runs (tiny CPU configuration) and prints its table, so it cannot rot; one run
uses 2 DDP ranks (gloo), which also checks that DDP without find_unused_parameters works for the full model."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # minutes on 2 CPUs: kept out of `make test-fast`


def _bench():  # noqa: ANN202 - the benchmark module
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(out: str) -> dict[str, list[str]]:
    return {m.group(1): m.group(2).split() for m in re.finditer(r"^(stmi|baseline)\s+(\d.*)$", out, re.M)}


def test_tiny_run_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench().main(["--tiny", "--steps", "1", "--warmup", "1", "--loader-workers", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"stmi", "baseline"}, out
    for cells in rows.values():
        tps, step, *split = map(float, cells[:6])
        assert tps > 0 and step > 0 and all(x >= 0 for x in split)
        assert float(cells[7]) > 0  # GFLOP per step counted
        assert cells[8] == "n/a"  # no MFU peak on a CPU
    assert "STMI step <= 1.15x baseline" in out


def test_two_ddp_ranks() -> None:
    """The command line itself, as a user runs it (the spawned ranks import the script as ``__main__``)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--tiny", "--workers", "2",
           "--variants", "stmi", "--data", "memory", "--steps", "2", "--warmup", "1", "--loader-workers", "0",
           "--threads", "1", "--peak-tflops", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert set(rows) == {"stmi"} and "2 x CPU" in proc.stdout, proc.stdout
    assert rows["stmi"][8].endswith("%")
