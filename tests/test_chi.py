"""CHI against its definition (paper eq. 14-16, docs/design.md "CHI").

The incidence is checked against an explicit loop, the convolution against dense matrices.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stmi.model.chi import CHI, HypergraphConv, hypergraph_incidence


def _incidence_loop(nodes: torch.Tensor, tau: float) -> torch.Tensor:
    b, v, _ = nodes.shape
    out = torch.zeros(b, v, v)
    for s in range(b):
        for i in range(v):
            for j in range(v):
                cos = torch.dot(nodes[s, i], nodes[s, j]) / (nodes[s, i].norm() * nodes[s, j].norm())
                out[s, i, j] = 1.0 if (i == j or cos >= tau) else 0.0
    return out


@pytest.mark.parametrize("tau", [-0.2, 0.0, 0.3, 0.9, 1.5])
def test_incidence_matches_definition(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    nodes = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)
    nodes[0, 5] = 2.5 * nodes[0, 1]  # parallel pair: cos = 1, in each other's hyperedge for any tau <= 1
    inc = hypergraph_incidence(nodes, tau)
    assert inc.shape == (3, 10, 10)
    assert set(inc.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(inc.float(), _incidence_loop(nodes, tau))
    assert torch.all(inc.diagonal(dim1=1, dim2=2) == 1)
    if tau <= 0.9:
        assert inc[0, 1, 5] == 1 and inc[0, 5, 1] == 1
    if tau > 1.0:
        torch.testing.assert_close(inc.float(), torch.eye(10).expand(3, -1, -1))


def test_incidence_has_no_gradient() -> None:
    nodes = torch.randn(2, 5, 4, requires_grad=True)
    assert not hypergraph_incidence(nodes, 0.1).requires_grad


def _dense_conv(conv: HypergraphConv, x: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:
    """X + GELU(Dv^-1 H W De^-1 H^T X Theta + b) with explicit diagonal matrices, one sample at a time."""
    outs = []
    w = conv.edge_weight.detach()
    theta = conv.theta.weight.detach().t()
    for s in range(x.shape[0]):
        h = inc[s]
        wm = torch.diag(w)
        dv = torch.diag(1.0 / (h @ w))
        de = torch.diag(1.0 / h.sum(dim=0))
        xp = dv @ h @ wm @ de @ h.t() @ x[s] @ theta + conv.bias.detach()
        outs.append(x[s] + F.gelu(xp))
    return torch.stack(outs)


def test_hypergraph_conv_matches_dense_formula() -> None:
    torch.manual_seed(0)
    v, d = 9, 8
    conv = HypergraphConv(v, d).double()
    with torch.no_grad():
        conv.edge_weight.copy_(torch.rand(v, dtype=torch.float64) + 0.5)  # distinct weights, not the init
        conv.bias.normal_()
    x = torch.randn(2, v, d, dtype=torch.float64)
    inc = hypergraph_incidence(x, 0.1)
    assert 0 < inc.sum() < inc.numel()  # a real hypergraph, neither empty nor complete
    torch.testing.assert_close(conv(x, inc), _dense_conv(conv, x, inc))


def test_hypergraph_conv_identity_incidence() -> None:
    """With only self-hyperedges each node just sees itself: x + GELU(x Theta + b)."""
    torch.manual_seed(1)
    conv = HypergraphConv(4, 6).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    inc = torch.eye(4, dtype=torch.float64).expand(3, -1, -1)
    torch.testing.assert_close(conv(x, inc), x + F.gelu(conv.theta(x) + conv.bias))


def test_chi_stacks_layers_and_mixes_across_nodes() -> None:
    torch.manual_seed(2)
    chi = CHI(num_nodes=6, dim=8, tau=-1.0, num_layers=2)  # tau=-1: every hyperedge holds every node
    assert len(chi.layers) == 2
    x = torch.randn(2, 6, 8)
    y = chi(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 5] += 1.0  # change one node: with complete hyperedges every other node's output changes too
    y2 = chi(x2)
    assert torch.all((y2[:, :5] - y[:, :5]).abs().amax(dim=-1) > 1e-6)


def test_edge_weights_receive_gradient() -> None:
    torch.manual_seed(3)
    chi = CHI(num_nodes=5, dim=4, tau=0.0)
    chi(torch.randn(2, 5, 4)).pow(2).sum().backward()
    w = chi.layers[0].edge_weight
    assert w.grad is not None and math.isfinite(w.grad.abs().sum().item()) and w.grad.abs().sum() > 0


def test_incidence_under_bf16_autocast_equals_fp32() -> None:
    """A crowded hypergraph: many cosines sit near tau, where a bf16 Gram matrix flips incidences."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 1, 512, generator=g)
    nodes = base + 0.9 * torch.randn(16, 15, 512, generator=g)  # 15 nodes per sample, cosines spread around 0.55
    tau = float(F.cosine_similarity(nodes[:, :, None], nodes[:, None], dim=-1).median())
    ref = hypergraph_incidence(nodes, tau)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hypergraph_incidence(nodes, tau)
    assert got.dtype == torch.float32 and 0 < ref.mean() < 1
    assert torch.equal(got, ref), int((got != ref).sum())
