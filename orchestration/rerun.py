"""``train.py --rerun RUN_ID`` (or ``--rerun models:/stmi-rgbnt201@champion``): run a logged run again.

The exact config comes back from the run's ``config.json`` artifact (logged when the run starts); the code version
and the data fingerprints the run recorded (``stmi.code.*`` and ``stmi.data.fingerprint.<split>`` tags, see
``stmi.provenance`` and ``stmi.data.fingerprint``) are compared with the current code and data, and every
difference is said in one line (``--strict`` refuses to run then). The new run is tagged ``stmi.rerun_of``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from orchestration.tracking import RunLogger
from stmi.config import STMIConfig, from_dict

RERUN_TAG = "stmi.rerun_of"


class RerunError(ValueError):
    """The run to re-run cannot be found or rebuilt; the message is one line that says why and what to do."""


def resolve_run(cl: Any, ref: str) -> Any:
    """The MLflow run ``ref`` names: a run id, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.

    A registered champion is logged in its sweep's parent run, which names the trial that trained the weights
    (``stmi.champion_trial_run``): that trial is the run returned.
    """
    from mlflow.exceptions import MlflowException

    run_id = ref
    if ref.startswith("models:/"):
        spec = ref[len("models:/"):]
        try:
            if "@" in spec:
                name, alias = spec.split("@", 1)
                mv = cl.get_model_version_by_alias(name, alias)
            else:
                name, _, version = spec.partition("/")
                mv = cl.get_model_version(name, version)
        except MlflowException as e:
            raise RerunError(f"no registered model version {ref} at {cl._tracking_client.tracking_uri} "
                             f"({e.error_code}); list them in the MLflow UI's Models page") from None
        run_id = mv.run_id
    try:
        run = cl.get_run(run_id)
    except MlflowException:
        raise RerunError(f"no MLflow run {run_id!r} at {cl._tracking_client.tracking_uri}; copy the run id from the "
                         f"MLflow UI (run page, 'Run ID') or pass models:/NAME@ALIAS") from None
    trial = run.data.tags.get("stmi.champion_trial_run")
    return cl.get_run(trial) if trial else run


def run_config(run: Any, tracking_uri: str | None) -> STMIConfig:
    """The resolved config the run trained with (its ``config.json`` artifact)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # errors stay one line on stderr
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = RunLogger(run.info.run_id, tracking_uri).download_artifact("config.json", tmp)
            data = json.loads(Path(path).read_text())
        except Exception as e:  # noqa: BLE001 - missing artifact, unreachable store
            raise RerunError(f"run {run.info.run_id} has no readable config.json artifact ({type(e).__name__}); only "
                             f"runs logged by orchestration/train.py or sweep.py can be re-run") from None
    return from_dict(data)


def with_data_root(cfg: STMIConfig, data_root: str | None) -> STMIConfig:
    """``cfg`` reading its data from ``data_root`` instead (when given: the data moved)."""
    if not data_root:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(Path(data_root).absolute())))


def differences(run: Any, cfg: STMIConfig) -> list[str]:
    """What differs between the run's recorded code and data and the current ones, one line each.

    Raises:
        RerunError: the data the run read is not where it was (names the folder and ``--data-root``).
    """
    from stmi import provenance
    from stmi.data import load_dataset
    from stmi.data.fingerprint import fingerprint_dataset
    from stmi.data.layouts import DatasetError

    tags = run.data.tags
    out: list[str] = []
    now = provenance.code_version()
    then_hash = tags.get("stmi.code.source_hash")
    if then_hash is None:
        out.append("code: the run recorded no code version")
    elif then_hash != now.source_hash:
        out.append(f"code: the run ran {tags.get('stmi.code.version', then_hash)}, this is {now.label} "
                   f"(source hash {then_hash} -> {now.source_hash})")
    try:
        current = fingerprint_dataset(load_dataset(cfg.data.dataset, cfg.data.root))
    except DatasetError as e:
        raise RerunError(f"the data of run {run.info.run_id} was read from {cfg.data.root}, which cannot be read "
                         f"now ({str(e).splitlines()[0]}); pass --data-root with where it is") from None
    for split, fp in current.items():
        then = tags.get(f"stmi.data.fingerprint.{split}")
        if then is None:
            out.append(f"data: the run recorded no fingerprint of its {split} split")
        elif then != fp.digest:
            out.append(f"data: the {split} split changed since the run ({then} -> {fp.digest}; {fp.files} files)")
    return out
