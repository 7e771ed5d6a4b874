"""Segmentation-guided feature modulation (SFM, paper eq. 1-8; choices: docs/design.md "SFM").

Per attention layer and head, with unscaled logits ``A = q k^T`` and the token mask ``m`` (CLS at index 0, always 1)::

    Mpos = rowmax(A) - A ;  Mneg = A - rowmin(A) ;  R = m m^T
    S    = alpha * R * Mpos - beta * (1 - R) * Mneg
    out  = softmax((A + S) / sqrt(d)) @ v

Why a custom autograd function: written naively, the modulation keeps ``A``, ``Mpos``, ``Mneg``, ``R`` and ``S``
as ``(B, H, L, L)`` tensors alive for backward, several times the memory of plain attention. Using the identity
``A + S = A * (1 - alpha R - beta (1 - R)) + alpha R rowmax + beta (1 - R) rowmin`` and ``R = m m^T`` (rank one),
the whole modulated logit matrix is a single matrix product of augmented operands::

    (A + S) / sqrt(d) = [c0 q, u m_i q, w] @ [k, m_j k, m_j]^T + (row constant, which softmax ignores)

with ``c0 = (1 - beta) / sqrt(d)``, ``u = (beta - alpha) / sqrt(d)``, ``w_i = m_i (alpha rowmax_i - beta rowmin_i)
/ sqrt(d)``. The backward pass likewise needs only the softmax probabilities: every reduction over ``A`` that the
gradients of alpha and beta need (``sum_j G_ij A_ij m_j``) is ``q_i . (G (m k))_i``, a matrix product. So autograd
saves exactly one ``(B, H, L, L)`` tensor (the probabilities, as plain attention does) plus ``O(B H L d)`` vectors,
and adds no elementwise pass over ``(B, H, L, L)`` beyond the row max/min of the logits.

Gradients flow to ``q``, ``k``, ``v``, ``alpha`` and ``beta``, including the path through ``rowmax``/``rowmin``
(to the single arg-max/arg-min key; ties, which have measure zero for real-valued logits, go to the first index).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SFM_KERNELS", "SFMParams", "patch_token_mask", "perturb_token_mask", "resolve_sfm_kernel", "sfm_attention"]

Scalar = float | Tensor


def _as_bh(x: Scalar, name: str, batch: int, heads: int, ref: Tensor) -> Tensor:
    """Bring alpha/beta to a 2-d ``(B or 1, H or 1)`` tensor (a differentiable view when ``x`` is a tensor).

    Accepted: python numbers, 0-d tensors, ``(H,)`` per head, and 2-d values broadcastable to ``(B, H)`` such as
    ``(B, 1)`` per sample (used to zero the modulation of samples without a mask).
    """
    # At least fp32: under bf16 autocast q/k/v are bf16, but alpha/beta (and so their gradients, accumulated over
    # B H L L terms) stay fp32.
    dtype = torch.promote_types(ref.dtype, torch.float32)
    t = x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=dtype)
    t = t.to(device=ref.device, dtype=dtype)
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        t = t.reshape(1, -1)
    elif t.dim() != 2:
        raise ValueError(f"sfm_attention: {name} must be a scalar, (H,) or (B, H)-broadcastable, got {tuple(t.shape)}")
    if t.shape[0] not in (1, batch) or t.shape[1] not in (1, heads):
        raise ValueError(
            f"sfm_attention: {name} of shape {tuple(t.shape)} does not broadcast to (B, H) = ({batch}, {heads})"
        )
    return t


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a ``(B, H)`` gradient over the dimensions along which the parameter was broadcast."""
    if shape[0] == 1:
        grad = grad.sum(0, keepdim=True)
    if shape[1] == 1:
        grad = grad.sum(1, keepdim=True)
    return grad


_CHUNK_ELEMENTS = 1 << 22
"""Batch chunks are sized so one chunk's (b, H, L, L) temporaries hold about this many elements (16 MiB in fp32)."""


def _chunks(bsz: int, heads: int, length: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // (heads * length * length))
    return [slice(i, min(i + step, bsz)) for i in range(0, bsz, step)]


def _rows(x: Tensor, sl: slice) -> Tensor:
    """Slice a per-sample tensor, leaving batch-broadcast ones (leading dim 1) alone."""
    return x if x.shape[0] == 1 else x[sl]


class _SFMAttention(torch.autograd.Function):
    """softmax((A + S) / sqrt(d)) @ v with a hand-written backward that saves only the probabilities.

    Forward and backward run over batch chunks so the transient (b, H, L, L) buffers (logits, the gradient of the
    probabilities) exist for one chunk at a time; only the full probability tensor lives between the passes. The
    logits of a chunk are recomputed in backward (one ``q k^T`` product) instead of being kept.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, m: Tensor, alpha: Tensor, beta: Tensor
    ) -> Tensor:
        bsz, heads, length, dim = q.shape
        scale = 1.0 / math.sqrt(dim)
        probs = q.new_empty(bsz, heads, length, length)
        out = q.new_empty(bsz, heads, length, v.shape[-1])
        stats = q.new_empty(2, bsz, heads, length, 1)
        idx = torch.empty(2, bsz, heads, length, 1, dtype=torch.long, device=q.device)
        for sl in _chunks(bsz, heads, length):
            a4 = _rows(alpha, sl)[:, :, None, None]
            b4 = _rows(beta, sl)[:, :, None, None]
            m_col = m[sl][:, None, None, :]
            logits = torch.matmul(q[sl], k[sl].transpose(-2, -1))
            rowmax, idx_max = logits.max(dim=-1, keepdim=True)
            rowmin, idx_min = logits.min(dim=-1, keepdim=True)
            # Z = A * coef + w_i m_j = (A + S)/sqrt(d) minus the row constant beta*rowmin_i/sqrt(d), in place.
            logits.mul_(_coef(a4, b4, m[sl], scale))
            logits.addcmul_(m_col.transpose(-2, -1) * (a4 * rowmax - b4 * rowmin) * scale, m_col)
            torch.ops.aten._softmax.out(logits, -1, False, out=probs[sl])
            del logits
            torch.matmul(probs[sl], v[sl], out=out[sl])
            stats[0, sl], stats[1, sl] = rowmax, rowmin
            idx[0, sl], idx[1, sl] = idx_max, idx_min
        ctx.save_for_backward(q, k, v, m, alpha, beta, probs, stats, idx)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, m, alpha, beta, probs, stats, idx = ctx.saved_tensors
        return _sfm_backward(ctx.needs_input_grad, grad_out, q, k, v, m, alpha, beta, probs, stats, idx)


def _sfm_backward(needs_input_grad: tuple[bool, ...], grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, m: Tensor,
                  alpha: Tensor, beta: Tensor, probs: Tensor | None, stats: Tensor, idx: Tensor):
    """Gradients of eq. 3-8 from the saved probabilities, or (``probs`` None) from probabilities recomputed per
    chunk out of the logits, which the alpha/beta gradients recompute anyway (the flex path saves no
    ``(B, H, L, L)`` tensor)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _sfm_backward_impl(needs_input_grad, grad_out, q, k, v, m, alpha, beta, probs, stats, idx)


def _sfm_backward_impl(needs_input_grad: tuple[bool, ...], grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       m: Tensor, alpha: Tensor, beta: Tensor, probs: Tensor | None, stats: Tensor, idx: Tensor):
    bsz, heads, length, dim = q.shape
    scale = 1.0 / math.sqrt(dim)
    need_q, need_k, need_v, _, need_a, need_b = needs_input_grad
    grad_q = torch.empty_like(q) if need_q else None
    grad_k = torch.empty_like(k) if need_k else None
    grad_v = torch.empty_like(v) if need_v else None
    grad_a_bh = alpha.new_zeros(alpha.shape[0], heads) if need_a else None  # alpha's dtype: >= fp32
    grad_b_bh = beta.new_zeros(beta.shape[0], heads) if need_b else None
    grad_out = grad_out.to(q.dtype).contiguous()

    for sl in _chunks(bsz, heads, length):
        qc, kc, go = q[sl], k[sl], grad_out[sl]
        rowmax, rowmin, idx_max, idx_min = stats[0, sl], stats[1, sl], idx[0, sl], idx[1, sl]
        a4 = _rows(alpha, sl)[:, :, None, None]
        b4 = _rows(beta, sl)[:, :, None, None]
        nb = qc.shape[0]
        m_vec = m[sl].view(nb, 1, length, 1)  # m as a column vector (for products) and as the row mask m_i
        logits = None
        if probs is not None:
            pc = probs[sl]
        else:
            logits = torch.matmul(qc, kc.transpose(-2, -1))
            pc = _modulated_softmax(logits, a4, b4, m[sl], rowmax, rowmin, scale)
        if need_v:
            torch.matmul(pc.transpose(-2, -1), go, out=grad_v[sl])
        grad_p = torch.matmul(go, v[sl].transpose(-2, -1))
        # g = dL/dZ for the scaled logits Z; g * scale = dL/d(A + S). Rows of g sum to zero (softmax), which is
        # why the row constant dropped in forward needs no term here.
        g = torch._softmax_backward_data(grad_p, pc, -1, pc.dtype)
        del grad_p, pc
        # The reductions that feed alpha/beta (and the rowmax/rowmin paths) run in fp32 even for bf16 inputs.
        g32 = g if g.dtype in (torch.float32, torch.float64) else g.float()
        m32 = m_vec.to(g32.dtype)
        g_m = torch.matmul(g32, m32) * scale  # sum_j G'_ij m_j
        fg_g = m32 * g_m  # weight of row i's rowmax/rowmin paths
        if need_a or need_b:
            logits = logits if logits is not None else torch.matmul(qc, kc.transpose(-2, -1))
            ga = logits.to(g32.dtype).mul_(g32) if g32 is not g else logits.mul_(g)  # A times g
            del logits
            ga_1 = ga.sum(-1, keepdim=True) * scale  # sum_j G'_ij A_ij
            ga_m = torch.matmul(ga, m32) * scale  # sum_j G'_ij A_ij m_j
            del ga
            if need_a:
                _accumulate(grad_a_bh, (rowmax * fg_g - m32 * ga_m).sum((-2, -1)), sl)
            if need_b:
                _accumulate(grad_b_bh, (-ga_1 - rowmin * fg_g + m32 * ga_m).sum((-2, -1)), sl)
        del g32
        if need_q or need_k:
            # dL/dA: the direct path g * dZ/dA, plus the rowmax / rowmin paths to the arg-max / arg-min keys.
            grad_a = g.mul_(_coef(a4, b4, m[sl], scale))
            grad_a.scatter_add_(-1, idx_max, (a4 * fg_g).to(g.dtype).expand(nb, heads, length, 1))
            grad_a.scatter_add_(-1, idx_min, (-b4 * fg_g).to(g.dtype).expand(nb, heads, length, 1))
            if need_q:
                torch.matmul(grad_a, kc, out=grad_q[sl])
            if need_k:
                torch.matmul(grad_a.transpose(-2, -1), qc, out=grad_k[sl])
        del g

    grad_a = _reduce_to(grad_a_bh, alpha.shape) if need_a else None
    grad_b = _reduce_to(grad_b_bh, beta.shape) if need_b else None
    return grad_q, grad_k, grad_v, None, grad_a, grad_b


def _coef(a4: Tensor, b4: Tensor, m: Tensor, scale: float) -> Tensor:
    """dZ/dA = (1 - alpha R - beta (1 - R)) / sqrt(d) = ((1 - beta) + (beta - alpha) m_i m_j) / sqrt(d).

    Built by broadcasting ``m_i`` against ``m_j``: ``(b, 1, L, L)`` when alpha/beta are shared by the heads.
    """
    nb, length = m.shape
    m_row, m_col = m.view(nb, 1, length, 1), m.view(nb, 1, 1, length)
    return torch.addcmul((1.0 - b4) * scale, (b4 - a4) * scale * m_row, m_col)


def _modulated_softmax(logits: Tensor, a4: Tensor, b4: Tensor, m: Tensor, rowmax: Tensor, rowmin: Tensor,
                       scale: float) -> Tensor:
    """softmax(Z), Z = A * coef + w_i m_j (eq. 7 less a row constant), as a new tensor (``logits`` is kept)."""
    nb, length = m.shape
    m_col = m.view(nb, 1, 1, length)
    z = logits * _coef(a4, b4, m, scale)
    z.addcmul_(m_col.transpose(-2, -1) * (a4 * rowmax - b4 * rowmin) * scale, m_col)
    return torch.softmax(z, -1).to(logits.dtype)


def _accumulate(total: Tensor, chunk: Tensor, sl: slice) -> None:
    """Add a chunk's (b, H) parameter gradient into the (B or 1, H or 1) accumulator."""
    if total.shape[0] == 1:
        chunk = chunk.sum(0, keepdim=True)
    else:
        total = total[sl]
    if total.shape[1] == 1:
        chunk = chunk.sum(1, keepdim=True)
    total.add_(chunk)


# ----------------------------------------------------------------------------------------- fused path (flex)
SFM_KERNELS = ("auto", "flex", "explicit")


def resolve_sfm_kernel(kernel: str, device: torch.device | str) -> str:
    """``auto`` -> ``flex`` on CUDA, ``explicit`` elsewhere (on CPU the explicit function is the faster one,
    ``benchmarks/sfm_attention.py``); ``flex`` and ``explicit`` are returned as they are."""
    if kernel not in SFM_KERNELS:
        raise ValueError(f"ModelConfig.sfm_kernel must be one of {'|'.join(SFM_KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        return "flex" if torch.device(device).type == "cuda" else "explicit"
    return kernel


_FLEX: dict[str, object] = {}


def _compiled_flex():  # noqa: ANN202 - the compiled torch flex_attention
    """``torch.compile(flex_attention)``, built once per process (the first call per shape compiles a kernel)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


@torch.no_grad()
def _row_extrema(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Row max/min of the logits ``q k^T`` and their (first) arg indices, ``(2, B, H, L, 1)`` each, by chunks."""
    bsz, heads, length, _ = q.shape
    stats = q.new_empty(2, bsz, heads, length, 1)
    idx = torch.empty(2, bsz, heads, length, 1, dtype=torch.long, device=q.device)
    for sl in _chunks(bsz, heads, length):
        logits = torch.matmul(q[sl], k[sl].transpose(-2, -1))
        torch.max(logits, -1, keepdim=True, out=(stats[0, sl], idx[0, sl]))
        torch.min(logits, -1, keepdim=True, out=(stats[1, sl], idx[1, sl]))
    return stats, idx


def _flex_terms(q: Tensor, k: Tensor, m: Tensor, alpha: Tensor, beta: Tensor, idx: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The per-(b, h) scale terms ``c0 = (1 - beta)/sqrt(d)``, ``u = (beta - alpha)/sqrt(d)`` and the per-row
    weight ``w_i = m_i (alpha rowmax_i - beta rowmin_i)/sqrt(d)``, differentiable in q, k, alpha and beta.

    The row max/min are re-expressed as ``q_i . k_argmax(i)`` (a gather and an O(B H L d) dot product), so
    autograd sends their gradient to the arg-max/arg-min key exactly as eq. 5-6 do.
    """
    bsz, heads, length, dim = q.shape
    scale = 1.0 / math.sqrt(dim)
    dt = alpha.dtype
    a, b = alpha.expand(bsz, heads), beta.expand(bsz, heads)
    gather = idx.squeeze(-1).unsqueeze(-1).expand(2, bsz, heads, length, dim)
    rowmax = (q.to(dt) * k.gather(2, gather[0]).to(dt)).sum(-1)
    rowmin = (q.to(dt) * k.gather(2, gather[1]).to(dt)).sum(-1)
    w = m.to(dt)[:, None, :] * (a[..., None] * rowmax - b[..., None] * rowmin) * scale
    return ((1.0 - b) * scale).contiguous(), ((b - a) * scale).contiguous(), w.contiguous()


def _score_mod(m: Tensor, c0: Tensor, u: Tensor, w: Tensor):  # noqa: ANN202 - a flex score_mod
    """Eq. 7 per logit: ``A_ij (c0 + u m_i m_j) + w_i m_j`` (= (A + S)_ij / sqrt(d) less a row constant)."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        m_j = m[b, kv_idx]
        return score * (c0[b, h] + u[b, h] * m[b, q_idx] * m_j) + w[b, h, q_idx] * m_j

    return score_mod


def _sfm_flex_autograd(q: Tensor, k: Tensor, v: Tensor, m: Tensor, alpha: Tensor, beta: Tensor,
                       flex=None) -> Tensor:  # noqa: ANN001
    """SFM through flex attention end to end (forward and flex's fused backward, which also returns the gradients
    of the captured c0, u, w; autograd carries them on to alpha, beta and, via the row max/min, to q and k).

    This is the CUDA path: torch's flex backward does not run on the CPU. ``flex`` defaults to the compiled
    ``flex_attention``; the tests pass torch's uncompiled reference implementation to check the formulation.
    """
    _, idx = _row_extrema(q, k)
    c0, u, w = _flex_terms(q, k, m, alpha, beta, idx)
    fn = flex if flex is not None else _compiled_flex()
    return fn(q, k, v, score_mod=_score_mod(m, c0, u, w), scale=1.0)


class _SFMFlexForward(torch.autograd.Function):
    """SFM with the forward in the compiled flex kernel and the backward of :class:`_SFMAttention` recomputing the
    probabilities chunk by chunk: no ``(B, H, L, L)`` tensor is saved. Used where flex has no backward (CPU)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, m: Tensor, alpha: Tensor, beta: Tensor
    ) -> Tensor:
        stats, idx = _row_extrema(q, k)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        c0, u, w = _flex_terms(qd, kd, m, alpha.detach(), beta.detach(), idx)
        out = _compiled_flex()(qd, kd, vd, score_mod=_score_mod(m, c0, u, w), scale=1.0)
        ctx.save_for_backward(q, k, v, m, alpha, beta, stats, idx)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, m, alpha, beta, stats, idx = ctx.saved_tensors
        return _sfm_backward(ctx.needs_input_grad, grad_out, q, k, v, m, alpha, beta, None, stats, idx)


def sfm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    alpha: Scalar,
    beta: Scalar,
    kernel: str = "explicit",
) -> Tensor:
    """Segmentation-guided modulated attention (eq. 3-8).

    Args:
        q, k, v: ``(B, H, L, d)``; L = N + 1 tokens with CLS at index 0.
        token_mask: ``(B, L)`` in {0, 1} (CLS = 1), or None for plain attention (exactly
            ``F.scaled_dot_product_attention``).
        alpha, beta: modulation strengths: python floats, 0-d tensors, ``(H,)`` per-head tensors, or 2-d tensors
            broadcastable to ``(B, H)`` (e.g. ``(B, 1)``) so a caller can zero them for samples without a mask, which
            then get S = 0 exactly. Gradients flow to tensor values.
        kernel: ``explicit`` (the custom autograd function over explicit logits), ``flex`` (the fused
            ``torch.nn.attention.flex_attention`` kernel, compiled on first use per shape; on CUDA forward and
            backward are flex kernels, on the CPU, where flex has no backward, the backward is the explicit one
            recomputing the probabilities) or ``auto`` (:func:`resolve_sfm_kernel`: flex on CUDA). All are exact
            to eq. 3-8 up to rounding.

    Returns:
        ``(B, H, L, d)``.
    """
    if token_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"sfm_attention: q, k, v must be (B, H, L, d); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    bsz, heads, length, _ = q.shape
    if token_mask.shape != (bsz, length):
        raise ValueError(f"sfm_attention: token_mask must be (B, L) = ({bsz}, {length}), got {tuple(token_mask.shape)}")
    a = _as_bh(alpha, "alpha", bsz, heads, q)
    b = _as_bh(beta, "beta", bsz, heads, q)
    flex = resolve_sfm_kernel(kernel, q.device) == "flex"
    # Autocast off inside: the fused flex kernel takes bf16 q/k/v and accumulates in fp32 itself; the explicit
    # paths materialise logits, probabilities and the gradient sums behind alpha/beta, so they run in (at least)
    # fp32 and the output is cast back (in bf16 their alpha/beta gradients erred by 2-8 %).
    with torch.autocast(device_type=q.device.type, enabled=False):
        if flex and q.device.type == "cuda":
            m = token_mask.to(device=q.device, dtype=torch.float32).contiguous()
            return _sfm_flex_autograd(q, k, v, m, a, b)
        work = torch.promote_types(q.dtype, torch.float32)
        m = token_mask.to(device=q.device, dtype=work).contiguous()
        fn = _SFMFlexForward if flex else _SFMAttention
        out = fn.apply(q.to(work), k.to(work), v.to(work), m, a, b)
        return out.to(q.dtype)


def patch_token_mask(mask: Tensor, patch_size: int | tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Token mask (eq. 2) from a pixel mask: patch i is foreground when its foreground fraction >= threshold.

    Args:
        mask: ``(B, 1, H, W)`` float in [0, 1] (values > 0.5 count as foreground, so resized soft masks behave).
        patch_size: the ViT patch size (int or (ph, pw)); H and W must be multiples of it.
        threshold: ``ModelConfig.mask_patch_threshold``.

    Returns:
        ``(B, N + 1)`` float in {0, 1}, index 0 (CLS) always 1, patches in row-major order as the ViT flattens them.
    """
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"patch_token_mask: mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    if mask.shape[-2] % ph or mask.shape[-1] % pw:
        raise ValueError(f"patch_token_mask: mask size {tuple(mask.shape[-2:])} is not a multiple of the patch "
                         f"size {(ph, pw)}; resize the mask with the image")
    fg = (mask.float() > 0.5).float()
    frac = F.avg_pool2d(fg, kernel_size=(ph, pw), stride=(ph, pw)).flatten(1)
    patches = (frac >= threshold - 1e-6).float()
    return torch.cat([torch.ones_like(patches[:, :1]), patches], dim=1)


def perturb_token_mask(token_mask: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Flip each background patch token (m_i = 0, i >= 1) to foreground with probability ``p``, independently.

    Foreground tokens and CLS never change. The STMI model calls this once per forward pass in training only and
    passes the same perturbed mask to every layer; the visual encoder never perturbs by itself.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"perturb_token_mask: p must be in [0, 1] (ModelConfig.p), got {p}")
    if p == 0.0:
        return token_mask
    device = token_mask.device if generator is None else generator.device
    draws = torch.rand(token_mask.shape, generator=generator, device=device).to(token_mask.device)
    flip = (draws < p) & (token_mask == 0)
    flip[:, 0] = False
    return torch.where(flip, torch.ones_like(token_mask), token_mask)


class SFMParams(nn.Module):
    """The learnable alpha/beta of every visual attention layer (paper table 5).

    Args:
        num_layers: transformer layers of the visual encoder.
        num_heads: attention heads per layer.
        sharing: ``layer`` one (alpha, beta) per modulated layer shared by its heads (default, table 5 E);
            ``shared`` one pair for all modulated layers; ``head`` one pair per modulated layer and head.
        layers: ``all``, ``early`` (first half, ``num_layers // 2`` layers) or ``late`` (the rest); other layers
            run plain attention.
        alpha_init, beta_init: initial values (``ModelConfig.alpha_init`` / ``beta_init``).

    Parameters are named ``sfm_alpha`` and ``sfm_beta`` (rows = modulated layers in order).
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        sharing: Literal["layer", "shared", "head"] = "layer",
        layers: Literal["all", "early", "late"] = "all",
        alpha_init: float = 0.1,
        beta_init: float = 0.1,
    ) -> None:
        super().__init__()
        if sharing not in ("layer", "shared", "head"):
            raise ValueError(f"ModelConfig.sfm_sharing must be layer|shared|head, got {sharing!r}")
        if layers not in ("all", "early", "late"):
            raise ValueError(f"ModelConfig.sfm_layers must be all|early|late, got {layers!r}")
        half = num_layers // 2
        active = {"all": range(num_layers), "early": range(half), "late": range(half, num_layers)}[layers]
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.sharing = sharing
        self.layers = layers
        self.active_layers: tuple[int, ...] = tuple(active)
        self._row = {layer: i for i, layer in enumerate(self.active_layers)}
        rows = 1 if sharing == "shared" else len(self.active_layers)
        cols = num_heads if sharing == "head" else 1
        self.sfm_alpha = nn.Parameter(torch.full((rows, cols), float(alpha_init)))
        self.sfm_beta = nn.Parameter(torch.full((rows, cols), float(beta_init)))

    def is_active(self, layer: int) -> bool:
        """Whether ``layer`` (0-based) is modulated."""
        return layer in self._row

    def get(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """(alpha, beta) of ``layer``: 0-d tensors, or ``(H,)`` with ``head`` sharing; None if not modulated."""
        if layer not in self._row:
            return None
        row = 0 if self.sharing == "shared" else self._row[layer]
        a, b = self.sfm_alpha[row], self.sfm_beta[row]
        if self.sharing != "head":
            a, b = a[0], b[0]
        return a, b

    def extra_repr(self) -> str:
        return f"sharing={self.sharing}, layers={self.layers}, active={list(self.active_layers)}"
