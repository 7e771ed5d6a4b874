"""STMI objective (paper eq. 19-20): per supervised feature, label-smoothed CE + batch-hard triplet.

``stmi_loss`` sums, over every feature the model produced (``G``, ``U``, ``T``; an ablation may drop some),
``cfg.ce_weight * CE_ls(logits_F) + cfg.triplet_weight * triplet(F)``. The CE uses the post-BNNeck logits,
the triplet the pre-BN feature (BNNeck convention). Defaults 0.25 / 1.0 are the anchors' (docs/design.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stmi.config import LossConfig

if TYPE_CHECKING:
    from stmi.model.network import STMIOutput


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against ``(1 - eps) * onehot + eps / C`` (Szegedy et al. 2016).

    Args:
        eps: smoothing mass spread uniformly over the C classes.
    """

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"loss.label_smoothing={eps} must be in [0, 1)")
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, C), ``targets`` (B,) long -> scalar mean loss."""
        log_p = F.log_softmax(logits.float(), dim=1)
        smooth = torch.full_like(log_p, self.eps / logits.shape[1])
        smooth.scatter_add_(1, targets.unsqueeze(1), torch.full_like(log_p[:, :1], 1.0 - self.eps))
        return -(smooth * log_p).sum(dim=1).mean()


def euclidean_dist(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) fp32 Euclidean distances; the clamp keeps sqrt's gradient finite on the diagonal.

    Computed in fp32 with autocast disabled: under bf16 autocast the Gram matrix ``x @ x.T`` would run in bf16
    again after ``x.float()``, and ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` cancels catastrophically (on 72 x 1536
    features of norm ~17 the distances were off by up to 1.4, changing the hardest positives and negatives).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        sq = x.pow(2).sum(dim=1, keepdim=True)
        d2 = sq + sq.t() - 2.0 * (x @ x.t())
        return d2.clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans, Beyer and Leibe 2017).

    For each anchor: the farthest sample of the same identity and the closest of another identity, on
    Euclidean distances. ``margin=None`` (default) is the soft margin ``softplus(d_ap - d_an)``; a float
    is the hinge ``max(0, d_ap - d_an + margin)``. Anchors with no other identity in the batch are skipped
    (a P x K sampler with P >= 2 never produces them).

    Args:
        margin: hinge margin, or None for the soft margin.
    """

    def __init__(self, margin: float | None = None) -> None:
        super().__init__()
        self.margin = margin

    def hardest(self, feats: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(d_ap, d_an, valid)`` per anchor (``valid``: the anchor has a negative)."""
        dist = euclidean_dist(feats)
        same = pids.unsqueeze(0) == pids.unsqueeze(1)
        d_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
        d_an = dist.masked_fill(same, float("inf")).min(dim=1).values
        return d_ap, d_an, (~same).any(dim=1)

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """``feats`` (B, D), ``pids`` (B,) -> scalar mean loss (0 when no anchor has a negative)."""
        d_ap, d_an, valid = self.hardest(feats, pids)
        if not bool(valid.any()):
            return feats.sum() * 0.0
        d_ap, d_an = d_ap[valid], d_an[valid]
        if self.margin is None:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()


def stmi_loss(out: STMIOutput, pids: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 20: ``sum_F ce_weight * CE_ls(logits_F) + triplet_weight * triplet(F)`` over ``out.feats``.

    Args:
        out: the model output (training mode, so ``out.logits`` holds the classifier logits when the model
            has ``num_classes > 0``; features without logits get the triplet term only).
        pids: (B,) long identity labels in ``[0, num_classes)``.
        cfg: weights, smoothing and margin.

    Returns:
        ``(total, terms)``: the differentiable total and a dict of detached, unweighted terms
        ``{"G_ce", "G_tri", "U_ce", ...}`` for logging.
    """
    ce = CrossEntropyLabelSmooth(cfg.label_smoothing)
    tri = TripletLoss(cfg.triplet_margin)
    total = pids.new_zeros((), dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {}
    for name, feat in out.feats.items():
        logits = out.logits.get(name)
        if logits is not None:
            loss_ce = ce(logits, pids)
            total = total + cfg.ce_weight * loss_ce
            terms[f"{name}_ce"] = loss_ce.detach()
        loss_tri = tri(feat, pids)
        total = total + cfg.triplet_weight * loss_tri
        terms[f"{name}_tri"] = loss_tri.detach()
    return total, terms
