"""NF4 quantize / dequantize (blocksize 64, double quantization) of bf16 weights [N, K]."""

from __future__ import annotations

import torch

import qlora
from bench.common import Context, Row, rotating, time_us, with_gpu_alone

SHAPES = [(4096, 4096), (28672, 8192)]
QUICK_SHAPES = [(256, 512), (1024, 1024)]


def _bytes(n: int, blocksize: int = 64) -> tuple[float, float]:
    """Fewest bytes moved by (quantize, dequantize) of n bf16 values: weights once, codes once, scales once."""
    codes = n / 2 + n / blocksize + n / blocksize / 256 * 4
    return 2 * n + codes, codes + 2 * n


def run(ctx: Context) -> list[Row]:
    rows = []
    for N, K in QUICK_SHAPES if ctx.quick else SHAPES:
        shape, n = f"{N}x{K}", N * K
        q_bytes, dq_bytes = _bytes(n)
        weight = lambda: torch.randn(N, K, device=ctx.device, dtype=torch.bfloat16)  # noqa: E731
        next_w = rotating(weight, 2 * n)
        next_q = rotating(lambda: qlora.quantize_4bit(weight()), n / 2)

        def add(case, impl, fn, nbytes, note=""):
            row = Row("quantize_4bit", case, shape, impl, time_us(fn, ctx.device), nbytes, note=note)
            rows.extend(with_gpu_alone([row], [fn], ctx.device))

        add("quantize nf4+dq", "qlora", lambda: qlora.quantize_4bit(next_w()), q_bytes)
        add("dequantize nf4+dq", "qlora", lambda: qlora.dequantize_4bit(*next_q()), dq_bytes)
        add("dequantize nf4+dq", "torch bf16 copy", lambda: next_w().clone(), 4 * n, "the copy ceiling")
        if ctx.bnb is not None:
            F = ctx.bnb.functional
            bnb_quantize = lambda w: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")  # noqa: E731
            next_b = rotating(lambda: bnb_quantize(weight()), n / 2)
            add("quantize nf4+dq", "bitsandbytes", lambda: bnb_quantize(next_w()), q_bytes)
            add("dequantize nf4+dq", "bitsandbytes", lambda: F.dequantize_4bit(*next_b()), dq_bytes)
        del next_w, next_q
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows
