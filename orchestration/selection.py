"""Model selection over seeds: which configuration of a sweep is the champion, on plain rows (no MLflow, no Ray).

A sweep's trials differ by their configuration and by chance (initialisation, sampling order, augmentation). A
single trial that scores best may only be the luckiest, so selection compares CONFIGURATIONS by their mean over
seeds:

- a grid search space (the ablation) runs every variant with ``--seeds N`` training seeds;
- after an Optuna search, the top ``--confirm-top k`` configurations by the validation metric are re-run with ``N``
  new seeds (:func:`seed_list` with ``offset=1``: the search trial's own seed is not among them, because its value
  is the one it was selected on and would bias its configuration's mean upwards).

The champion is the configuration with the best mean of the validation metric (``best_val_mAP``; the test set is
never looked at); the model registered for it is that configuration's run with the best validation metric.

A row is one trial as ``orchestration.sweep`` collects it: ``trial_id``, ``status``, ``run_id``, the searched values
(``model.tau`` ... or ``variant``), ``seed``, ``confirm_of`` (the search trial a confirmation re-runs) and the
metrics (``best_val_mAP``, ``test_mAP`` ...). Means and standard deviations are the report's
(``orchestration.report``): mean and sample std over the runs that count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The statuses whose runs are averaged: a FAILED run has no trustworthy metric, a KILLED one (stopped by ASHA or
#: by an interruption) did not train the full budget.
AVERAGED_STATUS = "FINISHED"
#: The metrics summarised per configuration (the selection metric first).
SUMMARY_METRICS = ("best_val_mAP", "test_mAP", "test_R1", "test_R5", "test_R10")


def seed_list(base: int, n: int, offset: int = 0) -> list[int]:
    """``n`` training seeds (``optim.seed`` values) from ``base``: ``base + offset``, ``base + offset + 1`` ...

    ``offset=0`` for a grid (its first seed is the recipe's, so ``--seeds 1`` runs what a sweep ran before);
    ``offset=1`` for a confirmation, whose seeds must differ from the search trial's (``base``).
    """
    if n < 1:
        raise ValueError(f"need at least one seed, got {n}")
    return [base + offset + i for i in range(n)]


def finite(v: Any) -> bool:
    """A real number (not None, NaN or infinite, not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_key(row: Mapping[str, Any], params: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """What makes two rows the same configuration: their values of ``params`` (the seed is not one of them)."""
    return tuple((k, repr(row.get(k))) for k in params)


@dataclass
class ConfigResult:
    """One configuration and the runs of it that count (see :data:`AVERAGED_STATUS`)."""

    key: tuple[tuple[str, str], ...]
    values: dict[str, Any]
    """The configuration's values of the compared params (from its first row)."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    """A short name: the variant, the search trial a confirmation re-ran, or the trial id."""

    def scores(self, metric: str) -> list[float]:
        return [float(r[metric]) for r in self.rows if finite(r.get(metric))]

    def n(self, metric: str) -> int:
        return len(self.scores(metric))

    def mean(self, metric: str) -> float:
        s = self.scores(metric)
        return statistics.fmean(s) if s else float("nan")

    def std(self, metric: str) -> float:
        """Sample standard deviation (0 for one run, NaN for none), as the report computes it."""
        s = self.scores(metric)
        return statistics.stdev(s) if len(s) > 1 else (0.0 if s else float("nan"))

    @property
    def seeds(self) -> list[Any]:
        return sorted({r.get("seed") for r in self.rows if r.get("seed") is not None})

    def best_row(self, metric: str, mode: str = "max") -> dict[str, Any]:
        """The run to register for this configuration: the best of its seeds on the (validation) metric."""
        scored = [r for r in self.rows if finite(r.get(metric))]
        if not scored:
            raise ValueError(f"configuration {self.label!r} has no run with {metric}")
        return (max if mode == "max" else min)(scored, key=lambda r: float(r[metric]))

    def summary(self, metrics: Iterable[str] = SUMMARY_METRICS) -> dict[str, Any]:
        """``{"label", "n", "seeds", "<metric>_mean", "<metric>_std", ...}`` (a row of the configurations table)."""
        out: dict[str, Any] = {"label": self.label, **self.values, "n": len(self.rows),
                               "seeds": ",".join(str(s) for s in self.seeds)}
        for m in metrics:
            out[f"{m}_mean"] = self.mean(m)
            out[f"{m}_std"] = self.std(m)
        return out


def scored(row: Mapping[str, Any], metric: str) -> bool:
    """A row that may be selected at all: not FAILED, with a run, with a finite ``metric``."""
    return row.get("status") != "FAILED" and bool(row.get("run_id")) and finite(row.get(metric))


def group_rows(rows: Iterable[Mapping[str, Any]], params: Sequence[str], metric: str,
               statuses: Sequence[str] = (AVERAGED_STATUS,)) -> list[ConfigResult]:
    """Rows -> configurations (first appearance first). Only scored rows whose status is in ``statuses`` count."""
    groups: dict[tuple[tuple[str, str], ...], ConfigResult] = {}
    for r in rows:
        if not scored(r, metric) or r.get("status") not in statuses:
            continue
        key = config_key(r, params)
        g = groups.get(key)
        if g is None:
            label = str(r.get("confirm_of") or r.get("variant") or r.get("trial_id") or len(groups))
            g = groups[key] = ConfigResult(key, {k: r.get(k) for k in params}, label=label)
        g.rows.append(dict(r))
    return list(groups.values())


def rank(groups: Iterable[ConfigResult], metric: str, mode: str = "max") -> list[ConfigResult]:
    """Best mean first; a tie goes to the configuration with more runs, then to the earlier one (stable)."""
    sign = -1.0 if mode == "max" else 1.0
    have = [g for g in groups if g.n(metric)]
    return sorted(have, key=lambda g: (sign * g.mean(metric), -g.n(metric)))


def champion(groups: Iterable[ConfigResult], metric: str, mode: str = "max") -> ConfigResult | None:
    """The configuration with the best MEAN ``metric`` over its runs (None when no configuration has one)."""
    ranked = rank(groups, metric, mode)
    return ranked[0] if ranked else None


def top_configurations(rows: Iterable[Mapping[str, Any]], params: Sequence[str], metric: str, mode: str,
                       k: int) -> list[dict[str, Any]]:
    """The ``k`` best distinct configurations of a search by their best trial, best first (one row each: that
    trial). Every scored trial competes, also one stopped early by ASHA (its confirmation trains the full budget).
    """
    if k <= 0:
        return []
    groups = group_rows(rows, params, metric, statuses=("FINISHED", "KILLED"))
    best = [g.best_row(metric, mode) for g in groups]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(best, key=lambda r: sign * float(r[metric]))[:k]
