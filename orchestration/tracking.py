"""The one MLflow helper: every MLflow side effect of the platform goes through :class:`RunLogger`.

Runs are found by a deterministic key (tag ``stmi.run_key``: sweep/dataset/trial), never created twice: a
restarted worker group, a resumed trial or a resumed sweep all log into the run they started. Epoch metrics are
idempotent: a step already on the server is not logged again, so an epoch that Ray Train redoes after a worker
failure is never counted twice, and steps held in a checkpoint but missing on the server (a crash between the
checkpoint and the log call) are filled in on restore. Values of secret environment variables are redacted from
everything logged.

Training never waits on tracking: :class:`RunLogger` queues every write (params, tags, metrics, artifacts) and a
background thread sends them in order, each once, retrying for as long as the server is unreachable;
:meth:`RunLogger.flush` / :meth:`RunLogger.close` / :meth:`RunLogger.terminate` wait until everything queued is on
the server. Retried writes are idempotent (a metric keeps its timestamp, so the server drops a repeated row).

Runs whose driver died without ending them (SIGKILL, a stopped stack) are found by :func:`reap_stale_runs` from the
driver's identity that :func:`get_or_create_run` tags each run with, and marked KILLED with a tag saying how to
resume (:data:`RESUME_TAG`).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from orchestration.settings import SECRET_ENV, redact

log = logging.getLogger(__name__)
RUN_KEY_TAG = "stmi.run_key"
STEP_METRIC = "epoch"
#: How to resume a run that ended KILLED (set by :func:`reap_stale_runs`; a driver stopped by SIGTERM sets it too).
RESUME_TAG = "stmi.resume_command"
#: Why a run was marked KILLED by someone other than its driver.
KILLED_REASON_TAG = "stmi.killed_reason"
#: The driver's identity, tagged by :func:`get_or_create_run` (what :func:`reap_stale_runs` checks).
DRIVER_TAGS = ("stmi.driver.host", "stmi.driver.pid", "stmi.driver.started", "stmi.ray.submission_id",
               "stmi.ray.job_id", "stmi.command")
#: MLflow error codes that no retry can fix (the write is dropped with an error line instead of retried forever).
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED",
                     "UNAUTHENTICATED", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"}


def client(tracking_uri: str | None = None) -> Any:
    """An ``MlflowClient`` on ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def find_experiment(cl: Any, name: str) -> Any | None:
    """Experiment ``name`` (active or deleted), or None."""
    return cl.get_experiment_by_name(name)


#: MLflow 3's UI opens an experiment on its GenAI view (traces, token usage) unless the experiment says it is a
#: machine-learning one; every experiment the platform creates or reuses carries this tag.
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(cl: Any, name: str) -> str:
    """The id of experiment ``name``, created when absent (restored when deleted), tagged as a machine-learning
    experiment (:data:`EXPERIMENT_KIND_TAGS`) so the UI opens on its runs."""
    exp = cl.get_experiment_by_name(name)
    if exp is None:
        return cl.create_experiment(name, tags=EXPERIMENT_KIND_TAGS)
    if exp.lifecycle_stage == "deleted":
        cl.restore_experiment(exp.experiment_id)
    for k, v in EXPERIMENT_KIND_TAGS.items():
        if exp.tags.get(k) != v:
            cl.set_experiment_tag(exp.experiment_id, k, v)
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
        from mlflow.entities import RunTag

        if found.info.status != "RUNNING":
            cl.update_run(found.info.run_id, status="RUNNING")
        cl.log_batch(found.info.run_id, tags=[RunTag(k, v) for k, v in driver_tags().items()])
        return found.info.run_id
    all_tags = {RUN_KEY_TAG: run_key, **(tags or {}), **driver_tags()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = cl.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def driver_tags() -> dict[str, str]:
    """Who drives the run: host, pid (+ start time, against pid reuse), Ray job, command line.

    Blank values are kept (``""``) so that a reopened run does not keep a dead driver's values.
    """
    tags = {"stmi.driver.host": socket.gethostname(), "stmi.driver.pid": str(os.getpid()),
            "stmi.driver.started": f"{_process_start(os.getpid()) or 0:.0f}", "stmi.ray.submission_id": "",
            "stmi.ray.job_id": "", "stmi.command": ""}
    try:  # under `ray job submit` the driver's job config names the submission
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
        tags["stmi.ray.submission_id"] = str(meta.get("job_submission_id") or "")
    except (ValueError, AttributeError):
        pass
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            tags["stmi.ray.job_id"] = ray.get_runtime_context().get_job_id() or ""
        except Exception:  # noqa: BLE001 - not in a Ray worker/driver after all
            pass
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if script in ("train.py", "sweep.py"):
        tags["stmi.command"] = shlex.join(["python", f"orchestration/{script}", *sys.argv[1:]])
        tags.update({"mlflow.source.name": f"orchestration/{script}", "mlflow.source.type": "JOB"})
    return tags


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or psutil missing
        return None


def _clean(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return redact(text)[:6000]


def _is_permanent(exc: BaseException) -> bool:
    """True for errors a retry cannot fix (bad value, missing run); False for an unreachable or failing server."""
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT_ERRORS


class RunLogger:
    """Logs one MLflow run (used by rank 0 and by drivers; never by other ranks) without ever blocking on it.

    Every write is queued and sent in order by a background thread that retries until the server takes it, so an
    MLflow outage of any length only delays the writes: nothing is lost, nothing is sent twice. Call
    :meth:`close` (or :meth:`terminate`) before the process ends: it waits until the queue is empty.

    Args:
        run_id: The run to log into (from :func:`get_or_create_run`).
        tracking_uri: The server; default ``MLFLOW_TRACKING_URI``.
        retry_interval_s: The longest wait between two attempts while the server is unreachable.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, retry_interval_s: float = 5.0) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.client = client(self.tracking_uri)  # for callers' reads; the flusher has its own
        self.retry_interval_s = retry_interval_s
        self._monitor: Any = None
        self._server_step: int | None = None  # the highest epoch on the server, once the flusher knows it
        self._queued_step = -1  # the highest epoch queued by this logger
        self._ops: collections.deque[tuple[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._spool: Path | None = None
        self._dropped = 0

    # ----- the queue ------------------------------------------------------------------------------------------
    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"RunLogger for run {self.run_id} is closed")
            self._ops.append((kind, payload))
            if self._thread is None:
                self._thread = threading.Thread(target=self._flusher, name=f"mlflow-flusher-{self.run_id[:8]}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Writes queued or being sent."""
        with self._cond:
            return len(self._ops)

    def _flusher(self) -> None:
        cl = client(self.tracking_uri)
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if not self._ops:
                    return
                kind, payload = self._ops[0]
            self._retry(lambda: self._send(cl, kind, payload), f"{kind} for run {self.run_id}")
            with self._cond:
                self._ops.popleft()
                self._cond.notify_all()

    def _server_up(self) -> tuple[bool, str]:
        """A cheap probe (``GET /health``, 3 s) so that a write is only tried when the server answers.

        MLflow's client retries an HTTP call for minutes with growing back-off; probing first keeps the flusher
        from sleeping inside those retries while the server is already back.
        """
        import urllib.error
        import urllib.request

        uri = self.tracking_uri or ""
        if not uri.startswith(("http://", "https://")):
            return True, ""
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3):
                return True, ""
        except urllib.error.HTTPError as e:
            return e.code < 500, f"GET /health answered {e.code}"
        except Exception as e:  # noqa: BLE001 - refused, timeout, DNS
            return False, f"{type(e).__name__}: {e}"

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        """Call ``fn`` until it succeeds; a permanent error is logged and dropped (returns None)."""
        first_failure: float | None = None
        delay = 0.5
        while True:
            up, reason = self._server_up()
            if not up:
                if first_failure is None:
                    first_failure = time.monotonic()
                    log.warning("MLflow at %s unreachable (%s); training goes on, %d write(s) buffered and retried "
                                "until it answers", self.tracking_uri, redact(reason)[:300], self.pending)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_interval_s)
                continue
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - any failure of the server or the network
                if _is_permanent(e):
                    self._dropped += 1
                    log.error("MLflow refused %s, not retrying: %s", what, redact(str(e))[:500])
                    return None
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    log.warning("MLflow at %s unreachable (%s: %s); training goes on, %d write(s) buffered and "
                                "retried until it answers", self.tracking_uri, type(e).__name__,
                                redact(str(e))[:300], self.pending)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_interval_s)
                continue
            if first_failure is not None:
                log.warning("MLflow at %s answers again after %.0f s: sending %d buffered write(s)",
                            self.tracking_uri, time.monotonic() - first_failure, self.pending)
            return result

    def _send(self, cl: Any, kind: str, payload: Any) -> None:
        from mlflow.entities import Param, RunTag

        if kind == "epoch":
            step, items = payload
            if self._server_step is None:
                history = cl.get_metric_history(self.run_id, STEP_METRIC)
                self._server_step = max((m.step for m in history), default=-1)
            if step <= self._server_step:
                log.info("epoch %d already logged to MLflow run %s: not logging it twice", step, self.run_id)
                return
            for i in range(0, len(items), 200):
                cl.log_batch(self.run_id, metrics=items[i:i + 200])
            self._server_step = step
        elif kind == "metrics":
            cl.log_batch(self.run_id, metrics=payload)
        elif kind == "params":
            existing = cl.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in payload.items() if k not in existing]
            for i in range(0, len(new), 100):
                cl.log_batch(self.run_id, params=new[i:i + 100])
        elif kind == "tags":
            cl.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "artifact":
            path, artifact_path = payload
            cl.log_artifact(self.run_id, str(path), artifact_path)
            shutil.rmtree(path.parent, ignore_errors=True)
        elif kind == "inputs":
            cl.log_inputs(self.run_id, datasets=payload)
        elif kind == "terminate":
            cl.set_terminated(self.run_id, status=payload)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown queued write {kind!r}")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is on the server (a log line every 30 s says what is waited for).

        Returns:
            True when the queue is empty, False when ``timeout`` passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_note = time.monotonic()
        with self._cond:
            while self._ops:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=min(5.0, left) if left is not None else 5.0)
                if self._ops and time.monotonic() - last_note >= 30:
                    last_note = time.monotonic()
                    log.warning("waiting for MLflow at %s to take %d buffered write(s) of run %s before ending",
                                self.tracking_uri, len(self._ops), self.run_id)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Stop system metrics, send everything queued (waiting as long as needed) and stop the flusher."""
        self.stop_system_metrics()
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if done and self._thread is not None:
            self._thread.join(timeout=10)
        return done

    # ----- what callers log -----------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params not yet on the run (a resumed run keeps its params; a value never changes)."""
        self._put("params", {k: _clean(v) for k, v in params.items() if k not in SECRET_ENV})

    def log_data_fingerprints(self, fingerprints: Mapping[str, Any], source: str, name: str) -> None:
        """One MLflow dataset input per split (the UI's Dataset column): ``name``, the data root as source, the
        split's fingerprint as digest and the split as context; plus ``stmi.data.fingerprint.<split>`` tags, which
        ``--rerun`` compares. ``fingerprints``: ``{split: stmi.data.fingerprint.Fingerprint}``."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # a local path matches two equivalent source types; MLflow warns
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(source)
        inputs, seen = [], set()
        for split, fp in fingerprints.items():
            ds = MetaDataset(source=src, name=f"{name}-{split}", digest=fp.digest)
            if (ds.name, fp.digest) in seen:
                continue
            seen.add((ds.name, fp.digest))
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
        self._put("inputs", inputs)
        self.set_tags({f"stmi.data.fingerprint.{split}": fp.digest for split, fp in fingerprints.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put("tags", {k: _clean(v) for k, v in tags.items()})

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Queue one epoch's metrics at ``step`` unless that step is already queued (or known on the server).

        A step already on the server is dropped by the flusher (it reads the server's last step before the first
        epoch it sends), so the server never has a step twice.

        Returns:
            True when queued, False when skipped as a duplicate.
        """
        from mlflow.entities import Metric

        known = max(self._queued_step, -1 if self._server_step is None else self._server_step)
        if step <= known:
            log.info("epoch %d already logged to MLflow run %s: not logging it twice", step, self.run_id)
            return False
        ts = _now_ms()
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v)) and k != STEP_METRIC]
        items.append(Metric(STEP_METRIC, float(step), ts, step))  # last: marks the step complete
        self._queued_step = step
        self._put("epoch", (step, items))
        return True

    def log_history(self, history: list[dict[str, Any]]) -> int:
        """Queue the epochs of a checkpoint's history; those already on the server are dropped when sent.

        Returns:
            How many epochs were queued.
        """
        return sum(self.log_epoch(int(h[STEP_METRIC]), h) for h in sorted(history, key=lambda h: h[STEP_METRIC]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Final (non-epoch) metrics such as test mAP."""
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            self._put("metrics", items)

    def _spool_dir(self) -> Path:
        """A private directory for artifacts waiting to be sent (the caller's file may be gone by then)."""
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix=f"stmi-mlflow-{self.run_id[:8]}-"))
        d = Path(tempfile.mkdtemp(dir=self._spool))
        return d

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a copy of the file ``path`` (the original may be deleted right after this call)."""
        src = Path(path)
        dst = self._spool_dir() / src.name
        shutil.copyfile(src, dst)
        self._put("artifact", (dst, artifact_path))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """A JSON artifact (redacted)."""
        self._log_file_text(redact(json.dumps(data, indent=2, sort_keys=True, default=str)), artifact_file)

    def _log_file_text(self, text: str, artifact_file: str) -> None:
        p = self._spool_dir() / Path(artifact_file).name
        p.write_text(text)
        parent = str(Path(artifact_file).parent)
        self._put("artifact", (p, None if parent == "." else parent))

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
        """Stop the system-metrics monitor and send what this logger buffered (rank 0's last call in a run)."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                log.warning("system metrics monitor did not stop cleanly: %s", e)
            self._monitor = None
        self.flush()

    def terminate(self, status: str = "FINISHED") -> None:
        """Send everything queued, then set the run's final status: FINISHED, FAILED or KILLED (waits as needed)."""
        self.stop_system_metrics()
        self._put("terminate", status)
        self.close()


    # ----- reads and model logging for drivers (sweep.py, orchestration.registry): synchronous, after a flush
    def tags(self) -> dict[str, str]:
        """The run's tags as they are on the server now (after what this logger queued was sent)."""
        self.flush()
        return dict(self.client.get_run(self.run_id).data.tags)

    def metrics(self) -> dict[str, float]:
        """The run's latest metric values as they are on the server now (after a flush)."""
        self.flush()
        return dict(self.client.get_run(self.run_id).data.metrics)

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A column-wise table artifact (the MLflow UI shows it in the run's evaluation view)."""
        self.flush()
        self.client.log_table(self.run_id, dict(data), artifact_file)

    def download_artifact(self, artifact_path: str, dst: str | Path) -> Path:
        """Download one artifact of the run into the folder ``dst``; returns its local path."""
        import mlflow.artifacts

        self.flush()
        return Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst), tracking_uri=self.tracking_uri))

    def log_pyfunc(self, **kwargs: Any) -> Any:
        """``mlflow.pyfunc.log_model(**kwargs)`` into this run; returns MLflow's ``ModelInfo``.

        Inside an active fluent run with this id it logs there; otherwise the run is resumed for the call and then
        set back to the status it had (a RUNNING sweep parent stays RUNNING, a FINISHED run stays FINISHED).
        """
        import mlflow

        self.flush()
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

    def describe_model_version(self, name: str, version: int, tags: Mapping[str, Any], description: str) -> None:
        """Tags and a description on a registered model version (what a reviewer reads in the Models page)."""
        self.flush()
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, _clean(v))
        self.client.update_model_version(name, str(version), description=description)

    def register_model(self, model_uri: str, name: str, alias: str) -> int:
        """Register a model this run logged as a new version of ``name`` and point ``alias`` at it."""
        import mlflow

        self.flush()
        mlflow.set_tracking_uri(self.tracking_uri)
        version = mlflow.register_model(model_uri, name)
        self.client.set_registered_model_alias(name, alias, version.version)
        return int(version.version)

def _now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------------------------------- stale runs (reaper)
def resume_command(run: Any, cl: Any | None = None) -> str:
    """The command that resumes ``run`` (a train run, a sweep's parent or one of its trials).

    Built from the driver's command line (tag ``stmi.command``; a trial takes its parent's), with the run's name
    (``--name``) and, for sweeps, ``--resume`` added when missing.
    """
    tags = run.data.tags
    key = tags.get(RUN_KEY_TAG, "")
    command = tags.get("stmi.command", "")
    if not command and cl is not None and tags.get("mlflow.parentRunId"):
        try:
            command = cl.get_run(tags["mlflow.parentRunId"]).data.tags.get("stmi.command", "")
        except Exception:  # noqa: BLE001 - the parent is gone: fall back to the run key
            command = ""
    kind, _, rest = key.partition("/")
    name = rest.split("/")[0] if rest else tags.get("mlflow.runName", "")
    script = "sweep" if kind == "sweep" else "train"
    words = shlex.split(command) if command else ["python", f"orchestration/{script}.py"]
    if "--name" not in words and name:
        words += ["--name", name]
    if kind == "sweep" and "--resume" not in words:
        words.append("--resume")
    return "ray job submit -- " + shlex.join(words)


def _driver_state(run: Any, jobs: list[dict[str, Any]] | None, untagged_dead: bool) -> tuple[bool | None, str]:
    """Whether the run's driver is alive (None: cannot tell) and why."""
    tags = run.data.tags
    live = ("PENDING", "RUNNING")
    sub, job_id = tags.get("stmi.ray.submission_id"), tags.get("stmi.ray.job_id")
    if (sub or job_id) and jobs is not None:
        for j in jobs:
            if (sub and j.get("submission_id") == sub) or (not sub and job_id and j.get("job_id") == job_id):
                status = j.get("status")
                return status in live, f"its Ray job {sub or job_id} is {status}"
        return False, f"its Ray job {sub or job_id} is not known to the Ray cluster (restarted since)"
    host, pid = tags.get("stmi.driver.host"), tags.get("stmi.driver.pid")
    if host and pid and not (sub or job_id):
        if host != socket.gethostname():
            return None, f"its driver runs on {host}"
        started = _process_start(int(pid))
        if started is None:
            return False, f"its driver (pid {pid} on {host}) is gone"
        same = abs(started - float(tags.get("stmi.driver.started") or 0)) < 2
        return same, f"its driver pid {pid} is {'alive' if same else 'reused by another process'}"
    if not any(tags.get(t) for t in DRIVER_TAGS):
        return (False if untagged_dead else None), "it has no driver identity (logged before drivers were tagged)"
    return None, "its Ray cluster cannot be asked"


def reap_stale_runs(tracking_uri: str | None = None, *, jobs: list[dict[str, Any]] | None = None,
                    experiment_ids: Iterable[str] | None = None, untagged_dead: bool = False,
                    stopped_jobs: Iterable[str] = (), stopped_at: float = 0.0,
                    log_fn: Callable[[str], None] | None = None) -> list[str]:
    """Mark KILLED the platform's runs still RUNNING whose driver is gone; returns their ids.

    A run is the platform's when it has a run key. Its driver is gone when its Ray job (tags
    ``stmi.ray.submission_id`` / ``stmi.ray.job_id``) is not PENDING/RUNNING in ``jobs`` (the Ray job API's list,
    e.g. ``GET /api/jobs/``), or, for a driver outside Ray jobs, when its pid on this host is gone. Each reaped
    run gets :data:`RESUME_TAG` (the command that resumes it) and :data:`KILLED_REASON_TAG`.

    Args:
        jobs: The Ray cluster's jobs; None when Ray cannot be asked (then runs of Ray jobs are left alone).
        experiment_ids: Where to look (default: every active experiment).
        untagged_dead: Treat runs without any driver identity as dead (right after the Ray head was started:
            no driver of the old cluster can be alive).
        stopped_jobs: Submission ids of jobs a person just stopped (``down``, at ``stopped_at``, epoch seconds):
            their runs that ended since are KILLED (MLflow's status for a run a person stopped; a driver that
            reacts to SIGTERM by failing would say FAILED) and get :data:`RESUME_TAG`.
    """
    from mlflow.entities import RunTag

    say = log_fn or log.warning
    cl = client(tracking_uri)
    ids = list(experiment_ids) if experiment_ids is not None else [e.experiment_id for e in cl.search_experiments()]
    reaped: list[str] = []
    for i in range(0, len(ids), 100):
        runs = cl.search_runs(ids[i:i + 100], filter_string=f"attributes.status = 'RUNNING' and tags.`{RUN_KEY_TAG}` "
                                                           "LIKE '%'", max_results=5000)
        for run in runs:
            alive, why = _driver_state(run, jobs, untagged_dead)
            if alive is not False:
                continue
            cmd = resume_command(run, cl)
            cl.log_batch(run.info.run_id, tags=[RunTag(RESUME_TAG, cmd),
                                                RunTag(KILLED_REASON_TAG, f"marked KILLED because {why}")])
            cl.set_terminated(run.info.run_id, status="KILLED")
            say(f"run {run.info.run_id} ({run.data.tags.get(RUN_KEY_TAG)}) was RUNNING but {why}: marked KILLED; "
                f"resume with: {cmd}")
            reaped.append(run.info.run_id)
        subs = set(stopped_jobs)
        if not subs:
            continue
        job_ids = {j.get("job_id") for j in jobs or [] if j.get("submission_id") in subs} - {None, ""}
        ended = cl.search_runs(ids[i:i + 100], filter_string=f"attributes.status != 'RUNNING' and "
                               f"attributes.status != 'FINISHED' and attributes.end_time >= {int(stopped_at * 1000)}",
                               max_results=5000)
        for run in ended:
            tags = run.data.tags
            if tags.get("stmi.ray.submission_id") not in subs and tags.get("stmi.ray.job_id") not in job_ids:
                continue
            cmd = tags.get(RESUME_TAG) or resume_command(run, cl)
            cl.log_batch(run.info.run_id, tags=[RunTag(RESUME_TAG, cmd), RunTag(
                KILLED_REASON_TAG, f"its Ray job was stopped (was {run.info.status})")])
            if run.info.status != "KILLED":
                cl.set_terminated(run.info.run_id, status="KILLED", end_time=run.info.end_time)
            say(f"run {run.info.run_id} ({tags.get(RUN_KEY_TAG)}) of a stopped job: KILLED; resume with: {cmd}")
            reaped.append(run.info.run_id)
    return reaped


def reap_before_start(tracking_uri: str | None, experiment_id: str) -> list[str]:
    """What a sweep or training run does first (after ``ray.init``): end KILLED, with the command that resumes them,
    the runs of its experiment left RUNNING by a driver that died without saying so. Never fails the caller."""
    try:
        return reap_stale_runs(tracking_uri, jobs=ray_jobs(), experiment_ids=[experiment_id],
                               log_fn=lambda m: print(m, flush=True))
    except Exception as e:  # noqa: BLE001 - housekeeping: a server hiccup here must not stop the run
        log.warning("stale runs were not checked: %s: %s", type(e).__name__, redact(str(e))[:300])
        return []


def ray_jobs(dashboard_url: str | None = None, token: str | None = None, timeout: float = 10.0) -> list[dict] | None:
    """The Ray cluster's jobs from its job API (``RAY_API_SERVER_ADDRESS``; token from ``RAY_AUTH_TOKEN_PATH``).

    Returns:
        The list, or None when the cluster cannot be asked.
    """
    import urllib.request

    url = dashboard_url or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_DASHBOARD_ADDRESS")
    ray = sys.modules.get("ray")
    if not url and ray is not None and ray.is_initialized():  # a job's driver: the cluster it is connected to
        try:
            from ray._private.worker import get_dashboard_url

            url = get_dashboard_url()
        except Exception:  # noqa: BLE001 - no dashboard
            url = None
    if not url:
        return None
    if "://" not in url:
        url = f"http://{url}"
    if token is None:
        token = os.environ.get("RAY_AUTH_TOKEN")
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if not token and path and Path(path).exists():
            token = Path(path).read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        req = urllib.request.Request(url.rstrip("/") + "/api/jobs/", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except Exception as e:  # noqa: BLE001 - unreachable, refused, not a Ray dashboard
        log.info("cannot list Ray jobs at %s: %s", url, e)
        return None
