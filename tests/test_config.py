"""The typed config: overrides checked by name and type; round trips; the import rule of the architecture."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stmi.config import ConfigError, STMIConfig, apply_overrides, flatten, from_dict, to_dict


def test_overrides_are_typed_and_round_trip() -> None:
    cfg = apply_overrides(STMIConfig(), {"model.K": "8", "optim.lr": 1e-5, "model.image_size": "128x256",
                                         "loss.triplet_margin": "none", "model.use_sfm": "false"})
    assert cfg.model.K == 8 and cfg.optim.lr == 1e-5 and cfg.model.image_size == (128, 256)
    assert cfg.loss.triplet_margin is None and cfg.model.use_sfm is False
    assert from_dict(to_dict(cfg)) == cfg
    assert flatten(cfg)["model.K"] == 8


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"model.k": 3}, "did you mean model.K"),
    ({"model.K": 2.5}, "expected an integer"),
    ({"model.fusion": "graph"}, "not one of"),
    ({"model.use_sfm": "maybe"}, "expected true/false"),
    ({"model.image_size": "256"}, "expected 2 values"),
])
def test_bad_overrides_name_the_field(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(STMIConfig(), overrides)


def test_importing_stmi_does_not_import_the_platform() -> None:
    code = ("import sys, stmi, stmi.model, stmi.data, stmi.eval, stmi.engine, stmi.losses, stmi.recipes\n"
            "bad = [m for m in ('ray', 'mlflow', 'optuna', 'boto3') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
