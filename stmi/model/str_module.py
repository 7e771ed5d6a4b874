"""Semantic Token Reallocation (STR, paper eq. 9-13).

Each modality owns ``K`` learnable query tokens; the shared caption feature ``T`` is appended to them
(``Q' = [Q; T]``, eq. 11) and the ``K (+1)`` queries cross-attend to that modality's patch tokens (not the
CLS token), so every patch can contribute to the compact semantic tokens instead of being filtered out.
The block is pre-LayerNorm (on the queries and, separately, on the keys/values) with residuals around the
cross-attention (eq. 12) and around a 4x GELU FFN (eq. 13).

The file is called ``str_module.py`` because ``str`` would shadow the builtin inside the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NUM_MODALITIES = 3


class FeedForward(nn.Sequential):
    """Transformer FFN: Linear(D, 4D) -> GELU -> Linear(4D, D)."""

    def __init__(self, dim: int, expansion: int = 4) -> None:
        super().__init__(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention + pre-LN FFN, both residual (eq. 12-13).

    Args:
        dim: token width D.
        heads: attention heads (must divide ``dim``).
        ffn: whether to add the FFN sub-block (the global fusion of eq. 18 uses attention only).
    """

    def __init__(self, dim: int, heads: int, ffn: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(
                f"model.str_heads={heads} must divide the embedding dim {dim}; choose a divisor of {dim} "
                "(e.g. 8 for ViT-B-16, 4 for stmi-tiny)"
            )
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim) if ffn else None
        self.ffn = FeedForward(dim) if ffn else None

    def forward(self, query: torch.Tensor, context: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``query`` (B, Q, D) attends to ``context`` (B, L, D); returns (B, Q, D).

        ``key_padding_mask`` (B, L) bool, True for context tokens no query may attend to (their attention weight is
        exactly 0); every row needs at least one False. None: all are attended to.
        """
        kv = self.norm_kv(context)
        z = self.attn(self.norm_q(query), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0] + query
        if self.ffn is not None:
            z = self.ffn(self.norm_ffn(z)) + z
        return z


class SemanticTokenReallocation(nn.Module):
    """STR for the three modalities (RGB, NIR, TIR).

    The queries are always modality-specific (``queries`` has shape (3, K, D), trunc-normal 0.02 init like
    ViT's CLS token). With ``share_weights`` (the default, docs/design.md "STR") one cross-attention/FFN block serves
    all three modalities and the three are run as one batch of 3B, which is both the paper's weight sharing
    and the faster path; otherwise each modality has its own block.

    Args:
        dim: token width D (the CLIP embedding dim).
        num_queries: K, learnable queries per modality.
        heads: cross-attention heads.
        share_weights: one block for all modalities.
    """

    def __init__(self, dim: int, num_queries: int, heads: int, share_weights: bool = True) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"model.K={num_queries}: STR needs at least one query per modality; set model.K >= 1")
        self.dim = dim
        self.num_queries = num_queries
        self.share_weights = share_weights
        self.queries = nn.Parameter(torch.empty(NUM_MODALITIES, num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        n_blocks = 1 if share_weights else NUM_MODALITIES
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(n_blocks))

    def tokens_per_modality(self, use_text: bool) -> int:
        """K + 1 with the text token, else K."""
        return self.num_queries + int(use_text)

    def forward(self, patches: Sequence[torch.Tensor], text: torch.Tensor | None = None) -> torch.Tensor:
        """Reallocate each modality's patch tokens into K (+1) semantic tokens.

        Args:
            patches: three (B, N, D) patch-token tensors (RGB, NIR, TIR), CLS excluded.
            text: (B, D) shared caption feature T appended to every modality's queries, or None.

        Returns:
            (B, 3 * (K + 1), D) when ``text`` is given, else (B, 3 * K, D); modality-major order
            ``[F_RGB; F_NIR; F_TIR]`` as H in eq. 14.
        """
        if len(patches) != NUM_MODALITIES:
            raise ValueError(f"STR expects {NUM_MODALITIES} modalities, got {len(patches)}")
        b = patches[0].shape[0]
        q = self.queries.unsqueeze(1).expand(-1, b, -1, -1)  # (3, B, K, D)
        if text is not None:
            t = text.to(q.dtype).unsqueeze(0).unsqueeze(2).expand(NUM_MODALITIES, -1, 1, -1)
            q = torch.cat([q, t], dim=2)
        if self.share_weights:
            out = self.blocks[0](q.reshape(NUM_MODALITIES * b, -1, self.dim), torch.cat(list(patches), dim=0))
            out = out.reshape(NUM_MODALITIES, b, -1, self.dim)
        else:
            out = torch.stack([blk(q[m], patches[m]) for m, blk in enumerate(self.blocks)])
        return out.transpose(0, 1).reshape(b, -1, self.dim)
