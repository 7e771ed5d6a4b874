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

Absent tokens (``node_mask`` (B, V) bool False: the tokens of a modality the sample lacks, docs/design.md "Missing
modalities"), defined the same way for every fusion: a present token's output never depends on an absent one, and
an absent token leaves the fusion unchanged (H' = H for it).

- ``chi``: absent nodes are removed from the hypergraph (rows and columns of the incidence; :mod:`stmi.model.chi`).
- ``concat``: nothing to exclude (no interaction).
- ``mlp``: absent tokens enter the token-mixing MLP as zeros (after its LayerNorm), so the fixed mixing weights
  that would read them multiply 0; the channel MLP is per token.
- ``mhsa``: absent tokens are masked as keys (key padding mask).
- :class:`GlobalFusion`: absent tokens are masked as keys, so U of every modality slot attends to present tokens
  only.

With every token present (``node_mask=None``) each module computes exactly what it computes without the argument.
"""

from __future__ import annotations

import torch
from torch import nn

from stmi.model.chi import CHI
from stmi.model.str_module import CrossAttentionBlock, FeedForward

FUSIONS = ("chi", "concat", "mlp", "mhsa")


def _keep_absent(out: torch.Tensor, h: torch.Tensor, node_mask: torch.Tensor | None) -> torch.Tensor:
    """``out`` for present tokens, the input ``h`` for absent ones (``node_mask`` (B, V) False)."""
    return out if node_mask is None else torch.where(node_mask.unsqueeze(-1), out, h)


class ConcatFusion(nn.Module):
    """No token interaction: H' = H."""

    def forward(self, h: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        del node_mask  # no token reads another, so there is nothing to exclude
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

    def forward(self, h: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        n = self.norm_tok(h)
        if node_mask is not None:  # absent tokens are zeros for the token mixing (module docstring)
            n = n.masked_fill(~node_mask.unsqueeze(-1), 0.0)
        z = h + self.token_mlp(n.transpose(1, 2)).transpose(1, 2)
        return _keep_absent(z + self.channel_mlp(self.norm_ch(z)), h, node_mask)


class MHSAFusion(nn.Module):
    """One pre-LN transformer block (self-attention + 4x FFN) over the V tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.block = CrossAttentionBlock(dim, heads, ffn=True)

    def forward(self, h: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        kpm = None if node_mask is None else ~node_mask
        return _keep_absent(self.block(h, h, key_padding_mask=kpm), h, node_mask)


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

    def forward(self, g: torch.Tensor, tokens: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``g`` (B, 3, D), ``tokens`` H' (B, V, D) -> U (B, 3, D); ``node_mask`` (B, V) bool, False for tokens
        that are not attended to (absent modalities); every sample needs one True."""
        return self.block(g, tokens, key_padding_mask=None if node_mask is None else ~node_mask)
