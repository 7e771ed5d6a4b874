"""Losses against hand computations (paper eq. 19-20)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from stmi.config import LossConfig
from stmi.losses import CrossEntropyLabelSmooth, TripletLoss, euclidean_dist, stmi_loss


def test_label_smoothing_value() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    z = math.log(math.exp(2) + 1 + math.exp(-1) + math.exp(1))
    log_p = [2 - z, 0 - z, -1 - z, 1 - z]
    eps, c, y = 0.1, 4, 3
    expected = -sum(((1 - eps) * (k == y) + eps / c) * lp for k, lp in enumerate(log_p))
    got = CrossEntropyLabelSmooth(eps)(logits, torch.tensor([y]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # eps = 0 is the plain cross-entropy
    plain = CrossEntropyLabelSmooth(0.0)(logits, torch.tensor([y]))
    assert plain.item() == pytest.approx(-log_p[y], rel=1e-6)


def test_label_smoothing_rejects_bad_eps() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLabelSmooth(1.0)


def test_euclidean_dist() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    d = euclidean_dist(x)
    torch.testing.assert_close(d, torch.cdist(x, x), atol=1e-5, rtol=0)


def test_batch_hard_picks_the_right_pairs() -> None:
    # 1-D points: id 0 at {0, 1, 4}, id 1 at {2, 10}
    x = torch.tensor([[0.0], [1.0], [4.0], [2.0], [10.0]])
    pids = torch.tensor([0, 0, 0, 1, 1])
    d_ap, d_an, valid = TripletLoss().hardest(x, pids)
    torch.testing.assert_close(d_ap, torch.tensor([4.0, 3.0, 4.0, 8.0, 8.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(d_an, torch.tensor([2.0, 1.0, 2.0, 1.0, 6.0]), atol=1e-5, rtol=0)
    assert valid.all()
    pairs = [(4, 2), (3, 1), (4, 2), (8, 1), (8, 6)]
    soft = TripletLoss()(x, pids)
    expected = sum(math.log1p(math.exp(a - n)) for a, n in pairs) / 5
    assert soft.item() == pytest.approx(expected, rel=1e-5)
    hard = TripletLoss(margin=0.3)(x, pids)
    assert hard.item() == pytest.approx(sum(max(0.0, a - n + 0.3) for a, n in pairs) / 5)


def test_triplet_without_negatives_is_zero_and_differentiable() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    loss = TripletLoss()(x, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None


def test_triplet_gradient_pulls_positive_and_pushes_negative() -> None:
    x = torch.tensor([[0.0], [1.0], [1.5], [3.0]], requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1])
    TripletLoss(margin=10.0)(x, pids).backward()
    # anchor 0: hardest positive 1 (d=1), hardest negative 2 (d=1.5); descending the loss moves 1 toward 0
    assert x.grad[1, 0] > 0 and x.grad[0, 0] < 0


def test_stmi_loss_sums_weighted_terms() -> None:
    torch.manual_seed(0)
    pids = torch.tensor([0, 0, 1, 1])
    feats = {"G": torch.randn(4, 6), "U": torch.randn(4, 6), "T": torch.randn(4, 3)}
    logits = {k: torch.randn(4, 2) for k in feats}
    out = SimpleNamespace(feats=feats, logits=logits)
    cfg = LossConfig(ce_weight=0.25, triplet_weight=1.0, label_smoothing=0.1)
    total, terms = stmi_loss(out, pids, cfg)
    assert set(terms) == {"G_ce", "G_tri", "U_ce", "U_tri", "T_ce", "T_tri"}
    ce, tri = CrossEntropyLabelSmooth(0.1), TripletLoss()
    expected = sum(0.25 * ce(logits[k], pids) + tri(feats[k], pids) for k in feats)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["U_ce"].item() == pytest.approx(ce(logits["U"], pids).item(), rel=1e-6)
    assert all(not t.requires_grad for t in terms.values())
    # without logits (eval output or num_classes=0) only the triplet terms remain
    total2, terms2 = stmi_loss(SimpleNamespace(feats=feats, logits={}), pids, LossConfig(triplet_margin=0.5))
    assert set(terms2) == {"G_tri", "U_tri", "T_tri"}
    assert total2.item() == pytest.approx(sum(TripletLoss(0.5)(f, pids).item() for f in feats.values()), rel=1e-6)


def _reid_like_features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """72 = 9 x 8 features of width 1536 and norm ~17 with identities clustered, as a trained model's G/U are."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(9).repeat_interleave(8)
    centres = torch.randn(9, 1536, generator=g)
    feats = centres[pids] + 0.6 * torch.randn(72, 1536, generator=g)
    feats = 17.0 * feats / feats.norm(dim=1, keepdim=True)
    return feats.to(torch.bfloat16).float(), pids  # values a bf16 model emits


def test_distances_and_triplet_under_bf16_autocast_equal_fp32() -> None:
    feats, pids = _reid_like_features()
    ref_d = euclidean_dist(feats)
    tri = TripletLoss()
    ref_ap, ref_an, _ = tri.hardest(feats, pids)
    x_ref = feats.clone().requires_grad_()
    tri(x_ref, pids).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = euclidean_dist(feats.to(torch.bfloat16))
        d_ap, d_an, _ = tri.hardest(feats.to(torch.bfloat16), pids)
        x = feats.clone().requires_grad_()
        loss = tri(x, pids)
    loss.backward()
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, ref_d, atol=1e-3, rtol=1e-5)
    # The same hardest pairs are chosen (compared by distance value: a bf16 Gram matrix changed ~half of them).
    torch.testing.assert_close(d_ap, ref_ap, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(d_an, ref_an, atol=1e-3, rtol=1e-5)
    rel = (x.grad - x_ref.grad).norm() / x_ref.grad.norm()
    assert rel < 1e-3, rel
