"""``python -m infra.local up|down|status|demo``: the local stack on 127.0.0.1 (``make up``, ``make down`` ...)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from infra.local.stack import DEFAULT_STATE_DIR, LocalStack, Ports, StackConfig, StackError

DESCRIPTION = """\
The local STMI stack: a SeaweedFS S3 server with the bucket, an MLflow tracking server (SQLite backend,
artifacts in the bucket) and a Ray head with its dashboard, all on 127.0.0.1. `up` and `down` are
idempotent. After `up`, Ray jobs see the S3 and MLflow settings; for your shell: `source .stmi/env`.

Security: Ray's token authentication is on (the token is in <state-dir>/ray_token; `.stmi/env` points Ray's
clients at it), the S3 keys are in <state-dir>/aws_credentials (named by AWS_SHARED_CREDENTIALS_FILE), and
SeaweedFS's own HTTP APIs refuse unsigned requests; everything under <state-dir> is private to you.
`down` stops running Ray jobs first and waits for them; runs left RUNNING by a dead driver are marked KILLED
(tag stmi.resume_command says how to resume) by `down` and by the next `up`.
"""

EPILOG = """\
examples:
  python -m infra.local up                      start everything (ports 8333 S3, 5000 MLflow, 8265 Ray dashboard)
  python -m infra.local up --mlflow-port 5050   another MLflow port (saved: status/down follow it)
  python -m infra.local status                  health of each service; exit code 1 if one is unhealthy
  python -m infra.local down                    stop running jobs (their runs end KILLED, resumable), then
                                                everything; nothing left running
  python -m infra.local demo                    all of the above + the demo sweep and a report (make demo)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where data, logs, pids, credentials and the env file live (default: %(default)s)")
    ports = common.add_argument_group("ports (default: the ones saved by the last `up`, else the standard ones)")
    for f in dataclasses.fields(Ports):
        ports.add_argument(Ports.flag(f.name), dest=f"port_{f.name}", type=int, metavar="N",
                           help=f"default {f.default}" + (" (0: chosen by Ray)" if f.default == 0 else ""))
    up_only = argparse.ArgumentParser(add_help=False)
    g = up_only.add_argument_group("stack settings (saved for later commands)")
    g.add_argument("--bucket", help="S3 bucket for MLflow artifacts and Ray storage (default stmi)")
    g.add_argument("--prefix", help="key prefix inside the bucket (default stmi)")
    g.add_argument("--num-cpus", type=int, help="CPUs the Ray head advertises (default: all)")
    g.add_argument("--num-gpus", type=int, help="GPUs the Ray head advertises (default: detected)")

    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,down,status,demo}")
    sub.add_parser("up", parents=[common, up_only], help="start S3 + bucket, MLflow and the Ray head",
                   description="Start what is not running yet and wait until it answers; writes <state-dir>/env.")
    sub.add_parser("down", parents=[common], help="stop jobs, then everything (harmless when nothing runs)",
                   description="Stop running Ray jobs (SIGTERM, up to 60 s each to end their runs) and wait for "
                               "them, mark their runs KILLED with the command that resumes them, then stop the Ray "
                               "head, MLflow and S3 with every process they spawned.")
    sub.add_parser("status", parents=[common], help="health of each service",
                   description="Check each service: S3 ListBuckets, MLflow /health, Ray dashboard + GCS.")
    demo = sub.add_parser("demo", parents=[common, up_only],
                          help="stack up, the demo sweep via `ray job submit`, a report",
                          description="Start the stack, submit `python orchestration/sweep.py` (the demo preset) as a "
                                      "Ray job, then print the best trial per dataset and the commands to serve and "
                                      "query the champion. Arguments after `--` go to the sweep, e.g. "
                                      "`python -m infra.local demo -- --datasets rgbnt201 --num-samples 1`.")
    demo.add_argument("--name", help="sweep name (default demo-<time>)")
    demo.add_argument("--serve-port", type=int, default=5001, help="port in the printed `mlflow models serve` command")
    demo.add_argument("sweep_args", nargs=argparse.REMAINDER, help="arguments for orchestration/sweep.py after --")
    return parser


def _config(args: argparse.Namespace) -> StackConfig:
    port_overrides = {f.name: getattr(args, f"port_{f.name}") for f in dataclasses.fields(Ports)
                      if getattr(args, f"port_{f.name}", None) is not None}
    overrides = {k: getattr(args, k, None) for k in ("bucket", "prefix", "num_cpus", "num_gpus")}
    return StackConfig.load(args.state_dir, ports=port_overrides, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _config(args)
        stack = LocalStack(config)
        if args.command == "up":
            env_file = stack.up()
            print(f"\nMLflow UI:      {config.tracking_uri}\nRay dashboard:  {config.dashboard_url}\n"
                  f"S3 endpoint:    {config.s3_endpoint} (bucket {config.bucket}, prefix {config.prefix})\n"
                  f"Logs:           {Path(config.state_dir) / 'logs'}\n"
                  f"For your shell: source {env_file}   (credentials included; the file is private, mode 0600)")
            return 0
        if args.command == "down":
            stack.down()
            return 0
        if args.command == "status":
            rows = stack.status()
            for r in rows:
                state = "healthy" if r.healthy else ("UNHEALTHY" if r.running else "stopped")
                pid = f"pid {r.pid}" if r.pid else ""
                detail = "" if r.healthy or r.detail == "stopped" else r.detail
                print(f"{r.name:7s} {state:9s} {pid:10s} {r.url:28s} {detail}".rstrip())
            return 0 if all(r.healthy for r in rows) else 1
        if args.command == "demo":
            from infra.local.demo import run_demo

            extra = [a for a in args.sweep_args if a != "--"] if args.sweep_args else []
            return run_demo(config, extra, name=args.name, serve_port=args.serve_port)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
