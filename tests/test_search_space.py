"""Search-space files are validated before anything starts, with the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.search_space import SEARCH_SPACES_DIR, SearchSpaceError, load_search_space
from stmi.config import STMIConfig, apply_overrides

SIX = {"model.alpha_init", "model.beta_init", "model.p", "model.tau", "model.K", "optim.lr"}


@pytest.mark.parametrize("name", ["paper", "demo"])
def test_shipped_optuna_spaces_search_the_six_hyperparameters(name: str) -> None:
    ss = load_search_space(name)
    assert ss.kind == "optuna" and set(ss.params) == SIX
    assert ss.params["model.K"].type == "int"
    dists = ss.optuna_distributions()
    assert dists["optim.lr"].log and dists["model.K"].low == 1


def test_paper_space_starts_from_the_papers_values() -> None:
    ss = load_search_space(SEARCH_SPACES_DIR / "paper.yaml")
    assert ss.start[0]["model.K"] == 4 and ss.start[0]["optim.lr"] == pytest.approx(3.5e-6)


def test_ablation_grid_reproduces_tables_3_to_5_and_every_variant_builds_a_config() -> None:
    ss = load_search_space("ablation")
    assert ss.kind == "grid"
    assert {"t3_A_baseline", "t3_D_full", "t4_B_mlp", "t4_C_mhsa", "t5_A_shared", "t5_B_early", "t5_C_late",
            "t5_D_head"} <= set(ss.variants)
    for name in ss.variants:
        cfg = apply_overrides(STMIConfig(), ss.trial_overrides({"variant": name}))
        assert isinstance(cfg, STMIConfig)
    base = apply_overrides(STMIConfig(), ss.trial_overrides({"variant": "t3_A_baseline"}))
    assert not base.model.use_sfm and not base.model.use_str and base.model.fusion == "concat"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("params:\n  model.alpha: {type: float, low: 0, high: 1}\n", "params.model.alpha: unknown config field"),
        ("params:\n  model.p: {type: float, low: 0.5, high: 0.5}\n", "params.model.p: empty range"),
        ("params:\n  model.p: {type: float, low: 'a', high: 1}\n", "params.model.p.low"),
        ("params:\n  model.K: {type: float, low: 1, high: 8}\n", "params.model.K: the field is an integer"),
        ("params:\n  model.fusion: {type: choice, values: []}\n", "params.model.fusion.values: an empty choice"),
        ("params:\n  model.fusion: {type: choice, values: [chi, graph]}\n", "model.fusion: 'graph' is not one of"),
        ("params:\n  model.p: {type: float, low: 0, high: 1}\nbogus: 1\n", "unknown top-level field(s) ['bogus']"),
        ("params:\n  model.p: {type: float, low: 0, high: 1}\nfixed: {optim.epochs: three}\n",
         "fixed.optim.epochs: optim.epochs: expected an integer"),
        ("params:\n  model.p: {type: float, low: 0, high: 1}\nstart: [{model.p: 2.0}]\n",
         "start[0].model.p: 2.0 is outside"),
        ("params:\n  model.p: {type: float, low: 0, high: 1, lg: true}\n", "unknown key(s) ['lg']"),
        ("kind: grid\nvariants: {}\n", "variants: a grid search space needs"),
        ("kind: grid\nvariants:\n  a: {model.use_sfm: maybe}\n", "variants.a.model.use_sfm"),
        ("params: {}\n", "params: an optuna search space needs a non-empty"),
        ("params:\n  optim.lr: {type: float, low: 0, high: 1, log: true}\n", "a log range needs low > 0"),
    ],
)
def test_bad_search_space_is_rejected_naming_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as exc:
        load_search_space(path)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


def test_unknown_search_space_name_lists_the_known_ones() -> None:
    with pytest.raises(SearchSpaceError, match="known: ablation, demo, paper"):
        load_search_space("nope")
