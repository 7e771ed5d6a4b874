"""The paper's tables from a sweep's MLflow runs: ``python -m orchestration.report --sweep NAME [--out DIR]``.

Reads MLflow over its API only (``MlflowClient``): experiment ``stmi-<NAME>``, a parent run per dataset (tag
``stmi.role=parent``), a child run per trial (tag ``mlflow.parentRunId``) with flat params (``model.use_sfm`` ...)
and the metrics ``best_val_mAP``, ``test_mAP``, ``test_R1``, ``test_R5``, ``test_R10``.

- **Configurations, not runs.** Child runs are grouped by their configuration: their params without ``optim.seed``
  (and without the run's placement, ``train.*``), so the seeds of one configuration are averaged: mean +- sample
  std over the FINISHED runs that have the metric, with ``n`` beside. Runs still RUNNING, FAILED, or KILLED (stopped
  early by the scheduler, no test metric) are listed with their status and never averaged in.
- **Confirmed configurations** (``sweep.py --confirm-top``): a configuration re-run with new seeds (runs tagged
  ``stmi.confirm_of``) is averaged over those runs only; its search trial is listed, not averaged in (it was picked
  for its own value, so it would bias the mean upwards).
- **Champion per dataset**: the configuration with the best MEAN validation mAP (``best_val_mAP``; model selection
  never looks at the test set), among the confirmed configurations when there are any (as the sweep chose); its
  test mAP / R1 / R5 / R10 beside the STMI paper's and the anchors' published
  figures (which were selected on the test set: marked so).
- **Ablation tables** (a sweep whose configurations cover at least two rows of a table): tables 3, 4 and 5 with
  the paper's row names (baseline / +SFM / +SFM+STR / +SFM+STR+CHI; concat / MLP / MHSA / CHI; the SFM sharing and
  placement variants), classified from the params, mean +- std, the paper's numbers beside.
- **Missing modalities** (a sweep run with ``eval.missing``): the champion's test mAP / R1 per setting of TOP-ReID's
  protocol (and their mean) and of MDReID's any-to-any grid, from its ``test_missing/<protocol>/<setting>/<metric>``
  metrics, mean +- std over its seeds.
- Written as ``report.md``, a self-contained ``report.html`` (chart embedded), ``report.png`` (bar chart with
  error bars: one std) and ``report.json`` (every number); logged to each parent run under ``report/`` with the
  tables as MLflow tables (``report/champion.json``, ``report/table3.json`` ...) that the UI shows.

Figures are percentages (ours: the metric x 100). The published figures come from ``paper_figures.json`` beside
this file (each table names its source in the STMI paper).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAPER_FIGURES = Path(__file__).with_name("paper_figures.json")
METRICS = ("test_mAP", "test_R1", "test_R5", "test_R10")
SELECTION_METRIC = "best_val_mAP"
IGNORED_PARAMS = ("optim.seed",)
IGNORED_PREFIXES = ("train.",)
AVERAGED_STATUS = "FINISHED"
MISSING_PREFIX = "test_missing"
"""Prefix of the missing-modality metrics (``stmi.eval_missing.missing_metrics``; not imported: it imports torch)."""
CONFIRM_TAG = "stmi.confirm_of"


class ReportError(RuntimeError):
    """The sweep cannot be reported (unknown name, no runs); the message says what there is."""


@dataclass
class Stat:
    """Mean and sample std of one metric over a configuration's seeds (values as fractions)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else float("nan"))

    def fmt(self) -> str:
        if not self.values:
            return "-"
        return f"{100 * self.mean:.1f} ± {100 * self.std:.1f}"


@dataclass
class Group:
    """One configuration of one dataset: its runs, the averaged ones and the others."""

    key: tuple[tuple[str, str], ...]
    params: dict[str, str]
    label: str = ""
    runs: list[Any] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        """Re-run by a confirmation (``sweep.py --confirm-top``): some of its runs carry ``stmi.confirm_of``."""
        return any(r.data.tags.get(CONFIRM_TAG) for r in self.runs)

    @property
    def averaged(self) -> list[Any]:
        """The runs the means are over: FINISHED with the selection metric; for a confirmed configuration only its
        confirmation runs (the search trial was selected on its own value, which would bias the mean up)."""
        return [r for r in self.runs if r.info.status == AVERAGED_STATUS and SELECTION_METRIC in r.data.metrics
                and (not self.confirmed or r.data.tags.get(CONFIRM_TAG))]

    @property
    def excluded(self) -> list[Any]:
        ids = {r.info.run_id for r in self.averaged}
        return [r for r in self.runs if r.info.run_id not in ids]

    def stat(self, metric: str) -> Stat:
        vals = [float(r.data.metrics[metric]) for r in self.averaged if metric in r.data.metrics]
        return Stat([v for v in vals if not math.isnan(v)])

    @property
    def seeds(self) -> list[str]:
        return sorted({r.data.params.get("optim.seed", "?") for r in self.averaged})


# ------------------------------------------------------------------------------------------- reading MLflow


def _experiment(client: Any, sweep: str) -> Any:
    names = [sweep] if sweep.startswith("stmi-") else [f"stmi-{sweep}", sweep]
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage != "deleted":
            return exp
    sweeps = sorted(e.name[len("stmi-"):] for e in client.search_experiments() if e.name.startswith("stmi-"))
    raise ReportError(f"no sweep {sweep!r} (MLflow experiment {names[0]!r}) at {client.tracking_uri}; sweeps there: "
                      f"{', '.join(sweeps) if sweeps else 'none'}")


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def config_key(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """What makes two runs the same configuration: their params minus the seed and the placement."""
    return tuple(sorted((k, v) for k, v in params.items()
                        if k not in IGNORED_PARAMS and not k.startswith(IGNORED_PREFIXES)))


def _label(group: Group, varying: list[str]) -> str:
    variants = sorted({r.data.tags.get("stmi.variant", "") for r in group.runs} - {""})
    if variants:
        return "/".join(variants)
    if not varying:
        return "recipe"
    return ", ".join(f"{k.split('.', 1)[-1]}={group.params.get(k, '-')}" for k in varying)


def group_runs(children: Sequence[Any]) -> list[Group]:
    """Child runs -> configurations, labelled by variant tag or by the params that differ between them."""
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for r in children:
        key = config_key(dict(r.data.params))
        groups.setdefault(key, Group(key, dict(key))).runs.append(r)
    out = list(groups.values())
    keys = sorted({k for g in out for k in g.params})
    varying = [k for k in keys if len({g.params.get(k) for g in out}) > 1]
    for g in out:
        g.label = _label(g, varying)
    return sorted(out, key=lambda g: (-g.stat(SELECTION_METRIC).mean if g.averaged else math.inf, g.label))


def champion(groups: Sequence[Group]) -> Group | None:
    """The configuration with the best mean validation mAP over its averaged seeds; when the sweep confirmed some
    configurations (``--confirm-top``), only among those, as the sweep chose (a single search trial does not
    compete with configurations measured over seeds)."""
    scored = [g for g in groups if g.stat(SELECTION_METRIC).n]
    if any(g.confirmed for g in scored):
        scored = [g for g in scored if g.confirmed]
    return max(scored, key=lambda g: g.stat(SELECTION_METRIC).mean) if scored else None


# ----------------------------------------------------------------------------------------- the paper's tables


def _b(params: dict[str, str], name: str, default: bool) -> bool:
    v = params.get(name)
    return default if v is None else v.strip().lower() in ("true", "1")


def ablation_rows(params: dict[str, str]) -> dict[str, str]:
    """The rows of tables 3-5 a configuration is (``{"table3": "+SFM", ...}``), from its params.

    Defaults of absent params are the model config's (SFM, STR on; CHI fusion; layer-wise SFM on all layers).
    """
    sfm, str_ = _b(params, "model.use_sfm", True), _b(params, "model.use_str", True)
    fusion = params.get("model.fusion", "chi")
    sharing, layers = params.get("model.sfm_sharing", "layer"), params.get("model.sfm_layers", "all")
    default_sfm = sharing == "layer" and layers == "all"
    rows: dict[str, str] = {}
    if not sfm and not str_ and fusion == "concat":
        rows["table3"] = "baseline"
    elif sfm and default_sfm and not str_ and fusion == "concat":
        rows["table3"] = "+SFM"
    elif sfm and default_sfm and str_ and fusion in ("concat", "chi"):
        rows["table3"] = "+SFM+STR" if fusion == "concat" else "+SFM+STR+CHI"
    if sfm and default_sfm and str_:
        rows["table4"] = {"concat": "concat", "mlp": "MLP", "mhsa": "MHSA", "chi": "CHI"}.get(fusion, "")
    if sfm and str_ and fusion == "chi":
        rows["table5"] = {("shared", "all"): "shared, all layers", ("layer", "early"): "early layers",
                          ("layer", "late"): "late layers", ("head", "all"): "head-wise",
                          ("layer", "all"): "layer-wise, all layers"}.get((sharing, layers), "")
    return {k: v for k, v in rows.items() if v}


def paper_figures() -> dict[str, Any]:
    return json.loads(PAPER_FIGURES.read_text(encoding="utf-8"))


def _row(label: str, group: Group | None, extra: Sequence[str] = ()) -> list[str]:
    if group is None:
        return [label, *(["-"] * len(METRICS)), "0", *extra]
    return [label, *(group.stat(m).fmt() for m in METRICS), str(group.stat("test_mAP").n), *extra]


def _status_note(group: Group) -> str:
    counts: dict[str, int] = {}
    for r in group.excluded:
        status = r.info.status if r.info.status != "FINISHED" else f"FINISHED, {_finished_note(group, r)}"
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def missing_rows(group: Group) -> list[tuple[list[str], dict[str, Any]]]:
    """The missing-modality table of a configuration (runs with ``eval.missing``, ``orchestration.train``'s
    ``log_missing``): one row per setting its runs logged, TOP-ReID's six and their mean first, then MDReID's
    any-to-any grid, mean +- std over the seeds; ``[]`` when its runs logged none."""
    prefix = MISSING_PREFIX + "/"
    names = {k[len(prefix):].rsplit("/", 1)[0] for r in group.averaged for k in r.data.metrics if k.startswith(prefix)}
    order = {"topreid": 0, "any2any": 1}
    subsets = ("RNT", "RN", "RT", "NT", "R", "N", "T")
    topreid_order = ("NT", "RT", "RN", "T", "N", "R", "mean")  # TOP-ReID's TEST.MISS order: r, n, t, rn, rt, nt

    def pos(seq: tuple[str, ...], item: str) -> int:
        return seq.index(item) if item in seq else len(seq)

    def key(name: str) -> tuple[int, int, int]:
        protocol, setting = name.split("/", 1)
        if protocol == "topreid":
            return order[protocol], pos(topreid_order, setting), 0
        q, _, g = setting.partition("_to_")
        return order.get(protocol, 2), pos(subsets, q), pos(subsets, g)

    out = []
    for name in sorted(names, key=key):
        protocol, setting = name.split("/", 1)
        q, _, g = setting.partition("_to_") if protocol == "any2any" else (setting, "", setting)
        if setting == "mean":
            q = g = "-"
        stats = {m: group.stat(f"{prefix}{name}/{m}") for m in ("mAP", "R1")}
        out.append(([protocol, setting, q, g, stats["mAP"].fmt(), stats["R1"].fmt(), str(stats["mAP"].n)],
                    {m: {"mean": st.mean, "std": st.std, "n": st.n} for m, st in stats.items()}))
    return out


def _finished_note(group: Group, run: Any) -> str:
    """Why a FINISHED run is not averaged in."""
    if group.confirmed and SELECTION_METRIC in run.data.metrics:
        return "search trial, selected on its own value: its confirmation seeds are averaged instead"
    return f"no {SELECTION_METRIC}"


def build_tables(groups_by_dataset: dict[str, list[Group]]) -> dict[str, Any]:
    """Every table of the report as ``{"name": {"title", "header", "rows", "numbers"}}`` (numbers as fractions)."""
    figs = paper_figures()
    tables: dict[str, Any] = {}
    head = ["configuration", "test mAP", "R1", "R5", "R10", "n"]
    for dataset, groups in groups_by_dataset.items():
        champ = champion(groups)
        pub = figs["results"].get(dataset)
        rows = []
        numbers: dict[str, Any] = {}
        if champ is not None:
            rows.append(_row(f"ours: {champ.label} (champion, selected on validation)", champ))
            numbers["champion"] = {"label": champ.label, "seeds": champ.seeds,
                                   "val_mAP": champ.stat(SELECTION_METRIC).mean,
                                   **{m: {"mean": champ.stat(m).mean, "std": champ.stat(m).std,
                                          "n": champ.stat(m).n} for m in METRICS}}
        else:
            rows.append(["ours: no finished run with a validation metric", "-", "-", "-", "-", "0"])
        if pub:
            for method, vals in pub["methods"].items():
                cells = dict(zip(pub["metrics"], vals))
                rows.append([f"{method} (published, selected on test; {pub['source']})",
                             *(f"{cells[m]:.1f}" if m in cells else "-" for m in ("mAP", "R1", "R5", "R10")), "-"])
        tables[f"{dataset}/champion"] = {"title": f"{dataset}: champion", "header": head, "rows": rows,
                                         "numbers": numbers}
        trials = [[g.label, g.stat(SELECTION_METRIC).fmt(), *(g.stat(m).fmt() for m in METRICS),
                   str(g.stat(SELECTION_METRIC).n), ",".join(g.seeds) or "-", _status_note(g) or "-"]
                  for g in groups]
        if champ is not None and (missing := missing_rows(champ)):
            tables[f"{dataset}/missing"] = {
                "title": f"{dataset}: champion ({champ.label}) with missing modalities (test; eval.missing)",
                "header": ["protocol", "setting", "query", "gallery", "test mAP", "R1", "n"],
                "rows": [row for row, _ in missing],
                "numbers": {f"{row[0]}/{row[1]}": nums for row, nums in missing}}
        tables[f"{dataset}/configurations"] = {
            "title": f"{dataset}: every configuration (best mean validation mAP first)",
            "header": ["configuration", "val mAP", "test mAP", "R1", "R5", "R10", "n", "seeds", "not averaged"],
            "rows": trials,
            "numbers": {g.label: {m: {"mean": g.stat(m).mean, "std": g.stat(m).std, "n": g.stat(m).n}
                                  for m in (SELECTION_METRIC, *METRICS)} for g in groups}}

        by_table: dict[str, dict[str, list[Group]]] = {}
        for g in groups:
            for t, row in ablation_rows(g.params).items():
                by_table.setdefault(t, {}).setdefault(row, []).append(g)
        for t, spec in figs["ablations"].items():
            found = by_table.get(t, {})
            if len(found) < 2:  # not an ablation of this table
                continue
            rows, numbers = [], {}
            for row_name, pub_vals in spec["rows"].items():
                cands = found.get(row_name, [])
                g = champion(cands) or (cands[0] if cands else None)
                pub_cells = dict(zip(spec["metrics"], pub_vals))
                note = f"{len(cands)} configurations, best by val shown" if len(cands) > 1 else ""
                rows.append(_row(row_name, g, [*(f"{pub_cells[m]:.1f}" if m in pub_cells else "-"
                                                 for m in ("mAP", "R1")), note]))
                if g is not None:
                    numbers[row_name] = {"label": g.label, **{m: {"mean": g.stat(m).mean, "std": g.stat(m).std,
                                                                  "n": g.stat(m).n} for m in METRICS}}
            tables[f"{dataset}/{t}"] = {"title": f"{dataset}: {spec['title']} ({spec['source']}; paper selected "
                                                 f"on test)",
                                        "header": [*head, "paper mAP", "paper R1", "note"], "rows": rows,
                                        "numbers": numbers}
    return tables


# ----------------------------------------------------------------------------------------------- rendering


def _markdown(sweep: str, tables: dict[str, Any], excluded: list[str]) -> str:
    out = [f"# STMI sweep {sweep!r}: results", "",
           "Ours: mean ± sample std over the seeds of a configuration (n = finished runs averaged), in percent; "
           "the champion is the configuration with the best mean validation mAP. Published figures were selected "
           "on the test set.", ""]
    for t in tables.values():
        out += [f"## {t['title']}", "", "| " + " | ".join(t["header"]) + " |",
                "|" + "|".join("---" for _ in t["header"]) + "|"]
        out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in t["rows"]]
        out.append("")
    if excluded:
        out += ["## Runs not averaged (running, failed, stopped early or without metrics)", ""]
        out += [f"- {e}" for e in excluded]
        out.append("")
    return "\n".join(out)


def _html(sweep: str, tables: dict[str, Any], excluded: list[str], png: Path | None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>STMI sweep {html.escape(sweep)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "th{background:#eee}</style></head><body>",
             f"<h1>STMI sweep {html.escape(sweep)!s}: results</h1>",
             "<p>Ours: mean ± sample std over the seeds of a configuration (n = finished runs averaged), in percent; "
             "the champion has the best mean validation mAP. Published figures were selected on the test set.</p>"]
    if png is not None and png.exists():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<img alt='test mAP per configuration' src='data:image/png;base64,{data}'>")
    for t in tables.values():
        parts.append(f"<h2>{html.escape(t['title'])}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in t["header"]) + "</tr>")
        for row in t["rows"]:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    if excluded:
        parts.append("<h2>Runs not averaged</h2><ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in excluded)
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _chart(tables: dict[str, Any], path: Path) -> Path | None:
    """Bar chart (test mAP, error bar = one std) of each ablation table, else of each dataset's configurations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in tables.items() if k.split("/")[1].startswith("table")]
    if not panels:
        panels = [(k, t) for k, t in tables.items() if k.endswith("/configurations")]
    panels = [(k, t) for k, t in panels if t["numbers"]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (key, t) in zip(axes[0], panels):
        names = list(t["numbers"])[:12]
        means = [100 * t["numbers"][n]["test_mAP"]["mean"] for n in names]
        stds = [100 * (t["numbers"][n]["test_mAP"]["std"] if t["numbers"][n]["test_mAP"]["n"] > 1 else 0)
                for n in names]
        ax.bar(range(len(names)), [0 if math.isnan(m) else m for m in means],
               yerr=[0 if math.isnan(s) else s for s in stds], capsize=4, color="#4c72b0")
        if "paper mAP" in t["header"]:  # the published figure of each row, as a marker
            col = t["header"].index("paper mAP")
            paper = {row[0]: row[col] for row in t["rows"]}
            xs = [i for i, n in enumerate(names) if paper.get(n, "-") != "-"]
            ax.scatter(xs, [float(paper[names[i]]) for i in xs], color="#c44e52", marker="D", zorder=3,
                       label="paper (selected on test)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test mAP (%)")
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- the API


def build_report(sweep: str, out_dir: str | Path, client: Any = None, log_to_parents: bool = True
                 ) -> dict[str, Path]:
    """Read the sweep's runs, write the report files to ``out_dir``, log them to the parent runs.

    Args:
        sweep: sweep name (experiment ``stmi-<sweep>``) or the experiment name itself.
        client: an ``MlflowClient`` (default: one on ``MLFLOW_TRACKING_URI``).
        log_to_parents: log the files (``report/``) and the tables (MLflow tables) to every parent run.

    Returns:
        ``{"markdown", "html", "png" (when there is a number to plot), "json"}`` -> path.

    Raises:
        ReportError: unknown sweep (the message lists the sweeps there are) or no parent run in it.
    """
    if client is None:
        from orchestration import tracking

        client = tracking.client()
    exp = _experiment(client, sweep)
    runs = _all_runs(client, exp.experiment_id)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("stmi.role") == "parent"}
    if not parents:
        raise ReportError(f"sweep {sweep!r} (experiment {exp.name!r}) has no parent run (tag stmi.role=parent): "
                          f"is it a sweep made by orchestration.sweep?")
    children: dict[str, list[Any]] = {}
    for r in runs:
        pid = r.data.tags.get("mlflow.parentRunId")
        if pid in parents:
            children.setdefault(pid, []).append(r)
    datasets = {pid: p.data.tags.get("stmi.dataset", p.info.run_name) for pid, p in parents.items()}
    groups = {datasets[pid]: group_runs(children.get(pid, [])) for pid in sorted(parents, key=datasets.get)}
    tables = build_tables(groups)
    excluded = [f"{ds}: {r.info.run_name} ({r.info.status}"
                f"{', ' + _finished_note(g, r) if r.info.status == AVERAGED_STATUS else ''})"
                for ds, gs in groups.items() for g in gs for r in g.excluded]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = exp.name[len("stmi-"):] if exp.name.startswith("stmi-") else exp.name
    paths: dict[str, Path] = {}
    png = _chart(tables, out / "report.png")
    if png is not None:
        paths["png"] = png
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(_markdown(name, tables, excluded), encoding="utf-8")
    paths["html"] = out / "report.html"
    paths["html"].write_text(_html(name, tables, excluded, png), encoding="utf-8")
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps({"sweep": name, "experiment_id": exp.experiment_id, "tables": tables,
                                         "not_averaged": excluded}, indent=1), encoding="utf-8")
    if log_to_parents:  # through RunLogger, like every MLflow side effect of the platform
        from orchestration.tracking import RunLogger

        for pid, dataset in datasets.items():
            logger = RunLogger(pid, client._tracking_client.tracking_uri)
            for p in paths.values():
                logger.log_artifact(p, "report")
            for key, t in tables.items():
                if key.split("/")[0] != dataset:
                    continue
                cols = {h: [row[i] if i < len(row) else "" for row in t["rows"]] for i, h in enumerate(t["header"])}
                logger.log_table(cols, f"report/{key.split('/')[1]}.json")
            logger.close()
    return paths


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.report",
        description="Write a sweep's results as the paper's tables (Markdown, HTML, PNG, JSON) from MLflow: per "
                    "dataset the champion configuration (best mean validation mAP over its seeds) with test mAP / "
                    "R1 / R5 / R10 as mean ± std beside the published figures, every configuration, and for an "
                    "ablation sweep tables 3, 4 and 5 with the paper's row names. Logged to the sweep's parent runs "
                    "(artifacts under report/ and MLflow tables) unless --no-log.",
        epilog="Examples:\n"
               "  python -m orchestration.report --sweep demo-20261201\n"
               "  python -m orchestration.report --sweep ablation --out /tmp/report --no-log",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="sweep name (MLflow experiment stmi-<NAME>)")
    p.add_argument("--out", default=None, help="output folder (default ./reports/<NAME>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--no-log", action="store_true", help="only write the files; log nothing to MLflow")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point (console script ``stmi-report``); returns the exit status."""
    args = parser().parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("error: no MLflow server: pass --tracking-uri or set MLFLOW_TRACKING_URI (the local stack prints it)",
              file=sys.stderr)
        return 2
    from orchestration import tracking

    out = Path(args.out or Path("reports") / args.sweep)
    try:
        paths = build_report(args.sweep, out, tracking.client(uri), log_to_parents=not args.no_log)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind:<8} {path}")
    print(paths["markdown"].read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
