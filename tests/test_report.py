"""``orchestration.report`` against a real MLflow server: runs with known metrics in, the paper's tables out."""

from __future__ import annotations

import json
import statistics
import time
import uuid
from pathlib import Path

import pytest

from orchestration import tracking
from orchestration.report import ReportError, ablation_rows, build_report, config_key, main

pytestmark = pytest.mark.integration

ROWS = {  # table 3 as in search_spaces/ablation.yaml
    "t3_A_baseline": {"model.use_sfm": "False", "model.use_str": "False", "model.fusion": "concat"},
    "t3_B_sfm": {"model.use_sfm": "True", "model.use_str": "False", "model.fusion": "concat"},
    "t3_C_sfm_str": {"model.use_sfm": "True", "model.use_str": "True", "model.fusion": "concat"},
    "t3_D_full": {"model.use_sfm": "True", "model.use_str": "True", "model.fusion": "chi"},
}
COMMON = {"model.sfm_sharing": "layer", "model.sfm_layers": "all", "optim.lr": "0.0003", "data.dataset": "rgbnt201"}


def _run(cl, exp: str, parent: str, name: str, params: dict[str, str], metrics: dict[str, float],  # noqa: ANN001
         status: str = "FINISHED", variant: str | None = None) -> str:
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent, "stmi.trial_id": name, **({"stmi.variant": variant} if variant else {})}
    run = cl.create_run(exp, run_name=name, tags=tags)
    now = int(time.time() * 1000)
    cl.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                 params=[Param(k, v) for k, v in params.items()])
    if status != "RUNNING":
        cl.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _metrics(val: float, test: float) -> dict[str, float]:
    return {"best_val_mAP": val, "test_mAP": test, "test_R1": test + 0.1, "test_R5": test + 0.2,
            "test_R10": test + 0.25}


def _missing_metrics(test: float) -> dict[str, float]:
    """What ``orchestration.train.log_missing`` logs for a run whose complete test mAP is ``test``: the names come
    from ``stmi.eval_missing.missing_metrics`` itself, the values are known (setting i of TOP-ReID: ``test - 0.01 i``;
    any-to-any ``q_to_g``: ``test - 0.001 (7 q + g)``)."""
    from stmi.eval_missing import SUBSETS, any2any_settings, missing_metrics, topreid_settings

    def res(v: float) -> dict[str, float]:
        return {"mAP": v, "R1": v + 0.1, "R5": v + 0.2, "R10": v + 0.25, "mINP": v / 2}

    results = {"topreid": {st.name: res(test - 0.01 * i) for i, st in enumerate(topreid_settings())},
               "any2any": {st.name: res(test - 0.001 * (7 * SUBSETS.index(st.query) + SUBSETS.index(st.gallery)))
                           for st in any2any_settings()}}
    return missing_metrics(results)


@pytest.fixture
def sweep(mlflow_server, platform_env) -> tuple[str, object, dict]:  # noqa: ANN001
    """An ablation sweep on rgbnt201 (4 rows x 3 seeds + a running and a failed run) and an lr sweep on msvr310."""
    cl = tracking.client(mlflow_server.tracking_uri)
    name = f"report-{uuid.uuid4().hex[:8]}"
    exp = cl.create_experiment(f"stmi-{name}")
    expect: dict = {"t3": {}, "msvr": {}}
    p201 = cl.create_run(exp, run_name="rgbnt201", tags={"stmi.role": "parent", "stmi.dataset": "rgbnt201"})
    p201_id = p201.info.run_id
    for i, (variant, ov) in enumerate(ROWS.items()):
        tests = [0.30 + 0.1 * i + 0.01 * s for s in range(3)]
        for s, t in enumerate(tests):
            extra = _missing_metrics(t) if variant == "t3_D_full" else {}  # only the champion ran eval.missing
            _run(cl, exp, p201_id, f"{variant}-s{s}", {**COMMON, **ov, "optim.seed": str(s), "train.world_size": "1"},
                 {**_metrics(0.5 + 0.1 * i + 0.02 * s, t), **extra}, variant=variant)
        expect["t3"][variant] = tests
    # seed 3 of the full model still running (a huge metric that must not be averaged in); one failed run
    _run(cl, exp, p201_id, "t3_D_full-s3", {**COMMON, **ROWS["t3_D_full"], "optim.seed": "3"},
         _metrics(0.99, 0.99), status="RUNNING", variant="t3_D_full")
    _run(cl, exp, p201_id, "t3_A_baseline-s9", {**COMMON, **ROWS["t3_A_baseline"], "optim.seed": "9"},
         _metrics(0.99, 0.99), status="FAILED", variant="t3_A_baseline")

    p310 = cl.create_run(exp, run_name="msvr310", tags={"stmi.role": "parent", "stmi.dataset": "msvr310"})
    # lr 1e-3 has the best single validation run but the worse MEAN: the champion is lr 3e-4
    vals = {"0.001": [0.9, 0.2], "0.0003": [0.7, 0.65]}
    tests = {"0.001": [0.5, 0.1], "0.0003": [0.4, 0.42]}
    for lr in vals:
        for s in range(2):
            _run(cl, exp, p310.info.run_id, f"lr{lr}-s{s}",
                 {**COMMON, **ROWS["t3_D_full"], "data.dataset": "msvr310", "optim.lr": lr, "optim.seed": str(s)},
                 _metrics(vals[lr][s], tests[lr][s]))
    expect["msvr"] = tests["0.0003"]
    return name, cl, {**expect, "parents": {"rgbnt201": p201_id, "msvr310": p310.info.run_id}}


def test_report_tables_equal_the_runs(sweep, tmp_path: Path) -> None:  # noqa: ANN001
    name, cl, expect = sweep
    paths = build_report(name, tmp_path / "out", cl)
    assert {"markdown", "html", "png", "json"} <= set(paths) and all(p.exists() for p in paths.values())
    rep = json.loads(paths["json"].read_text())
    tables = rep["tables"]

    t3 = tables["rgbnt201/table3"]["numbers"]
    for row, variant in zip(("baseline", "+SFM", "+SFM+STR", "+SFM+STR+CHI"), ROWS):
        vals = expect["t3"][variant]
        got = t3[row]["test_mAP"]
        assert got["n"] == 3 and got["mean"] == pytest.approx(statistics.fmean(vals)), (row, got)
        assert got["std"] == pytest.approx(statistics.stdev(vals))
        assert t3[row]["test_R10"]["mean"] == pytest.approx(statistics.fmean(vals) + 0.25)
    assert tables["rgbnt201/table4"]["numbers"].keys() == {"concat", "CHI"}  # t3_C is table 4 A, t3_D table 4 D
    champ = tables["rgbnt201/champion"]["numbers"]["champion"]
    assert champ["label"] == "t3_D_full" and champ["seeds"] == ["0", "1", "2"]  # the running seed 3 is not in

    # The champion's missing-modality table: TOP-ReID's six in TEST.MISS order and their mean, then any-to-any.
    miss = tables["rgbnt201/missing"]
    settings = [(r[0], r[1]) for r in miss["rows"]]
    assert settings[:7] == [("topreid", n) for n in ("NT", "RT", "RN", "T", "N", "R", "mean")]
    assert len(settings) == 7 + 49
    assert settings[7] == ("any2any", "RNT_to_RNT") and settings[-1] == ("any2any", "T_to_T")
    full = expect["t3"]["t3_D_full"]
    got = miss["numbers"]["topreid/RN"]["mAP"]  # TEST.MISS t: the third setting, test - 0.02
    assert got["n"] == 3 and got["mean"] == pytest.approx(statistics.fmean(full) - 0.02)
    assert got["std"] == pytest.approx(statistics.stdev(full))
    assert miss["numbers"]["topreid/mean"]["mAP"]["mean"] == pytest.approx(statistics.fmean(full) - 0.025)
    assert miss["numbers"]["any2any/RN_to_T"]["R1"]["mean"] == pytest.approx(statistics.fmean(full) - 0.013 + 0.1)
    assert ["any2any", "NT_to_R", "NT", "R"] == miss["rows"][settings.index(("any2any", "NT_to_R"))][:4]
    assert "msvr310/missing" not in tables  # its runs did not run eval.missing
    msvr = tables["msvr310/champion"]["numbers"]["champion"]
    assert "lr=0.0003" in msvr["label"], msvr
    assert msvr["test_mAP"]["mean"] == pytest.approx(statistics.fmean(expect["msvr"]))
    assert msvr["test_mAP"]["std"] == pytest.approx(statistics.stdev(expect["msvr"]))
    assert "rgbnt201/table3" in tables and "msvr310/table3" not in tables  # one configuration row is no ablation

    md = paths["markdown"].read_text()
    assert "with missing modalities" in md and "| topreid | mean | - | - |" in md
    assert "+SFM+STR+CHI" in md and "81.2" in md and "IDEA" in md and "selected on test" in md
    assert f"{100 * statistics.fmean(expect['t3']['t3_B_sfm']):.1f} ± " in md
    assert "t3_D_full-s3 (RUNNING)" in md and "t3_A_baseline-s9 (FAILED)" in md
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and "<table>" in page and "../" not in page

    for dataset, pid in expect["parents"].items():
        files = {a.path for a in cl.list_artifacts(pid, "report")}
        assert {"report/report.md", "report/report.html", "report/report.png", "report/champion.json"} <= files
    assert {"report/table3.json", "report/missing.json"} <= {
        a.path for a in cl.list_artifacts(expect["parents"]["rgbnt201"], "report")}
    local = cl.download_artifacts(expect["parents"]["rgbnt201"], "report/table3.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert "+SFM" in json.dumps(table) and "76.1" in json.dumps(table)


def test_unknown_sweep_lists_the_sweeps(sweep, mlflow_server, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    name, cl, _ = sweep
    with pytest.raises(ReportError, match=name):
        build_report("no-such-sweep", tmp_path, cl)
    assert main(["--sweep", "no-such-sweep", "--tracking-uri", mlflow_server.tracking_uri, "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no sweep 'no-such-sweep'" in err and name in err
    assert main(["--sweep", name, "--tracking-uri", mlflow_server.tracking_uri, "--out", str(tmp_path / "cli"),
                 "--no-log"]) == 0
    assert (tmp_path / "cli" / "report.md").exists() and "table 3" in capsys.readouterr().out.lower()


def test_configuration_key_and_rows() -> None:
    a = {"model.fusion": "chi", "optim.seed": "1", "train.world_size": "2", "optim.lr": "0.1"}
    assert config_key(a) == config_key({**a, "optim.seed": "7", "train.world_size": "1"})
    assert config_key(a) != config_key({**a, "optim.lr": "0.2"})
    assert ablation_rows({"model.use_sfm": "False", "model.use_str": "False", "model.fusion": "concat"}) == {
        "table3": "baseline"}
    assert ablation_rows({"model.fusion": "mhsa"}) == {"table4": "MHSA"}
    assert ablation_rows({"model.sfm_layers": "early"}) == {"table5": "early layers"}
    assert ablation_rows({}) == {"table3": "+SFM+STR+CHI", "table4": "CHI", "table5": "layer-wise, all layers"}


def test_confirmed_configuration_is_averaged_over_its_confirmation_seeds(mlflow_server, platform_env,
                                                                          tmp_path: Path) -> None:
    """After `sweep.py --confirm-top`: the champion is among the confirmed configurations (an unconfirmed lucky
    search trial does not compete), and a confirmed one is averaged over its confirmation runs, not its search trial."""
    cl = tracking.client(mlflow_server.tracking_uri)
    name = f"report-confirm-{uuid.uuid4().hex[:8]}"
    exp = cl.create_experiment(f"stmi-{name}")
    parent = cl.create_run(exp, run_name="rgbnt201", tags={"stmi.role": "parent", "stmi.dataset": "rgbnt201"})
    pid = parent.info.run_id
    base = {**COMMON, **ROWS["t3_D_full"], "optim.seed": "1111"}
    _run(cl, exp, pid, "lucky", {**base, "optim.lr": "0.002"}, _metrics(0.99, 0.9))  # not confirmed: one seed only
    for trial, lr, vals in (("t1", "0.001", [0.60, 0.64]), ("t2", "0.0005", [0.70, 0.66])):
        _run(cl, exp, pid, trial, {**base, "optim.lr": lr}, _metrics(0.95, 0.95))  # the search trial: selected on
        for s, v in enumerate(vals):
            run_id = _run(cl, exp, pid, f"{trial}-s{1112 + s}", {**base, "optim.lr": lr, "optim.seed": str(1112 + s)},
                          _metrics(v, v - 0.2))
            cl.set_tag(run_id, "stmi.confirm_of", trial)
    tables = json.loads(build_report(name, tmp_path, cl, log_to_parents=False)["json"].read_text())["tables"]
    champ = tables["rgbnt201/champion"]["numbers"]["champion"]
    assert "lr=0.0005" in champ["label"] and champ["seeds"] == ["1112", "1113"], champ
    assert champ["val_mAP"] == pytest.approx(0.68) and champ["test_mAP"]["mean"] == pytest.approx(0.48)
    assert champ["test_mAP"]["std"] == pytest.approx(statistics.stdev([0.5, 0.46]))
    md = (tmp_path / "report.md").read_text()
    assert "t2 (FINISHED, search trial, selected on its own value" in md and "lucky (" not in md
