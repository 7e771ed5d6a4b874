"""Where runs store their state: one S3 bucket for Ray checkpoints and MLflow artifacts, one MLflow server.

Settings come from flags or the environment (the local stack exports them; a cluster sets them from its
secrets). Credentials are only ever read from the environment, never accepted as flags (shell history,
``ps``), and never logged: :meth:`PlatformSettings.__repr__` hides them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

ENV = {
    "s3_endpoint": "STMI_S3_ENDPOINT",
    "bucket": "STMI_S3_BUCKET",
    "prefix": "STMI_S3_PREFIX",
    "tracking_uri": "MLFLOW_TRACKING_URI",
}
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

        # No keys passed: pyarrow resolves them from AWS_* (or the node's role) in each process. Ray pickles this
        # object into its experiment state on S3; explicit keys would travel (and be stored) with it.
        kwargs: dict[str, Any] = {"region": self.region}
        if self.s3_endpoint:
            scheme, _, host = self.s3_endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        return pyarrow.fs.S3FileSystem(**kwargs)

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
        """Environment for Ray workers: the non-secret settings (secrets must already be on the nodes)."""
        env = {"STMI_S3_ENDPOINT": self.s3_endpoint, "STMI_S3_BUCKET": self.bucket, "STMI_S3_PREFIX": self.prefix,
               "MLFLOW_TRACKING_URI": self.tracking_uri}
        return {k: v for k, v in env.items() if v}


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """Replace any secret value from the environment found in ``text`` with ``***``."""
    env = dict(os.environ if env is None else env)
    for var in SECRET_ENV:
        value = env.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
