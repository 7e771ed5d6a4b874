"""Selection over seeds on plain rows (``orchestration.selection``) and the sweep's flag checks: the champion is the
configuration with the best MEAN validation mAP, never the luckiest run and never by test mAP."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from orchestration import selection
from orchestration.search_space import load_search_space
from orchestration.settings import SettingsError
from orchestration.sweep import CONFIRM_SEEDS, GRID_SEEDS, PRESETS, champion_note, check_selection, parser

HP = ["model.tau", "optim.lr"]


def _row(trial: str, tau: float, lr: float, seed: int, val: float, test: float, status: str = "FINISHED",
         confirm_of: str = "") -> dict:
    return {"trial_id": trial, "status": status, "run_id": f"run-{trial}", "model.tau": tau, "optim.lr": lr,
            "seed": seed, "confirm_of": confirm_of, "best_val_mAP": val, "test_mAP": test, "test_R1": test,
            "test_R5": test, "test_R10": test}


def test_seed_lists() -> None:
    assert selection.seed_list(1111, 1) == [1111]  # a grid with one seed runs the recipe's, as before
    assert selection.seed_list(1111, 3) == [1111, 1112, 1113]
    assert selection.seed_list(1111, 2, offset=1) == [1112, 1113]  # a confirmation never reuses the search's seed
    with pytest.raises(ValueError):
        selection.seed_list(1, 0)


def test_champion_is_the_best_mean_not_the_luckiest_run_nor_the_best_test() -> None:
    rows = [  # A: one lucky seed (0.9) but the worse mean; B: steady; C: the best TEST mAP, mediocre validation
        _row("a0", 0.2, 1e-3, 1, 0.90, 0.50), _row("a1", 0.2, 1e-3, 2, 0.30, 0.40), _row("a2", 0.2, 1e-3, 3, 0.33, 0.4),
        _row("b0", 0.5, 3e-4, 1, 0.61, 0.45), _row("b1", 0.5, 3e-4, 2, 0.60, 0.46), _row("b2", 0.5, 3e-4, 3, 0.62, 0.4),
        _row("c0", 0.7, 1e-4, 1, 0.40, 0.99), _row("c1", 0.7, 1e-4, 2, 0.41, 0.98),
        _row("b9", 0.5, 3e-4, 9, 0.99, 0.99, status="FAILED"),  # never counted
        _row("b8", 0.5, 3e-4, 8, 0.95, 0.99, status="KILLED"),  # stopped early: not a full-budget seed
    ]
    groups = selection.group_rows(rows, HP, "best_val_mAP")
    assert [g.label for g in groups] == ["a0", "b0", "c0"] and [len(g.rows) for g in groups] == [3, 3, 2]
    champ = selection.champion(groups, "best_val_mAP", "max")
    assert champ is not None and champ.values == {"model.tau": 0.5, "optim.lr": 3e-4}
    assert champ.mean("best_val_mAP") == pytest.approx(statistics.fmean([0.61, 0.60, 0.62]))
    assert champ.std("best_val_mAP") == pytest.approx(statistics.stdev([0.61, 0.60, 0.62]))
    assert champ.seeds == [1, 2, 3]
    assert champ.best_row("best_val_mAP")["trial_id"] == "b2"  # the registered weights: its best seed on validation
    assert [g.label for g in selection.rank(groups, "best_val_mAP")] == ["b0", "a0", "c0"]
    # a metric to minimise picks the other end; the summary row carries mean and std of every metric
    assert selection.champion(groups, "best_val_mAP", "min").label == "c0"
    s = champ.summary()
    assert s["n"] == 3 and s["seeds"] == "1,2,3" and s["test_mAP_mean"] == pytest.approx(statistics.fmean([.45, .46,
                                                                                                           .4]))


def test_one_run_has_std_zero_and_none_has_no_champion() -> None:
    groups = selection.group_rows([_row("x", 0.1, 1e-3, 1, 0.5, 0.5)], HP, "best_val_mAP")
    assert groups[0].std("best_val_mAP") == 0.0 and groups[0].n("best_val_mAP") == 1
    bad = [_row("y", 0.1, 1e-3, 1, float("nan"), 0.5), _row("z", 0.1, 1e-3, 2, 0.5, 0.5, status="FAILED")]
    assert selection.group_rows(bad, HP, "best_val_mAP") == []
    assert selection.champion([], "best_val_mAP") is None


def test_ties_go_to_more_seeds() -> None:
    rows = [_row("p", 0.1, 1e-3, 1, 0.5, 0.1), _row("q", 0.2, 1e-3, 1, 0.5, 0.1), _row("q1", 0.2, 1e-3, 2, 0.5, 0.1)]
    assert selection.champion(selection.group_rows(rows, HP, "best_val_mAP"), "best_val_mAP").label == "q"


def test_top_configurations_for_confirmation() -> None:
    rows = [_row("t0", 0.1, 1e-3, 1, 0.50, 0.9), _row("t1", 0.2, 1e-3, 1, 0.70, 0.1),
            _row("t2", 0.3, 1e-3, 1, 0.60, 0.1, status="KILLED"),  # ASHA stopped it: it still competes
            _row("t3", 0.4, 1e-3, 1, 0.95, 0.1, status="FAILED"), _row("t4", 0.2, 1e-3, 1, 0.65, 0.1)]  # t4 = t1's
    top = selection.top_configurations(rows, HP, "best_val_mAP", "max", 3)
    assert [r["trial_id"] for r in top] == ["t1", "t2", "t0"]  # by validation; distinct configurations; no FAILED
    assert selection.top_configurations(rows, HP, "best_val_mAP", "max", 0) == []
    assert [r["trial_id"] for r in selection.top_configurations(rows, HP, "best_val_mAP", "max", 9)] == \
        ["t1", "t2", "t0"]


def test_confirmation_groups_by_the_confirmed_trial() -> None:
    # confirmation rows carry the values of the search trial they re-run; the label is that trial
    rows = [_row(f"c{i}", 0.2, 1e-3, 1112 + i % 2, v, 0.1, confirm_of="t1") for i, v in enumerate((0.4, 0.5))]
    rows += [_row(f"d{i}", 0.3, 1e-3, 1112 + i % 2, v, 0.1, confirm_of="t2") for i, v in enumerate((0.6, 0.55))]
    groups = selection.group_rows(rows, HP, "best_val_mAP")
    champ = selection.champion(groups, "best_val_mAP")
    assert [g.label for g in groups] == ["t1", "t2"] and champ.label == "t2" and champ.seeds == [1112, 1113]
    best = {**champ.best_row("best_val_mAP"), "champion": champ.summary(), "compared": "confirmation",
            "configurations": [g.summary() for g in selection.rank(groups, "best_val_mAP")], "model_version": "4"}
    note = champion_note(best)
    assert "t2 **(champion)** | 2 | 1112,1113 | 0.5750 ± 0.0354" in note and "| t1 | 2 |" in note
    assert "MEAN best_val_mAP over 2 seed(s)" in note and "never used to choose" in note


def test_selection_flags() -> None:
    optuna = load_search_space("demo")
    grid = load_search_space("ablation")
    assert check_selection(grid, None, 3, 3, set()) == (GRID_SEEDS, 0)  # a grid ignores the preset's confirmation
    assert check_selection(grid, 3, 3, 3, {"seeds"}) == (3, 0)
    assert check_selection(optuna, None, 2, CONFIRM_SEEDS, set()) == (CONFIRM_SEEDS, 2)
    assert check_selection(optuna, 5, 1, 3, {"seeds"}) == (5, 1)
    assert check_selection(optuna, None, 0, 3, {"confirm_top"})[1] == 0  # --confirm-top 0 turns it off
    for args, match in (((grid, None, 2, 3, {"confirm_top"}), "grid"),
                        ((optuna, 3, 0, 3, {"seeds", "confirm_top"}), "--confirm-top K"),
                        ((optuna, 0, 1, 3, {"seeds"}), "at least 1"),
                        ((optuna, None, -1, 3, {"confirm_top"}), "--confirm-top -1")):
        with pytest.raises(SettingsError, match=match):
            check_selection(*args)
    assert PRESETS["paper"]["confirm_top"] == 3 and PRESETS["paper"]["confirm_seeds"] == 3
    text = parser().format_help()
    assert "--seeds N" in text and "--confirm-top K" in text and "stmi.confirm_of" in text


def test_selection_module_is_free_of_mlflow_and_ray() -> None:
    src = Path(selection.__file__).read_text()
    assert "import mlflow" not in src and "import ray" not in src
