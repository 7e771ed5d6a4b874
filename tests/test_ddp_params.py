"""Every parameter the model builds gets a gradient from ``stmi_loss`` in every configuration, so DDP can run
without ``find_unused_parameters`` (an extra autograd-graph traversal per step): ``needs_find_unused_parameters``
is False exactly when this holds."""

from __future__ import annotations

import pytest
import torch

from stmi.config import LossConfig
from stmi.losses import stmi_loss
from stmi.model.network import build_model, needs_find_unused_parameters
from tests.test_model import make_batch, tiny_cfg

CONFIGS = {
    "full (table 3 D)": {},
    "baseline (table 3 A)": dict(use_sfm=False, use_str=False, fusion="concat"),
    "+SFM (table 3 B)": dict(use_sfm=True, use_str=False, fusion="concat"),
    "+SFM+STR (table 3 C)": dict(use_str=True, fusion="concat"),
    "mlp fusion": dict(fusion="mlp"),
    "mhsa fusion": dict(fusion="mhsa"),
    "fusion over CLS tokens": dict(use_str=False, fusion="chi"),
    "no text": dict(use_text=False),
    "no global fusion": dict(use_global_fusion=False),
    "separate backbones, unshared STR": dict(separate_backbones=True, str_share_weights=False),
    "SFM late layers, per head": dict(sfm_layers="late", sfm_sharing="head"),
    "SFM shared, 2 CHI layers": dict(sfm_sharing="shared", chi_layers=2),
    "no SIE": dict(use_sie=False),
    "retrieval G": dict(retrieval_feature="G"),
}

BATCHES = {
    "masks, captions, cameras": {},
    "no mask at all": dict(mask=None),
    "no sample has its mask": dict(has_mask=False),
    "no camera id": dict(camid=None),
}

pytestmark = pytest.mark.slow  # minutes on 2 CPUs: kept out of `make test-fast`


def _params_without_grad(overrides: dict, batch_kw: dict) -> list[str]:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(p=0.1, **overrides)).train()
    if model.token_fusion is not None and hasattr(model.token_fusion, "tau"):
        model.token_fusion.tau = 0.0  # some hyperedges with more than one node, so the edge weights matter
    batch = make_batch()
    b = batch["rgb"].shape[0]
    kw = {"mask": batch["mask"], "camid": batch["camid"], "text": model.tokenize(["a person in red"] * b)}
    if "has_mask" in batch_kw:
        kw["has_mask"] = torch.zeros(b, dtype=torch.bool)
    for key in ("mask", "camid"):
        if key in batch_kw:
            kw[key] = batch_kw[key]
    out = model(batch["rgb"], batch["nir"], batch["tir"], **kw)
    total, _ = stmi_loss(out, batch["pids"], LossConfig())
    total.backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_built_parameter_gets_a_gradient(name: str) -> None:
    missing = _params_without_grad(CONFIGS[name], {})
    assert missing == [], f"{name}: parameters without a gradient: {missing}"
    assert not needs_find_unused_parameters(tiny_cfg(**CONFIGS[name]))


@pytest.mark.parametrize("batch_kind", [k for k in BATCHES if k != "masks, captions, cameras"])
def test_batches_without_masks_or_cameras_still_reach_every_parameter(batch_kind: str) -> None:
    """A rank whose batch has no mask (or no camera id) must still produce a gradient (zero) for alpha/beta (or
    the SIE table), or DDP without find_unused_parameters would wait for it forever."""
    missing = _params_without_grad({}, BATCHES[batch_kind])
    assert missing == [], f"{batch_kind}: parameters without a gradient: {missing}"
