"""SFM attention against eq. 3-8 written literally, token-mask construction and perturbation, SFMParams."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import stmi.model.sfm as sfm_mod
from stmi.model.sfm import SFMParams, patch_token_mask, perturb_token_mask, sfm_attention

B, H, L, D = 3, 2, 9, 4


def naive_sfm(q, k, v, m, alpha, beta):  # noqa: ANN001, ANN201
    """Eq. 3-8 with every matrix built explicitly; alpha/beta scalars, (H,) or (B, H)."""
    a = torch.as_tensor(alpha, dtype=q.dtype)
    b = torch.as_tensor(beta, dtype=q.dtype)
    a = a.reshape(1, -1, 1, 1) if a.dim() == 1 else (a[:, :, None, None] if a.dim() == 2 else a)
    b = b.reshape(1, -1, 1, 1) if b.dim() == 1 else (b[:, :, None, None] if b.dim() == 2 else b)
    logits = q @ k.transpose(-2, -1)
    m_pos = logits.amax(-1, keepdim=True) - logits
    m_neg = logits - logits.amin(-1, keepdim=True)
    r = torch.einsum("bi,bj->bij", m, m)[:, None]
    s = a * r * m_pos - b * (1 - r) * m_neg
    return torch.softmax((logits + s) / math.sqrt(q.shape[-1]), dim=-1) @ v


def make(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    m = (torch.rand(B, L, generator=g) < 0.5).to(dtype)
    m[:, 0] = 1
    return q, k, v, m


ALPHA_BETA = {
    "float": (0.3, 0.2),
    "0-d": (torch.tensor(0.7), torch.tensor(0.4)),
    "per-head": (torch.tensor([0.3, -0.5]), torch.tensor([0.7, 1.3])),
}


@pytest.mark.parametrize("kind", list(ALPHA_BETA))
def test_matches_equations_3_to_8(kind: str) -> None:
    q, k, v, m = make()
    alpha, beta = ALPHA_BETA[kind]
    out = sfm_attention(q, k, v, m, alpha, beta)
    ref = naive_sfm(q, k, v, m, alpha, beta)
    assert out.shape == (B, H, L, D)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # The modulation matters: the result is far from plain attention.
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2


def test_zero_alpha_beta_and_no_mask_are_plain_attention() -> None:
    q, k, v, m = make()
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(sfm_attention(q, k, v, m, 0.0, 0.0), plain, rtol=0, atol=1e-12)
    assert torch.equal(sfm_attention(q, k, v, None, 0.5, 0.5), plain)


def test_per_sample_zeroed_parameters_give_plain_attention_for_that_sample_only() -> None:
    q, k, v, m = make()
    gate = torch.tensor([[1.0], [0.0], [1.0]], dtype=q.dtype)
    alpha, beta = torch.tensor([0.3, 0.6], dtype=q.dtype) * gate, torch.tensor([0.2, 0.1], dtype=q.dtype) * gate
    out = sfm_attention(q, k, v, m, alpha, beta)
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out, naive_sfm(q, k, v, m, alpha, beta), rtol=0, atol=1e-12)
    assert (out[0] - plain[0]).abs().max() > 1e-2 and (out[2] - plain[2]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["0-d", "per-head", "per-sample"])
def test_gradients_match_naive_autograd(kind: str) -> None:
    q, k, v, m = make(1)
    if kind == "per-sample":
        alpha = torch.tensor([[0.3, 0.1], [0.0, 0.0], [0.9, -0.2]], dtype=q.dtype, requires_grad=True)
        beta = torch.tensor([[0.2, 0.5], [0.0, 0.0], [0.1, 1.2]], dtype=q.dtype, requires_grad=True)
    else:
        a0, b0 = ALPHA_BETA[kind]
        alpha = a0.to(q.dtype).clone().requires_grad_()
        beta = b0.to(q.dtype).clone().requires_grad_()
    grad = torch.randn(B, H, L, D, dtype=q.dtype, generator=torch.Generator().manual_seed(5))
    inputs = (q, k, v, alpha, beta)
    ours = torch.autograd.grad(sfm_attention(q, k, v, m, alpha, beta), inputs, grad)
    ref = torch.autograd.grad(naive_sfm(q, k, v, m, alpha, beta), inputs, grad)
    for name, a, b in zip("q k v alpha beta".split(), ours, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda s, n=name: f"grad {n}: {s}")
    assert ours[3].abs().sum() > 0 and ours[4].abs().sum() > 0


def test_gradcheck_finite_differences() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    m = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    alpha = torch.tensor([0.4, -0.2], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: sfm_attention(x[0], x[1], x[2], m, x[3], x[4]), (q, k, v, alpha, beta))


def test_batch_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, m = make(3)
    alpha = torch.tensor([[0.3], [0.0], [0.8]], dtype=q.dtype, requires_grad=True)
    beta = torch.tensor([0.2, 0.5], dtype=q.dtype, requires_grad=True)
    grad = torch.randn(B, H, L, D, dtype=q.dtype)

    def run():
        out = sfm_attention(q, k, v, m, alpha, beta)
        return (out, *torch.autograd.grad(out, (q, k, v, alpha, beta), grad))

    whole = run()
    monkeypatch.setattr(sfm_mod, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    assert len(sfm_mod._chunks(B, H, L)) == B
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_saves_one_attention_sized_tensor_for_backward() -> None:
    q, k, v, m = make(dtype=torch.float32)
    alpha = torch.tensor(0.1, requires_grad=True)
    big: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= B * H * L * L:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sfm_attention(q, k, v, m, alpha, alpha)
    assert big == [(B, H, L, L)]


def test_bad_shapes_are_reported() -> None:
    q, k, v, m = make()
    with pytest.raises(ValueError, match="token_mask"):
        sfm_attention(q, k, v, m[:, :-1], 0.1, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        sfm_attention(q, k, v, m, torch.zeros(H + 1), 0.1)


def test_patch_token_mask_threshold() -> None:
    # 8x8 image, 4x4 patches (row-major): foreground fractions 0, 4/16, 8/16, 16/16.
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 0, 4:8] = 1.0  # patch 1: one row of 4 pixels
    mask[0, 0, 4:6, 0:4] = 1.0  # patch 2: two rows
    mask[0, 0, 4:8, 4:8] = 1.0  # patch 3: full
    expect = {
        0.5: [1, 0, 0, 1, 1],
        0.25: [1, 0, 1, 1, 1],
        0.26: [1, 0, 0, 1, 1],
        1.0: [1, 0, 0, 0, 1],
    }
    for thr, want in expect.items():
        assert patch_token_mask(mask, 4, thr).tolist() == [want], thr
    # Non-square input: an 8x4 image has a 2x1 grid; soft values below 0.5 are background.
    tall = torch.zeros(2, 1, 8, 4)
    tall[0, 0, 4:] = 1.0
    tall[1, 0, :4] = 0.4
    assert patch_token_mask(tall, 4).tolist() == [[1, 0, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="multiple of the patch"):
        patch_token_mask(torch.zeros(1, 1, 10, 8), 4)


def test_perturbation_statistics_and_invariants() -> None:
    p, draws = 0.3, 400
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(8, 65, generator=g) < 0.4).float()
    base[:, 0] = 1
    bg = base == 0
    flipped = 0
    for _ in range(draws):
        out = perturb_token_mask(base, p, generator=g)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert torch.all(out[base == 1] == 1)  # foreground and CLS never change
        flipped += int(out[bg].sum())
    n = int(bg.sum()) * draws
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(flipped - n * p) < 5 * sigma, (flipped / n, p)
    assert torch.equal(perturb_token_mask(base, 0.0), base)
    assert torch.all(perturb_token_mask(base, 1.0) == 1)
    cls_bg = base.clone()
    cls_bg[:, 0] = 0  # even a (malformed) background CLS is never flipped
    assert torch.all(perturb_token_mask(cls_bg, 1.0)[:, 0] == 0)
    a = perturb_token_mask(base, p, generator=torch.Generator().manual_seed(7))
    b = perturb_token_mask(base, p, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ModelConfig.p"):
        perturb_token_mask(base, 1.5)


def test_sfm_params_sharing_and_layer_subsets() -> None:
    layer = SFMParams(4, 3, "layer", "all", alpha_init=0.2, beta_init=0.3)
    assert layer.sfm_alpha.shape == (4, 1) and layer.active_layers == (0, 1, 2, 3)
    a, b = layer.get(2)
    assert a.dim() == 0 and a.item() == pytest.approx(0.2) and b.item() == pytest.approx(0.3)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"sfm_alpha", "sfm_beta"}

    shared = SFMParams(4, 3, "shared", "all")
    assert shared.sfm_alpha.shape == (1, 1)
    assert shared.get(0)[0] is not None and shared.get(3)[0].dim() == 0

    head = SFMParams(4, 3, "head", "late")
    assert head.active_layers == (2, 3) and head.sfm_alpha.shape == (2, 3)
    assert head.get(0) is None and head.get(1) is None and head.get(3)[0].shape == (3,)

    early = SFMParams(5, 2, "layer", "early")
    assert early.active_layers == (0, 1) and early.sfm_beta.shape == (2, 1)
    assert early.get(2) is None
    with pytest.raises(ValueError, match="sfm_sharing"):
        SFMParams(4, 3, "per-token", "all")  # type: ignore[arg-type]


def test_bf16_autocast_keeps_alpha_beta_and_their_gradients_fp32() -> None:
    """Under bf16 autocast q/k/v are bf16; alpha/beta and their gradient sums over B H L L terms stay fp32."""
    g = torch.Generator().manual_seed(4)
    b, h, n, d = 6, 4, 65, 32
    x = torch.randn(b, n, 3 * h * d, generator=g)
    m = (torch.rand(b, n, generator=g) < 0.5).float()
    m[:, 0] = 1
    grad = torch.randn(b, h, n, d, generator=g)

    def qkv(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0))

    alpha = torch.tensor(0.3, requires_grad=True)
    beta = torch.tensor(0.2, requires_grad=True)
    xb = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sfm_attention(*qkv(xb), m, alpha, beta)
    assert out.dtype == torch.bfloat16
    ga, gb = torch.autograd.grad(out, (alpha, beta), grad.to(torch.bfloat16))
    assert ga.dtype == gb.dtype == torch.float32
    # Reference: the same bf16 inputs, everything else in fp64.
    a64, b64 = alpha.detach().double().requires_grad_(), beta.detach().double().requires_grad_()
    ref = naive_sfm(*qkv(xb.detach().double()), m.double(), a64, b64)
    ra, rb = torch.autograd.grad(ref, (a64, b64), grad.to(torch.bfloat16).double())
    # bf16 logits / probabilities / dL/dZ made these 0.2-8 % wrong (ViT shapes); fp32 inside leaves the rounding
    # of the bf16 output only.
    assert abs(ga.item() - ra.item()) < 1e-3 * abs(ra.item()), (ga.item(), ra.item())
    assert abs(gb.item() - rb.item()) < 1e-3 * abs(rb.item()), (gb.item(), rb.item())
    assert (out.double() - ref).abs().max() < 1e-2


def test_kernel_selection() -> None:
    assert sfm_mod.resolve_sfm_kernel("auto", "cpu") == "explicit"
    assert sfm_mod.resolve_sfm_kernel("auto", "cuda") == "flex"
    assert sfm_mod.resolve_sfm_kernel("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="sfm_kernel"):
        sfm_mod.resolve_sfm_kernel("triton", "cpu")


@pytest.mark.parametrize("kind", ["per-head", "per-sample"])
def test_flex_formulation_forward_and_gradients_match_naive(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (flex forward and flex's own backward through the captured score_mod terms) on torch's
    uncompiled flex reference, in fp64: the score_mod, the captured-buffer gradients and the row max/min path."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)  # the reference runs on CPU; the kernel does not
    q, k, v, m = make(6)
    if kind == "per-sample":
        alpha = torch.tensor([[0.3, 0.1], [0.0, 0.0], [0.9, -0.2]], dtype=q.dtype, requires_grad=True)
        beta = torch.tensor([[0.2, 0.5], [0.0, 0.0], [0.1, 1.2]], dtype=q.dtype, requires_grad=True)
    else:
        alpha = torch.tensor([0.3, -0.5], dtype=q.dtype, requires_grad=True)
        beta = torch.tensor([0.7, 1.3], dtype=q.dtype, requires_grad=True)
    grad = torch.randn(B, H, L, D, dtype=q.dtype, generator=torch.Generator().manual_seed(5))
    inputs = (q, k, v, alpha, beta)
    a2, b2 = sfm_mod._as_bh(alpha, "alpha", B, H, q), sfm_mod._as_bh(beta, "beta", B, H, q)
    out = sfm_mod._sfm_flex_autograd(q, k, v, m, a2, b2, flex=fa.flex_attention)
    ref = naive_sfm(q, k, v, m, alpha, beta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(ref, inputs, grad)
    for name, a, b in zip("q k v alpha beta".split(), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda s, n=name: f"grad {n}: {s}")


@pytest.mark.slow  # torch.compile of the flex kernel: about a minute
def test_compiled_flex_kernel_matches_equations_and_saves_no_attention_matrix() -> None:
    """The compiled flex kernel (CPU: flex forward, explicit backward recomputing the probabilities) in fp32 against
    eq. 3-8 in fp64. One compilation (about a minute on a CPU), so one shape only."""
    g = torch.Generator().manual_seed(7)
    b, h, n, d = 3, 2, 17, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    m = (torch.rand(b, n, generator=g) < 0.5).double()
    m[:, 0] = 1
    alpha = torch.tensor([0.3, -0.5], dtype=torch.float64)
    beta = torch.tensor([0.7, 1.3], dtype=torch.float64)
    grad = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, alpha, beta)]
    ref = naive_sfm(ref_in[0], ref_in[1], ref_in[2], m, ref_in[3], ref_in[4])
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    ins = [t.float().requires_grad_() for t in (q, k, v, alpha, beta)]
    big: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= b * h * n * n:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sfm_attention(ins[0], ins[1], ins[2], m.float(), ins[3], ins[4], kernel="flex")
    assert big == []  # nothing of size (B, H, L, L) is kept for backward
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    grads = torch.autograd.grad(out, ins, grad.float())
    for name, a, r in zip("q k v alpha beta".split(), grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5, msg=lambda s, nm=name: f"grad {nm}: {s}")
    assert (out - F.scaled_dot_product_attention(ins[0], ins[1], ins[2])).abs().max() > 1e-2
