"""Platform settings: what is missing is named; secrets stay out of reprs and of what Ray pickles to storage."""

from __future__ import annotations

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
