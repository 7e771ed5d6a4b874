"""BNNeck heads (Luo et al. 2019, "Bag of Tricks"), one per supervised feature (G, U, T).

The triplet loss works on the feature before the BatchNorm, the identity classifier and retrieval on the
feature after it. The BN bias is frozen at 0 so the normalised feature stays centred (a learned shift would
only move all features together, which the cosine-like retrieval ignores but the classifier could exploit),
and the classifier has no bias for the same reason.
"""

from __future__ import annotations

import torch
from torch import nn


class BNNeck(nn.Module):
    """BatchNorm1d (weight 1, bias 0 and frozen) + optional bias-free linear classifier (normal, std 0.001).

    Args:
        dim: feature width.
        num_classes: training identities; 0 builds no classifier (inference-only or unlabelled models).
    """

    def __init__(self, dim: int, num_classes: int = 0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            self.classifier = nn.Linear(dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(bn_feature, logits)``; logits are None without a classifier or in eval mode."""
        f = self.bn(x)
        logits = self.classifier(f) if self.classifier is not None and self.training else None
        return f, logits
