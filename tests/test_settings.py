"""Platform settings: what is missing is named; secrets stay out of reprs and of what Ray pickles to storage."""

from __future__ import annotations

import os
import pickle

import pytest

from orchestration.settings import PlatformSettings, SettingsError, redact

ENV = {"STMI_S3_ENDPOINT": "http://127.0.0.1:8333", "STMI_S3_BUCKET": "b", "MLFLOW_TRACKING_URI": "http://m:5000",
       "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-xyz"}


def test_missing_settings_are_named_with_their_variables() -> None:
    with pytest.raises(SettingsError) as e:
        PlatformSettings.from_env(env={"STMI_S3_ENDPOINT": "http://x"})
    assert "STMI_S3_BUCKET (or --bucket)" in str(e.value) and "MLFLOW_TRACKING_URI" in str(e.value)


def test_secret_never_in_repr_or_in_the_pickled_filesystem(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    s = PlatformSettings.from_env()
    assert s.secret_key == ENV["AWS_SECRET_ACCESS_KEY"] and s.prefix == "stmi"
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in repr(s)
    assert ENV["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(s.storage_filesystem())
    assert s.ray_storage_path == "b/stmi/ray"
    assert redact(f"error: key={ENV['AWS_SECRET_ACCESS_KEY']}") == "error: key=***"


def test_importing_the_platform_turns_mlflow_telemetry_off() -> None:
    """MLflow's telemetry thread removes a variable from os.environ while HTTP requests copy it: a sweep trial failed
    with ``API request to .../runs/get failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'``. Importing
    ``orchestration`` first turns telemetry off; without it (the control) MLflow starts its client, so this test
    would fail if the import stopped doing so. MLflow itself skips telemetry under pytest and CI: the children run
    without those variables."""
    import subprocess
    import sys

    ci = {"PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD",
          "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION",
          "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if k not in ci}
    probe = "import mlflow.telemetry as t; print(t.get_telemetry_client() is None)"

    # Both children at once (each spends seconds importing MLflow): the control first, then the platform.
    children = [subprocess.Popen([sys.executable, "-c", first + probe], env=env, stdout=subprocess.PIPE, text=True)
                for first in ("", "import orchestration; ")]
    outs = [c.communicate(timeout=120)[0].strip() for c in children]
    assert [c.returncode for c in children] == [0, 0]
    assert outs == ["False", "True"]  # the control: MLflow starts its telemetry client; after the import it does not
