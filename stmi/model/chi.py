"""Cross-Modal Hypergraph Interaction (CHI, paper eq. 14-16).

The 3(K+1) STR tokens of the three modalities are the nodes of one hypergraph per sample. Every node j
spans a hyperedge ``e_j = {i : cos(h_i, h_j) >= tau}`` (so j is always in e_j), rebuilt from the current
features at every forward with no gradient through the threshold. A hypergraph convolution (Bai, Zhang and
Torr 2021, node -> hyperedge -> node) then mixes the tokens inside each hyperedge, across modalities:

    X' = GELU(Dv^-1 Inc W De^-1 Inc^T X Theta + b),   H^(l+1) = X' + H^(l)

with ``W = diag(w_e)`` one learnable weight per hyperedge slot (slot j = the hyperedge of node j),
``Dv = Inc w`` the weighted node degree, ``De`` the edge degree (column sums of Inc) and ``b`` a per-node
bias. Because hyperedges are indexed by their seed node, the slot weights and node biases are well defined
even though the incidence changes from sample to sample.

Absent nodes (the STR tokens of a modality a sample lacks; ``node_mask`` False, docs/design.md "Missing
modalities") are removed from that sample's hypergraph: their incidence rows (membership in any hyperedge) and
columns (their own hyperedge) are zero, diagonal included, so ``De`` and ``Dv`` are recomputed over the present
nodes and hyperedges only, and a present node never reads an absent one. An absent node leaves each layer
unchanged (``H^(l+1) = H^(l)`` for it); the global fusion ignores it as a key. With every node present the
computation is exactly the unmasked one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def hypergraph_incidence(nodes: torch.Tensor, tau: float, node_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Incidence matrix of the similarity hypergraph.

    Args:
        nodes: (B, V, D) node features.
        tau: cosine-similarity threshold.
        node_mask: (B, V) bool, False for a node that is not in the sample's hypergraph (an absent modality's
            token): its row and column, diagonal included, are 0. None: every node is in it.

    Returns:
        (B, V, V) float tensor in {0, 1}; ``[b, i, j] = 1`` when node i belongs to the hyperedge of node j,
        i.e. ``cos(h_i, h_j) >= tau``. The diagonal is forced to 1 (a node is in its own hyperedge even when
        ``tau`` exceeds the rounding of ``cos(h, h) = 1``, or for an all-zero node). No gradient. The cosines
        are computed in fp32 with autocast disabled, so bf16 training builds the same hypergraph as fp32.
    """
    if nodes.dim() != 3:
        raise ValueError(f"hypergraph_incidence expects nodes of shape (B, V, D), got {tuple(nodes.shape)}")
    # fp32 with autocast off: a bf16 cosine (autocast would run the matmul in bf16 even after .float()) flips
    # the near-threshold incidences.
    with torch.autocast(device_type=nodes.device.type, enabled=False):
        n = F.normalize(nodes.float(), dim=-1)
        inc = (n @ n.transpose(1, 2) >= tau).to(nodes.dtype)
    inc.diagonal(dim1=1, dim2=2).fill_(1.0)
    if node_mask is not None:
        inc = _mask_incidence(inc, node_mask)
    return inc


def _mask_incidence(inc: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
    """``inc`` with the rows and columns of the nodes where ``node_mask`` (B, V) is False set to 0."""
    if node_mask.shape != inc.shape[:2]:
        raise ValueError(f"node_mask has shape {tuple(node_mask.shape)}, expected (B, V) = {tuple(inc.shape[:2])}")
    keep = node_mask.to(device=inc.device, dtype=torch.bool)
    return inc.masked_fill(~(keep.unsqueeze(2) & keep.unsqueeze(1)), 0.0)


class HypergraphConv(nn.Module):
    """One residual hypergraph convolution over V nodes (eq. 15-16).

    Args:
        num_nodes: V = 3(K+1); the number of hyperedge slots and of per-node biases.
        dim: node width D.
        eps: floor on the degrees; only guards a division by ~0 should a learned ``w_e`` drift to 0
            (at init every ``w_e`` = 1 and Dv >= 1 because each node is in its own hyperedge).
    """

    def __init__(self, num_nodes: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.theta = nn.Linear(dim, dim, bias=False)
        self.edge_weight = nn.Parameter(torch.ones(num_nodes))
        self.bias = nn.Parameter(torch.zeros(num_nodes, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, inc: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``x + GELU(Dv^-1 Inc W De^-1 Inc^T x Theta + b)``.

        Args:
            x: (B, V, D) node features H^(l).
            inc: (B, V, V) incidence from :func:`hypergraph_incidence` (rows nodes, columns hyperedges).
            node_mask: (B, V) bool, False for absent nodes: their rows and columns of ``inc`` are zeroed here too
                (so the degrees count present nodes and hyperedges only) and they are returned unchanged.
        """
        if x.shape[1] != self.num_nodes:
            raise ValueError(f"HypergraphConv built for {self.num_nodes} nodes, got {x.shape[1]}")
        if node_mask is not None:
            inc = _mask_incidence(inc, node_mask)
        inc = inc.to(x.dtype)
        w = self.edge_weight.to(x.dtype)
        de = inc.sum(dim=1).clamp_min(self.eps)  # (B, E): nodes per hyperedge
        dv = (inc @ w).clamp_min(self.eps)  # (B, V): weighted hyperedges per node
        xt = self.theta(x)
        edges = (inc.transpose(1, 2) @ xt) / de.unsqueeze(-1)  # node -> hyperedge (mean)
        nodes = ((inc * w) @ edges) / dv.unsqueeze(-1)  # hyperedge -> node (weighted mean)
        out = x + F.gelu(nodes + self.bias)
        if node_mask is None:
            return out
        return torch.where(node_mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1), out, x)


class CHI(nn.Module):
    """``num_layers`` stacked hypergraph convolutions; the hypergraph is rebuilt from each layer's input.

    With one layer (the default) that is exactly "recomputed every forward"; with more, later layers see
    the hyperedges of the already-mixed features, which is what a dynamic hypergraph means.

    Args:
        num_nodes: V = 3(K+1) (or 3K without the text token, 3 or 4 without STR).
        dim: node width D.
        tau: hyperedge threshold on cosine similarity.
        num_layers: stacked convolutions (``model.chi_layers``).
    """

    def __init__(self, num_nodes: int, dim: int, tau: float, num_layers: int = 1) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.chi_layers={num_layers}: CHI needs at least one layer; set it >= 1")
        self.tau = tau
        self.layers = nn.ModuleList(HypergraphConv(num_nodes, dim) for _ in range(num_layers))

    def forward(self, h: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V, D) -> (B, V, D); ``node_mask`` (B, V) bool excludes absent nodes (module docstring)."""
        for layer in self.layers:
            h = layer(h, hypergraph_incidence(h, self.tau, node_mask), node_mask)
        return h
