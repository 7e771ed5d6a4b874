"""Real servers on loopback for integration tests, built on ``infra.local.stack`` (the code users run).

Session-scoped, started on first use, on free ports, in a temporary state directory; stopped at the end with
every process they spawned:

- ``s3_server``: SeaweedFS S3 with the bucket created -> :class:`S3Server`.
- ``mlflow_server``: MLflow tracking server (SQLite, artifacts proxied to the bucket) -> :class:`MlflowServer`.
- ``ray_cluster``: a Ray head (dashboard + job API) whose jobs see the S3/MLflow settings -> :class:`RayCluster`.
- ``platform_env``: function-scoped; puts the S3 + MLflow settings into ``os.environ`` for in-process code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra.local.stack import REPO_ROOT, Ports, RayHead, SeaweedS3, StackConfig
from infra.local.stack import MlflowServer as _MlflowService


def pytest_configure(config: pytest.Config) -> None:
    """The decoded-frame caches of the session's runs (in-process, Ray workers, jobs: they inherit the variable) go
    to one temporary folder removed at the end, not to the user's ``~/.cache/stmi/frames``."""
    if "STMI_CACHE_DIR" not in os.environ:
        import atexit
        import shutil
        import tempfile

        d = tempfile.mkdtemp(prefix="stmi-test-frames-")
        os.environ["STMI_CACHE_DIR"] = d
        atexit.register(shutil.rmtree, d, ignore_errors=True)


#: CPUs the test Ray head advertises (logical: two DDP workers plus a trial driver fit).
TEST_RAY_CPUS = 4
TEST_OBJECT_STORE_BYTES = 300 * 1024**2


@dataclass
class S3Server:
    """A running S3 server.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        bucket: The bucket (already created).
        prefix: Key prefix the platform writes under (MLflow artifacts under ``<prefix>/mlflow``).
        access_key: S3 access key (in the 0600 file ``AWS_SHARED_CREDENTIALS_FILE`` of :attr:`env` names).
        secret_key: S3 secret key.
        region: Region name clients announce.
        env: The S3 part of the environment contract (``STMI_S3_*``, ``AWS_*``, ``MLFLOW_S3_ENDPOINT_URL``).
        config: The underlying :class:`StackConfig` (state dir, ports).
    """

    endpoint: str
    bucket: str
    prefix: str
    access_key: str
    secret_key: str
    region: str
    env: dict[str, str]
    config: StackConfig

    def boto3_client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix`` (all pages)."""
        keys: list[str] = []
        for page in self.boto3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys


@dataclass
class MlflowServer:
    """A running MLflow tracking server.

    Attributes:
        tracking_uri: ``http://127.0.0.1:<port>``.
        artifacts_destination: ``s3://<bucket>/<prefix>/mlflow``: where the server stores artifacts.
        env: S3 settings plus ``MLFLOW_TRACKING_URI``.
        s3: The :class:`S3Server` it stores artifacts in.
    """

    tracking_uri: str
    artifacts_destination: str
    env: dict[str, str]
    s3: S3Server


@dataclass
class RayCluster:
    """A running Ray head.

    Attributes:
        address: GCS address ``127.0.0.1:<port>`` (``ray.init(address=...)``, ``RAY_ADDRESS``).
        dashboard_url: ``http://127.0.0.1:<port>`` (``ray job submit --address``).
        env: The whole environment contract (S3 with the credentials file, MLflow, ``RAY_ADDRESS``,
            ``RAY_API_SERVER_ADDRESS``, ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``): a client without it
            is refused by the head.
        temp_dir: Ray's temp dir (session logs under ``<temp_dir>/session_latest/logs``).
        num_cpus: CPUs it advertises.
    """

    address: str
    dashboard_url: str
    env: dict[str, str]
    temp_dir: Path
    num_cpus: int

    def submit(self, *entrypoint: str, timeout: float = 600, extra_args: tuple[str, ...] = (),
               cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
        """Run ``ray job submit --address <dashboard> [extra_args] -- <entrypoint...>`` with the real CLI.

        Waits for the job (the CLI tails its log) and returns the finished process: ``returncode`` 0 iff the job
        succeeded, ``stdout`` holds the job's output.
        """
        env = {**os.environ, **self.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.dashboard_url,
               *extra_args, "--", *entrypoint]
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              check=False)


@pytest.fixture(scope="session")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    """One state dir and one set of free ports shared by the session's servers."""
    return StackConfig(state_dir=tmp_path_factory.mktemp("stack"), ports=Ports.free(), num_cpus=TEST_RAY_CPUS,
                       object_store_memory=TEST_OBJECT_STORE_BYTES)


@pytest.fixture(scope="session")
def s3_server(stack_config: StackConfig) -> Iterator[S3Server]:
    service = SeaweedS3(stack_config)
    service.start()
    c = stack_config
    try:
        yield S3Server(endpoint=c.s3_endpoint, bucket=c.bucket, prefix=c.prefix, access_key=c.access_key,
                       secret_key=c.secret_key, region=c.region, env=c.s3_env(), config=c)
    finally:
        service.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server) -> Iterator[MlflowServer]:
    service = _MlflowService(s3_server.config)
    service.start()
    try:
        yield MlflowServer(tracking_uri=s3_server.config.tracking_uri,
                           artifacts_destination=service.artifacts_destination,
                           env={**s3_server.env, "MLFLOW_TRACKING_URI": s3_server.config.tracking_uri}, s3=s3_server)
    finally:
        service.stop()


@pytest.fixture(scope="session")
def ray_cluster(mlflow_server: MlflowServer) -> Iterator[RayCluster]:
    config = mlflow_server.s3.config
    service = RayHead(config)
    service.start()
    try:
        yield RayCluster(address=config.ray_address, dashboard_url=config.dashboard_url, env=config.env(),
                         temp_dir=config.ray_tmp, num_cpus=TEST_RAY_CPUS)
    finally:
        service.stop()


@pytest.fixture
def platform_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``os.environ`` holds the S3 + MLflow settings for this test (restored afterwards)."""
    for key, value in mlflow_server.env.items():
        monkeypatch.setenv(key, value)
    return dict(mlflow_server.env)
