"""The one MLflow helper: every MLflow side effect of the platform goes through :class:`RunLogger`.

Runs are found by a deterministic key (tag ``stmi.run_key``: sweep/dataset/trial), never created twice: a
restarted worker group, a resumed trial or a resumed sweep all log into the run they started. Epoch metrics are
idempotent: a step already on the server is not logged again, so an epoch that Ray Train redoes after a worker
failure is never counted twice, and steps held in a checkpoint but missing on the server (a crash between the
checkpoint and the log call) are filled in on restore. Values of secret environment variables are redacted from
everything logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestration.settings import SECRET_ENV, redact

log = logging.getLogger(__name__)
RUN_KEY_TAG = "stmi.run_key"
STEP_METRIC = "epoch"


def client(tracking_uri: str | None = None) -> Any:
    """An ``MlflowClient`` on ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def find_experiment(cl: Any, name: str) -> Any | None:
    """Experiment ``name`` (active or deleted), or None."""
    return cl.get_experiment_by_name(name)


def get_or_create_experiment(cl: Any, name: str) -> str:
    """The id of experiment ``name``, created when absent (restored when deleted)."""
    exp = cl.get_experiment_by_name(name)
    if exp is None:
        return cl.create_experiment(name)
    if exp.lifecycle_stage == "deleted":
        cl.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_run(cl: Any, experiment_id: str, run_key: str) -> Any | None:
    """The run tagged with ``run_key`` in the experiment, or None."""
    runs = cl.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=2)
    return runs[0] if runs else None


def running_children(cl: Any, experiment_id: str, parent_run_id: str) -> list[str]:
    """Ids of the RUNNING child runs of ``parent_run_id`` (a sweep's trials still in progress)."""
    runs = cl.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                                         f"attributes.status = 'RUNNING'", max_results=1000)
    return [r.info.run_id for r in runs]


def get_or_create_run(cl: Any, experiment_id: str, run_key: str, run_name: str, parent_run_id: str | None = None,
                      tags: Mapping[str, str] | None = None) -> str:
    """The run id for ``run_key``: the existing run (set back to RUNNING) or a new one.

    Args:
        run_key: Deterministic identity, e.g. ``"sweep-1/rgbnt201/trial_00003"``.
        parent_run_id: Makes the run a child (nested under the parent in the MLflow UI).
    """
    found = find_run(cl, experiment_id, run_key)
    if found is not None:
        if found.info.status != "RUNNING":
            cl.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    all_tags = {RUN_KEY_TAG: run_key, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = cl.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def _clean(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return redact(text)[:6000]


class RunLogger:
    """Logs one MLflow run (used by rank 0 and by drivers; never by other ranks).

    Args:
        run_id: The run to log into (from :func:`get_or_create_run`).
        tracking_uri: The server; default ``MLFLOW_TRACKING_URI``.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.client = client(self.tracking_uri)
        self._last_step = self._server_last_step()
        self._monitor: Any = None

    def _server_last_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, STEP_METRIC)
        return max((m.step for m in history), default=-1)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params not yet on the run (a resumed run keeps its params; a value never changes)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, _clean(v)) for k, v in params.items() if k not in existing and k not in SECRET_ENV]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, _clean(v)) for k, v in tags.items()])

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Log one epoch's metrics at ``step`` unless that step is already on the server.

        Returns:
            True when logged, False when skipped as a duplicate.
        """
        from mlflow.entities import Metric

        if step <= self._last_step:
            log.info("epoch %d already logged to MLflow run %s: not logging it twice", step, self.run_id)
            return False
        ts = _now_ms()
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v)) and k != STEP_METRIC]
        items.append(Metric(STEP_METRIC, float(step), ts, step))  # last: marks the step complete
        for i in range(0, len(items), 200):
            self.client.log_batch(self.run_id, metrics=items[i:i + 200])
        self._last_step = step
        return True

    def log_history(self, history: list[dict[str, Any]]) -> int:
        """Log the epochs of a checkpoint's history that the server lacks; returns how many were logged."""
        return sum(self.log_epoch(int(h[STEP_METRIC]), h) for h in sorted(history, key=lambda h: h[STEP_METRIC]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Final (non-epoch) metrics such as test mAP."""
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """A JSON artifact (redacted)."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(artifact_file).name
            p.write_text(redact(json.dumps(data, indent=2, sort_keys=True, default=str)))
            parent = str(Path(artifact_file).parent)
            self.log_artifact(p, None if parent == "." else parent)

    def start_system_metrics(self, interval_s: float = 5.0) -> None:
        """CPU/memory/(GPU) metrics of this process's node, as MLflow system metrics."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as e:  # optional: never fail a run for monitoring
            log.warning("system metrics not logged: %s", e)
            self._monitor = None

    def stop_system_metrics(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                log.warning("system metrics monitor did not stop cleanly: %s", e)
            self._monitor = None

    def terminate(self, status: str = "FINISHED") -> None:
        """Set the run's final status: FINISHED, FAILED or KILLED."""
        self.stop_system_metrics()
        self.client.set_terminated(self.run_id, status=status)


    # ---- reads and model logging for drivers (sweep.py, orchestration.registry)
    def tags(self) -> dict[str, str]:
        """The run's tags as they are on the server now."""
        return dict(self.client.get_run(self.run_id).data.tags)

    def metrics(self) -> dict[str, float]:
        """The run's latest metric values as they are on the server now."""
        return dict(self.client.get_run(self.run_id).data.metrics)

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A column-wise table artifact (the MLflow UI shows it in the run's evaluation view)."""
        self.client.log_table(self.run_id, dict(data), artifact_file)

    def download_artifact(self, artifact_path: str, dst: str | Path) -> Path:
        """Download one artifact of the run into the folder ``dst``; returns its local path."""
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst), tracking_uri=self.tracking_uri))

    def log_pyfunc(self, **kwargs: Any) -> Any:
        """``mlflow.pyfunc.log_model(**kwargs)`` into this run; returns MLflow's ``ModelInfo``.

        Inside an active fluent run with this id it logs there; otherwise the run is resumed for the call and then
        set back to the status it had (a RUNNING sweep parent stays RUNNING, a FINISHED run stays FINISHED).
        """
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            if active.info.run_id != self.run_id:
                raise ValueError(f"log_pyfunc into run {self.run_id} while run {active.info.run_id} is active; end "
                                 f"it first")
            return mlflow.pyfunc.log_model(**kwargs)
        status = self.client.get_run(self.run_id).info.status
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(**kwargs)
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        elif status != "FINISHED":
            self.client.set_terminated(self.run_id, status=status)
        return info

    def register_model(self, model_uri: str, name: str, alias: str) -> int:
        """Register a model this run logged as a new version of ``name`` and point ``alias`` at it."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        version = mlflow.register_model(model_uri, name)
        self.client.set_registered_model_alias(name, alias, version.version)
        return int(version.version)

def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
