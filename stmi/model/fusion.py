"""Token fusion after STR (paper table 4) and the global cross-attention fusion (eq. 17-18).

``build_token_fusion`` returns the module that turns the cross-modal token set H (B, V, D) into H':

- ``chi``: the hypergraph interaction (:class:`stmi.model.chi.CHI`, the paper's model D).
- ``concat``: no interaction; H' = H (table 4 A, "w/o CHI").
- ``mlp``: an MLP-Mixer block (table 4 B). A plain MLP on the flattened (V*D) tokens would cost ~V^2 D^2
  parameters (60M for V=15, D=512) and bind each weight to a token position anyway, so instead a token-mixing
  MLP (over the V axis, hidden 4V) mixes across modalities and a channel MLP (hidden D) transforms each
  token, both pre-LN and residual. It mixes across modalities like CHI, but with fixed, content-independent
  weights - exactly the contrast the ablation asks about.
- ``mhsa``: one pre-LN transformer self-attention block over the V tokens (table 4 C).

:class:`GlobalFusion` is eq. 18: the three projected CLS tokens G query H' with multi-head cross-attention
(pre-LN on both sides) and a residual, ``U = CrossAttn(G, H', H') + G``.
"""

from __future__ import annotations

import torch
from torch import nn

from stmi.model.chi import CHI
from stmi.model.str_module import CrossAttentionBlock, FeedForward

FUSIONS = ("chi", "concat", "mlp", "mhsa")


class ConcatFusion(nn.Module):
    """No token interaction: H' = H."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class MLPFusion(nn.Module):
    """MLP-Mixer block over the V cross-modal tokens (token-mixing MLP, then channel MLP).

    Args:
        num_nodes: V.
        dim: D.
    """

    def __init__(self, num_nodes: int, dim: int) -> None:
        super().__init__()
        self.norm_tok = nn.LayerNorm(dim)
        hidden = 4 * num_nodes
        self.token_mlp = nn.Sequential(nn.Linear(num_nodes, hidden), nn.GELU(), nn.Linear(hidden, num_nodes))
        self.norm_ch = nn.LayerNorm(dim)
        self.channel_mlp = FeedForward(dim, expansion=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.token_mlp(self.norm_tok(h).transpose(1, 2)).transpose(1, 2)
        return h + self.channel_mlp(self.norm_ch(h))


class MHSAFusion(nn.Module):
    """One pre-LN transformer block (self-attention + 4x FFN) over the V tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.block = CrossAttentionBlock(dim, heads, ffn=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h, h)


def build_token_fusion(kind: str, num_nodes: int, dim: int, heads: int, tau: float, chi_layers: int) -> nn.Module:
    """The table-4 fusion named by ``model.fusion``.

    Raises:
        ValueError: ``kind`` is not one of ``chi | concat | mlp | mhsa``.
    """
    if kind == "chi":
        return CHI(num_nodes, dim, tau, chi_layers)
    if kind == "concat":
        return ConcatFusion()
    if kind == "mlp":
        return MLPFusion(num_nodes, dim)
    if kind == "mhsa":
        return MHSAFusion(dim, heads)
    raise ValueError(f"model.fusion={kind!r} is not one of {list(FUSIONS)}; fix the config or override")


class GlobalFusion(nn.Module):
    """Eq. 18: ``U = CrossAttn(LN(G), LN(H'), LN(H')) + G`` (attention only, no FFN, as in the paper)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.block = CrossAttentionBlock(dim, heads, ffn=False)

    def forward(self, g: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``g`` (B, 3, D), ``tokens`` H' (B, V, D) -> U (B, 3, D)."""
        return self.block(g, tokens)
