"""Where runs store their state: one S3 bucket for Ray checkpoints and MLflow artifacts, one MLflow server.

Settings come from flags or the environment (the local stack exports them; a cluster sets them from its
secrets). Credentials are only ever read from the environment, never accepted as flags (shell history,
``ps``), and never logged: :meth:`PlatformSettings.__repr__` hides them.
"""

from __future__ import annotations

import argparse
import configparser
import io
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

ENV = {
    "s3_endpoint": "STMI_S3_ENDPOINT",
    "bucket": "STMI_S3_BUCKET",
    "prefix": "STMI_S3_PREFIX",
    "tracking_uri": "MLFLOW_TRACKING_URI",
}
#: A Ray worker reaches S3 and MLflow through the environment of the Ray processes (the stack starts Ray with it;
#: a cluster sets it in the pod spec), never through a runtime_env. The S3 keys come from that environment or, as the
#: local stack does, from the 0600 file named by ``AWS_SHARED_CREDENTIALS_FILE``.
#: What :meth:`PlatformSettings.worker_env` may ever put into a runtime_env (Ray logs runtime_envs and returns them
#: from its state API, so nothing secret may be there).
PUBLIC_ENV = ("STMI_S3_ENDPOINT", "STMI_S3_BUCKET", "STMI_S3_PREFIX", "MLFLOW_TRACKING_URI")
#: How long S3 operations of Ray's storage are retried while S3 is unreachable (seconds; env STMI_S3_RETRY_S).
DEFAULT_S3_RETRY_S = 1800.0
#: Values that must never reach params, tags, artifacts or logs.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class SettingsError(RuntimeError):
    """A storage or tracking setting is missing or unusable; the message says which and how to set it."""


@dataclass(frozen=True)
class PlatformSettings:
    """S3 + MLflow settings of the platform.

    Attributes:
        s3_endpoint: S3 endpoint URL (``http://127.0.0.1:8333`` for the local stack); empty = AWS S3.
        bucket: The bucket for Ray storage and (through the MLflow server) artifacts.
        prefix: Key prefix inside the bucket; Ray state goes under ``<prefix>/ray``.
        tracking_uri: The MLflow tracking server.
        access_key: From ``AWS_ACCESS_KEY_ID`` only.
        secret_key: From ``AWS_SECRET_ACCESS_KEY`` only; hidden from ``repr``.
    """

    s3_endpoint: str
    bucket: str
    prefix: str
    tracking_uri: str
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> PlatformSettings:
        """Flags (``--s3-endpoint`` ...) win over the environment; credentials come from the environment only.

        Raises:
            SettingsError: naming every missing setting and the variable or flag that provides it.
        """
        env = dict(os.environ if env is None else env)
        vals: dict[str, str] = {}
        missing = []
        for key, var in ENV.items():
            flag = getattr(args, key, None) if args is not None else None
            value = flag or env.get(var, "")
            if key == "prefix":
                value = (value or "stmi").strip("/")
            if not value and key != "s3_endpoint":
                missing.append(f"{var} (or --{key.replace('_', '-')})")
            vals[key] = value
        if missing:
            raise SettingsError(
                "missing platform settings: " + ", ".join(missing)
                + ". Start the local stack with `make up` (it exports them to Ray jobs) or `source .stmi/env`.")
        return cls(**vals, access_key=env.get("AWS_ACCESS_KEY_ID", ""), secret_key=env.get("AWS_SECRET_ACCESS_KEY", ""),
                   region=env.get("AWS_DEFAULT_REGION", "us-east-1"))

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The storage/tracking flags shared by train.py and sweep.py."""
        g = parser.add_argument_group("storage and tracking (default: from the environment the stack sets)")
        g.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL [$STMI_S3_ENDPOINT]")
        g.add_argument("--bucket", dest="bucket", help="S3 bucket [$STMI_S3_BUCKET]")
        g.add_argument("--prefix", dest="prefix", help="key prefix in the bucket [$STMI_S3_PREFIX, default stmi]")
        g.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking server [$MLFLOW_TRACKING_URI]")

    @property
    def ray_storage_path(self) -> str:
        """``bucket/prefix/ray``: the storage path for ``RunConfig`` with :meth:`storage_filesystem`."""
        return f"{self.bucket}/{self.prefix}/ray"

    def storage_filesystem(self) -> Any:
        """A pyarrow S3 filesystem for Ray's ``RunConfig(storage_filesystem=...)``."""
        import pyarrow.fs

        # No keys passed: pyarrow resolves them from AWS_* / AWS_SHARED_CREDENTIALS_FILE (or the node's role) in
        # each process. Ray pickles this object into its experiment state on S3; explicit keys would travel (and be
        # stored) with it.
        # background_writes=False: an upload runs in the thread that writes it. With background writes, the upload
        # of a file closed inside the retrying handler waits for a thread of pyarrow's IO pool, and copy_files (Tune's
        # experiment-state sync) can fill that pool with handler calls waiting on the same upload: a deadlock,
        # observed as a sweep that never returns after its last trial.
        kwargs: dict[str, Any] = {"region": self.region, "background_writes": False}
        if self.s3_endpoint:
            scheme, _, host = self.s3_endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        retry_s = float(os.environ.get("STMI_S3_RETRY_S", DEFAULT_S3_RETRY_S))
        return pyarrow.fs.PyFileSystem(RetryingFileSystemHandler(pyarrow.fs.S3FileSystem(**kwargs), retry_s))

    def boto3_client(self) -> Any:
        """A boto3 S3 client on the same endpoint (used by checks and tests)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint or None, aws_access_key_id=self.access_key or None,
                            aws_secret_access_key=self.secret_key or None, region_name=self.region)

    def check_storage(self) -> None:
        """Fail early, with the fix, when the bucket cannot be reached (rather than deep inside a Ray worker)."""
        try:
            self.boto3_client().head_bucket(Bucket=self.bucket)
        except Exception as e:  # botocore raises many kinds; all mean the same thing to the user
            raise SettingsError(
                f"cannot reach bucket {self.bucket!r} at {self.s3_endpoint or 'AWS S3'}: {type(e).__name__}: "
                f"{redact(str(e))}. Is the stack up (`make status`)? Are AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY set?"
            ) from None

    def worker_env(self) -> dict[str, str]:
        """Environment for Ray workers' runtime_env: only the public settings (:data:`PUBLIC_ENV`).

        Credentials never go here: a runtime_env is written to Ray's logs and returned by its state API. They must
        already be in the environment of the Ray processes (or a 0600 file that environment names).
        """
        env = {"STMI_S3_ENDPOINT": self.s3_endpoint, "STMI_S3_BUCKET": self.bucket, "STMI_S3_PREFIX": self.prefix,
               "MLFLOW_TRACKING_URI": self.tracking_uri}
        assert set(env) <= set(PUBLIC_ENV)
        return {k: v for k, v in env.items() if v}


try:  # a dependency of Ray; without it (settings checks only) there is no storage filesystem either
    from pyarrow.fs import FileSystemHandler as _HandlerBase
except ImportError:  # pragma: no cover
    _HandlerBase = object  # type: ignore[misc,assignment]


def _retryable(exc: BaseException) -> bool:
    """True for S3 errors that mean "not reachable right now" (refused, timeout, 5xx), not "wrong"."""
    if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)):
        return False
    text = str(exc).lower()
    permanent = ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "no_such_bucket",
                 "nosuchbucket", "invalid_argument")
    if any(p in text for p in permanent):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


class RetryingFileSystemHandler(_HandlerBase):
    """A pyarrow filesystem handler that retries what fails while S3 is unreachable, for up to ``retry_s``.

    Ray Train persists checkpoints (in the workers) and its own bookkeeping (``checkpoint_manager_snapshot.json``,
    in the controller) through ``RunConfig(storage_filesystem=...)``. A failed write of the bookkeeping is a
    controller error that no ``FailureConfig`` retries, and a failed checkpoint upload costs a worker-group restart;
    with this handler both wait until S3 answers again (a warning names the path and the outage so far). Writes
    are buffered and uploaded whole on close, so a retried upload never leaves half an object; reads are read
    whole (checkpoints are small next to memory). Errors that are not an outage (access denied, no such bucket,
    not found) are raised at once.

    Use as ``pyarrow.fs.PyFileSystem(RetryingFileSystemHandler(inner, retry_s))``; it pickles with ``inner`` (which
    holds no keys).
    """

    def __init__(self, inner: Any, retry_s: float = DEFAULT_S3_RETRY_S) -> None:
        self.inner = inner
        self.retry_s = retry_s
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"inner": self.inner, "retry_s": self.retry_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["inner"], state["retry_s"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingFileSystemHandler) and self.inner.equals(other.inner)

    def __hash__(self) -> int:
        return id(self.inner)

    def _retry(self, what: str, fn: Any, *args: Any) -> Any:
        start = time.monotonic()
        delay, warned = 0.5, 0.0
        while True:
            try:
                result = fn(*args)
            except Exception as e:  # noqa: BLE001 - classified below
                elapsed = time.monotonic() - start
                if not _retryable(e) or elapsed >= self.retry_s:
                    if elapsed >= self.retry_s:
                        log.error("S3 %s still failing after %.0f s (STMI_S3_RETRY_S=%.0f): giving up", what,
                                  elapsed, self.retry_s)
                    raise
                if elapsed - warned >= 30 or warned == 0.0:
                    warned = elapsed or 1e-9
                    log.warning("S3 %s failed (%s); retrying until S3 answers (%.0f s so far, up to %.0f s)", what,
                                redact(str(e))[:200], elapsed, self.retry_s)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if warned:
                log.warning("S3 %s succeeded after %.0f s of retries", what, time.monotonic() - start)
            return result

    # ----- pyarrow.fs.FileSystemHandler ----------------------------------------------------------------------
    def get_type_name(self) -> str:
        return f"retrying+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def equals(self, other: Any) -> bool:
        return self == other

    def get_file_info(self, paths: list[str]) -> Any:
        return self._retry(f"stat {paths[:3]}", self.inner.get_file_info, paths)

    def get_file_info_selector(self, selector: Any) -> Any:
        return self._retry(f"list {selector.base_dir}", self.inner.get_file_info, selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(f"mkdir {path}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry(f"delete {path}", self.inner.delete_dir, path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(f"delete {path}/*", lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete the whole bucket")

    def delete_file(self, path: str) -> None:
        self._retry(f"delete {path}", self.inner.delete_file, path)

    def move(self, src: str, dest: str) -> None:
        self._retry(f"move {src}", self.inner.move, src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(f"copy {src}", self.inner.copy_file, src, dest)

    def _read_all(self, path: str) -> Any:
        import pyarrow

        def read() -> bytes:
            with self.inner.open_input_stream(path) as f:
                return f.read()

        return pyarrow.BufferReader(self._retry(f"read {path}", read))

    def open_input_stream(self, path: str) -> Any:
        return self._read_all(path)

    def open_input_file(self, path: str) -> Any:
        return self._read_all(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        import pyarrow

        return pyarrow.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        raise NotImplementedError("S3 has no append")

    def _upload(self, path: str, data: bytes, metadata: Any) -> None:
        def put() -> None:
            with self.inner.open_output_stream(path, metadata=metadata) as f:
                f.write(data)

        with self._lock:  # one upload at a time (each in its caller's thread: background_writes=False above)
            self._retry(f"write {path} ({len(data)} bytes)", put)


class _UploadOnClose(io.BytesIO):
    """An in-memory file whose content is uploaded (with retries) when it is closed."""

    def __init__(self, handler: RetryingFileSystemHandler, path: str, metadata: Any) -> None:
        super().__init__()
        self._handler, self._path, self._metadata = handler, path, metadata

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._handler._upload(self._path, data, self._metadata)


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """Replace any secret value found in ``text`` with ``***``.

    The secrets: the values of :data:`SECRET_ENV` and the secret keys of the shared-credentials file named by
    ``AWS_SHARED_CREDENTIALS_FILE``.
    """
    env = dict(os.environ if env is None else env)
    values = [env.get(var) for var in SECRET_ENV]
    values += _file_secrets(env.get("AWS_SHARED_CREDENTIALS_FILE", ""))
    for value in values:
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _file_secrets(path: str) -> tuple[str, ...]:
    if not path:
        return ()
    try:
        return _file_secrets_cached(path, os.stat(path).st_mtime_ns)
    except OSError:
        return ()


@lru_cache(maxsize=8)
def _file_secrets_cached(path: str, _mtime: int) -> tuple[str, ...]:
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return ()
    return tuple(v for section in parser.sections() for k, v in parser[section].items()
                 if k in ("aws_secret_access_key", "aws_session_token"))
