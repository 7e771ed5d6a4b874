"""SFM attention vs plain attention: forward+backward time, saved activations and peak memory, side by side.

Compares ``stmi.model.sfm.sfm_attention`` (with a random token mask and learnable alpha/beta), with both kernels
(``explicit``: the custom autograd function; ``flex``: the compiled ``flex_attention`` score_mod), against
``F.scaled_dot_product_attention`` with the default backend (a fused flash kernel on CPU; on CUDA also the flash
backend on its own) and with the math backend, plus the naive eq. 3-8 implementation for reference. Shapes
default to ViT-B/16 on a 256x128 input (B=64, H=12, L=129, d=64); ``--quick`` uses small ones. Runs on CUDA when
present (bf16 there by default, as training does; fp32 on CPU).

Memory is reported two ways: the bytes autograd saves for backward (counted with
``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage, with the number of saved ``(B, H, L, L)``
tensors) and the peak of live allocations during forward+backward (CPU: ``torch.profiler`` memory events; CUDA:
``torch.cuda.max_memory_allocated``). The flex kernel is compiled in the warm-up (tens of seconds on a CPU).

Targets: the faster SFM kernel within 1.5x of math SDPA and within 1.1x of the default (fused) SDPA.

    python benchmarks/sfm_attention.py [--quick] [--reps 5] [--threads N] [--device cpu|cuda] [--no-flex]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stmi.model.sfm import resolve_sfm_kernel, sfm_attention  # noqa: E402

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def naive_sfm(q, k, v, m, alpha, beta):  # noqa: ANN001, ANN201 - reference only
    """Eq. 3-8 written literally (builds Mpos, Mneg, R, S)."""
    logits = q @ k.transpose(-2, -1)
    mpos = logits.amax(-1, keepdim=True) - logits
    mneg = logits - logits.amin(-1, keepdim=True)
    r = m[:, None, :, None] * m[:, None, None, :]
    s = alpha * r * mpos - beta * (1 - r) * mneg
    return torch.softmax((logits + s) / math.sqrt(q.shape[-1]), -1) @ v


def make_inputs(b: int, h: int, n: int, d: int, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    m = (torch.rand(b, n, generator=g) < 0.5).float()
    m[:, 0] = 1
    alpha = torch.tensor(0.1, device=device, requires_grad=True)
    beta = torch.tensor(0.1, device=device, requires_grad=True)
    return q, k, v, m.to(device, dtype), alpha, beta


def variants(device: str, flex: bool = True) -> dict[str, Callable[[Inputs], torch.Tensor]]:
    def sdpa_default(x: Inputs) -> torch.Tensor:
        return F.scaled_dot_product_attention(x[0], x[1], x[2])

    def sdpa_math(x: Inputs) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(x[0], x[1], x[2])

    def sdpa_flash(x: Inputs) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x[0], x[1], x[2])

    fns: dict[str, Callable[[Inputs], torch.Tensor]] = {
        "sdpa (default backend)": sdpa_default,
        "sdpa (math backend)": sdpa_math,
    }
    if device == "cuda":
        fns["sdpa (flash backend)"] = sdpa_flash
    fns["sfm_attention explicit"] = lambda x: sfm_attention(*x, kernel="explicit")
    if flex:
        fns["sfm_attention flex"] = lambda x: sfm_attention(*x, kernel="flex")
    fns["naive SFM (eq. 3-8)"] = lambda x: naive_sfm(*x)
    return fns


def _sync(x: Inputs) -> None:
    if x[0].is_cuda:
        torch.cuda.synchronize()


def step(fn: Callable[[Inputs], torch.Tensor], x: Inputs, grad: torch.Tensor) -> None:
    for t in x:
        t.grad = None
    fn(x).backward(grad)
    _sync(x)


def time_all(fns: dict[str, Callable[[Inputs], torch.Tensor]], x: Inputs, grad: torch.Tensor,
             reps: int) -> dict[str, float]:
    """Median forward+backward seconds per variant; repetitions are interleaved across the variants so a change
    in machine load (shared CPUs) hits every variant alike instead of skewing the ratios."""
    for fn in fns.values():
        step(fn, x, grad)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            step(fn, x, grad)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def saved_tensors(fn: Callable[[Inputs], torch.Tensor], x: Inputs) -> tuple[int, int]:
    """(bytes saved for backward, number of saved tensors with >= B*H*L*L elements)."""
    b, h, n, _ = x[0].shape
    seen: dict[tuple[int, int], int] = {}
    big = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal big
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            if t.numel() >= b * h * n * n:
                big += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(seen.values()), big


def peak_memory(fn: Callable[[Inputs], torch.Tensor], x: Inputs, grad: torch.Tensor) -> int:
    """Peak of live bytes allocated during one forward+backward, relative to the start.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU:
    Walks the allocation events that ``torch.profiler.profile(profile_memory=True)`` records (every allocation
    and free with its size) in time order and keeps the running maximum.
    """
    if x[0].is_cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, x, grad)
        return torch.cuda.max_memory_allocated() - start
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, x, grad)
    allocs: list[tuple[int, int]] = []

    def walk(node) -> None:  # noqa: ANN001 - profiler tree node
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (B=4, H=4, L=33, d=32) for a smoke run")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions; the median is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (CUDA when present)")
    ap.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--batch", type=int, default=0, help="B (default 64, --quick 4)")
    ap.add_argument("--no-flex", action="store_true", help="skip the flex kernel (no compilation)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype_name = ("bfloat16" if device == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    dtype = getattr(torch, dtype_name)
    b, h, n, d = (4, 4, 33, 32) if args.quick else (64, 12, 129, 64)
    b = args.batch or b
    x = make_inputs(b, h, n, d, device=device, dtype=dtype)
    grad = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"SFM attention benchmark: B={b} H={h} L={n} d={d} {dtype_name}, forward+backward on {where}{load}, "
          f"median of {args.reps}")
    fns = variants(device, flex=not args.no_flex)
    secs = time_all(fns, x, grad, args.reps)
    rows = {}
    for name, fn in fns.items():
        sec = secs[name]
        saved, big = saved_tensors(fn, x)
        peak = peak_memory(fn, x, grad)
        rows[name] = (sec, saved, big, peak)
    base_math = rows["sdpa (math backend)"]
    base_def = rows["sdpa (default backend)"]
    base_flash = rows.get("sdpa (flash backend)")
    mib = 2**20
    print(f"{'variant':<24} {'time ms':>9} {'/math':>7} {'/default':>9} {'saved MiB':>10} {'/math':>7} "
          f"{'#BHLL saved':>12} {'peak MiB':>9} {'/math':>7}")
    for name, (sec, saved, big, peak) in rows.items():
        print(f"{name:<24} {sec * 1e3:>9.1f} {sec / base_math[0]:>7.2f} {sec / base_def[0]:>9.2f} "
              f"{saved / mib:>10.1f} {saved / max(base_math[1], 1):>7.2f} {big:>12d} {peak / mib:>9.1f} "
              f"{peak / max(base_math[3], 1):>7.2f}")
    sfm_names = [k for k in rows if k.startswith("sfm_attention")]
    best = min(sfm_names, key=lambda k: rows[k][0])
    sfm = rows[best]
    auto = resolve_sfm_kernel("auto", device)
    ok_time = sfm[0] <= 1.5 * base_math[0]
    ok_fused = sfm[0] <= 1.1 * base_def[0]
    ok_mem = sfm[2] <= 2
    quick = " [--quick: per-op overhead dominates; the time targets are for the ViT-B/16 shapes]" if args.quick else ""
    print(f"fastest SFM kernel here: {best.split()[-1]} (model.sfm_kernel=auto picks {auto} on {device})")
    print(f"target: time <= 1.5x math sdpa -> {'met' if ok_time else 'NOT met'} ({sfm[0] / base_math[0]:.2f}x); "
          f"<= 1.1x default (fused) sdpa -> {'met' if ok_fused else 'NOT met'} ({sfm[0] / base_def[0]:.2f}x); "
          f"saved (B,H,L,L) tensors <= 2 (logits + probabilities) -> {'met' if ok_mem else 'NOT met'} ({sfm[2]})"
          + quick)
    if base_flash is not None:
        print(f"on {where}: SFM {best.split()[-1]} / flash sdpa = {sfm[0] / base_flash[0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
