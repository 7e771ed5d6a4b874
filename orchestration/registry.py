"""Packaging an exported STMI checkpoint as the MLflow pyfunc of ``orchestration.serving``, and the model registry.

:func:`log_model` logs ``checkpoints/best.pt`` (``stmi.engine.export_model``) into a run as the served pyfunc, with
its signature (from ``STMIServingModel.predict``'s type hints), an input example, pinned requirements and the
project's code; :func:`register_champion` does that and registers the result as ``stmi-<dataset>`` with the alias
``champion`` (what ``mlflow models serve -m models:/stmi-<dataset>@champion`` serves). Every MLflow call goes through
``orchestration.tracking.RunLogger``.

Example (a finished training run's weights, from Python)::

    logger = RunLogger(run_id)
    ckpt = logger.download_artifact("checkpoints/best.pt", "/tmp")
    champion = register_champion(ckpt, "rgbnt201", logger)
"""

from __future__ import annotations

import dataclasses
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from orchestration.serving import CHECKPOINT_ARTIFACT, STMIServingModel, make_example_row
from orchestration.tracking import RunLogger
from stmi.config import from_dict
from stmi.engine import load_exported

REQUIREMENTS: tuple[str, ...] = ("mlflow", "torch", "torchvision", "open_clip_torch", "numpy", "pillow", "pyyaml",
                                 "tqdm", "scipy")
"""Distributions pinned (at their installed versions) in the model's requirements."""
ALIAS = "champion"
"""The alias the best model of a dataset carries."""


@dataclasses.dataclass(frozen=True)
class Champion:
    """A registered model version."""

    name: str
    """``stmi-<dataset>``."""
    version: int
    model: Any
    """MLflow's ``ModelInfo`` of the logged pyfunc (``model_uri``, ``signature`` ...)."""


def registered_name(dataset: str) -> str:
    """The registry name of a dataset's models."""
    return f"stmi-{dataset}"


def _pip_requirements() -> list[str]:
    """The model's runtime distributions pinned to the installed versions (no slow requirement inference)."""
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _code_paths() -> list[str]:
    """The ``stmi`` and ``orchestration`` packages, copied with the model so its code matches its weights."""
    import orchestration
    import stmi

    return [str(Path(stmi.__file__).parent), str(Path(orchestration.__file__).parent)]


def log_model(checkpoint_path: str | Path, logger: RunLogger, name: str = "model",
              input_example: list[dict[str, Any]] | None = None) -> Any:
    """Log an exported checkpoint into ``logger``'s run as the STMI pyfunc.

    The checkpoint becomes the model artifact ``checkpoint``; the ``stmi`` and ``orchestration`` packages are
    logged as ``code_paths`` so the served code is the code that trained the weights (``--env-manager local``
    then needs only the third-party packages of the venv). The run keeps its status (see ``RunLogger.log_pyfunc``).

    Args:
        checkpoint_path: an ``stmi.engine.export_model`` file (a training run's ``checkpoints/best.pt``).
        name: the model's name inside the run.
        input_example: rows for the example; default one ``serving.make_example_row`` row.

    Returns:
        MLflow's ``ModelInfo``.

    Raises:
        ValueError: not an exported STMI checkpoint (names the keys found).
    """
    checkpoint_path = Path(checkpoint_path)
    cfg = from_dict(load_exported(checkpoint_path)["config"])
    return logger.log_pyfunc(
        name=name,
        python_model=STMIServingModel(),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
        code_paths=_code_paths(),
        input_example=input_example if input_example is not None else [make_example_row(cfg)],
        pip_requirements=_pip_requirements(),
        metadata={"stmi_image_size": list(cfg.model.image_size), "stmi_num_cameras": cfg.model.num_cameras,
                  "stmi_recipe": cfg.recipe, "stmi_dataset": cfg.data.dataset},
    )


def register_champion(checkpoint_path: str | Path, dataset: str, logger: RunLogger,
                      source_run_id: str | None = None, selection: str = "") -> Champion:
    """Log the checkpoint as the pyfunc ``champion`` in ``logger``'s run, register it as ``stmi-<dataset>``, move
    the ``champion`` alias to the new version and tag the run with it.

    Args:
        source_run_id: the run that trained the weights (a sweep's best trial), recorded as a tag.
        selection: how the weights were chosen (e.g. the configuration's mean over seeds), appended to the
            version's description.
    """
    info = log_model(checkpoint_path, logger, name=ALIAS)
    name = registered_name(dataset)
    version = logger.register_model(info.model_uri, name, ALIAS)
    tags: dict[str, Any] = {"stmi.champion_version": version}
    if source_run_id:
        tags["stmi.champion_trial_run"] = source_run_id
    logger.set_tags(tags)
    vtags, description = version_facts(logger, source_run_id or logger.run_id, dataset)
    logger.describe_model_version(name, version, vtags, f"{description} {selection}".strip())
    return Champion(name=name, version=version, model=info)


#: The metrics of the trained run a registered version carries as tags.
VERSION_METRICS = ("best_val_mAP", "best_epoch", "test_mAP", "test_R1", "test_R5", "test_R10", "untrained_val_mAP")


def version_facts(logger: RunLogger, trained_run_id: str, dataset: str) -> tuple[dict[str, Any], str]:
    """Tags and a Markdown description of a registered version, from the run that trained its weights: validation
    and test metrics, the data fingerprints, the code version, the sweep and trial, and how to re-run it."""
    run = logger.client.get_run(trained_run_id)
    m, t = run.data.metrics, run.data.tags
    tags: dict[str, Any] = {f"metric.{k}": m[k] for k in VERSION_METRICS if k in m}
    tags.update({k: v for k, v in t.items() if k.startswith(("stmi.data.fingerprint.", "stmi.code."))
                 or k in ("stmi.seed", "stmi.confirm_of", "stmi.variant")})
    tags.update({"stmi.dataset": dataset, "stmi.trained_run": trained_run_id, "stmi.sweep": t.get("stmi.sweep", ""),
                 "stmi.trial": t.get("stmi.trial_id", t.get("mlflow.runName", ""))})

    def fmt(k: str) -> str:
        return f"{m[k]:.4f}" if k in m else "n/a"
    description = (
        f"STMI on {dataset}, trained by run `{trained_run_id}` (sweep `{tags['stmi.sweep'] or '-'}`, trial "
        f"`{tags['stmi.trial'] or '-'}`). Selected on validation: best val mAP {fmt('best_val_mAP')} at epoch "
        f"{fmt('best_epoch')}; test mAP {fmt('test_mAP')}, R1 {fmt('test_R1')}, R5 {fmt('test_R5')}, R10 "
        f"{fmt('test_R10')}. Code {t.get('stmi.code.version', 'unknown')}; data train "
        f"{t.get('stmi.data.fingerprint.train', 'unknown')}. Re-run: `python orchestration/train.py --rerun "
        f"{trained_run_id}`.")
    return tags, description
