"""4-bit linear + LoRA (NF4 + double quantization, blocksize 64, bf16, r = 16): forward at M = 1 ... 4096, each
CUDA path on its own for the crossover, and a LoRA layer's forward + backward.

Rows (impl):
  qlora                    torch.ops.qlora.lora_linear_4bit, automatic path, the packed weight in the order the modules
                           hold it (tile order where qlora.nn.tile_order_pays, else bitsandbytes' row-major bytes)
  qlora row-major          the same on row-major bytes, where the modules take tile order
  qlora fused              path=1, the small-M kernel (crossover rows)
  qlora dequant+gemm       path=2, dequantize + cuBLAS (crossover rows)
  qlora fused block-scaled path=3, the small-M block-scaled kernel (crossover rows; above M = 32 in slices of 32)
  qlora merged / unmerged  path=4 / 5, dequantize + cuBLAS with the adapter always / never merged into the weight
                           (M >= 256 rows: the measurement behind merging_adapter_pays)
  qlora tensor-core        path=6, the wgmma GEMM that decodes the weight in its main loop (M >= 16 rows; sm_90)
  torch bf16               F.linear + the same LoRA in plain PyTorch
  torch bf16 no-LoRA       F.linear only
  bitsandbytes             bnb.matmul_4bit + the same LoRA in plain PyTorch
The forced paths, and every qlora row of the crossover cases ("paths M=..."), read row-major bytes.
The rows of one case are timed in order and again in reverse, and the two medians averaged (time_both_orders).
A row that fails is reported and skipped, so one failure does not end the run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

import qlora
from bench.common import Context, Row, rotating, time_both_orders, with_gpu_alone

SHAPES = [(4096, 4096), (8192, 8192), (28672, 8192), (8192, 28672)]  # N x K (out x in)
MS = [1, 16, 256, 4096]
CROSSOVER_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
FUSED_MAX_M = 256  # the fused kernels' crossover rows stop here (far slower beyond)
CROSSOVER_SHAPES = [(4096, 4096), (8192, 28672)]
LAYER = (4096, 4096, 4096)  # M, N, K for forward + backward
QUICK_SHAPES = [(256, 512)]
QUICK_MS = [1, 16, 64]
R = 16
ALPHA = 32
DTYPE = torch.bfloat16


def _weight_bytes(N, K, blocksize=64):
    return N * K / 2 + N * K / blocksize + N * K / blocksize / 256 * 4


def _tile_ordered(quantized):
    packed, qs = quantized
    return qlora.tile_order(packed, qs), qs


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    dev = ctx.device
    shapes = QUICK_SHAPES if ctx.quick else SHAPES
    ms = QUICK_MS if ctx.quick else MS
    scale = ALPHA / R

    pending: list[tuple[Row, Callable[[], object]]] = []

    def add(case, shape, impl, fn, nbytes=0.0, flops=0.0, note=""):
        pending.append((Row("lora_linear", case, shape, impl, 0.0, nbytes, flops, note), fn))

    def flush():
        """Times the rows of one case against each other (time_both_orders) and keeps those that ran."""
        timed = time_both_orders([fn for _, fn in pending], dev,
                                 [f"lora_linear {row.case} {row.shape} {row.impl}" for row, _ in pending])
        ran = [(dataclasses.replace(row, us=us), fn) for (row, fn), us in zip(pending, timed) if us is not None]
        rows.extend(with_gpu_alone([row for row, _ in ran], [fn for _, fn in ran], dev))
        pending.clear()

    for N, K in shapes:
        shape = f"{N}x{K}"
        try:
            w = torch.randn(N, K, device=dev, dtype=DTYPE) * 0.02
            next_q = rotating(lambda: qlora.quantize_4bit(w), _weight_bytes(N, K))
            next_w = rotating(lambda: torch.randn(N, K, device=dev, dtype=DTYPE) * 0.02, 2 * N * K)
            A = torch.randn(R, K, device=dev, dtype=DTYPE) / math.sqrt(K)
            B = torch.randn(N, R, device=dev, dtype=DTYPE) * 0.01
            default_tiled = qlora.nn.tile_order_pays(torch.device(dev), N, K, 64, DTYPE)
            next_t = None
            if default_tiled:
                next_t = rotating(lambda: _tile_ordered(qlora.quantize_4bit(w)), _weight_bytes(N, K))
            next_b = None
            if ctx.bnb is not None:
                BF = ctx.bnb.functional
                next_b = rotating(lambda: BF.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                           quant_type="nf4"), _weight_bytes(N, K))
        except Exception as exc:
            print(f"[lora_linear] setup for {shape} failed: {type(exc).__name__}: {exc}", flush=True)
            continue

        def ours(x, path):
            packed, qs = next_q()
            return qlora.lora_linear_4bit(x, packed, qs, None, A, B, scale, None, path)

        def ours_default(x):  # the weight in the order the modules hold it
            packed, qs = next_t() if next_t is not None else next_q()
            return qlora.lora_linear_4bit(x, packed, qs, None, A, B, scale)

        def bf16_lora(x):
            return F.linear(x, next_w()) + scale * F.linear(F.linear(x, A), B)

        def bnb_lora(x):
            packed, qs = next_b()
            return ctx.bnb.matmul_4bit(x, packed.t(), quant_state=qs) + scale * F.linear(F.linear(x, A), B)

        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=DTYPE)
            case = f"fwd M={M}"
            flops = 2 * M * N * K + 4 * M * R * (N + K)
            q_bytes = _weight_bytes(N, K) + 2 * M * (K + N)
            add(case, shape, "qlora", lambda: ours_default(x), q_bytes, flops)
            add(case, shape, "torch bf16", lambda: bf16_lora(x), 2 * N * K + 2 * M * (K + N), flops)
            add(case, shape, "torch bf16 no-LoRA", lambda: F.linear(x, next_w()), 2 * N * K + 2 * M * (K + N),
                2 * M * N * K)
            if next_b is not None:
                add(case, shape, "bitsandbytes", lambda: bnb_lora(x), q_bytes, flops)
            if next_t is not None:
                add(case, shape, "qlora row-major", lambda: ours(x, 0), q_bytes, flops)
            if ctx.cuda and M >= 256:
                add(case, shape, "qlora merged", lambda: ours(x, 4), q_bytes, flops)
                add(case, shape, "qlora unmerged", lambda: ours(x, 5), q_bytes, flops)
            if ctx.cuda and M >= 16:
                add(case, shape, "qlora tensor-core", lambda: ours(x, 6), q_bytes, flops)
            flush()

        if not ctx.quick and (N, K) not in CROSSOVER_SHAPES:
            continue
        for M in QUICK_MS if ctx.quick else CROSSOVER_MS:
            if not ctx.cuda:
                break  # the CPU has one path
            x = torch.randn(M, K, device=dev, dtype=DTYPE)
            case = f"paths M={M}"
            flops = 2 * M * N * K + 4 * M * R * (N + K)
            q_bytes = _weight_bytes(N, K) + 2 * M * (K + N)
            add(case, shape, "qlora", lambda: ours(x, 0), q_bytes, flops)
            if M <= FUSED_MAX_M:
                add(case, shape, "qlora fused", lambda: ours(x, 1), q_bytes, flops)
            add(case, shape, "qlora dequant+gemm", lambda: ours(x, 2), q_bytes, flops)
            if M <= FUSED_MAX_M:
                add(case, shape, "qlora fused block-scaled", lambda: ours(x, 3), q_bytes, flops)
            if M >= 16:
                add(case, shape, "qlora tensor-core", lambda: ours(x, 6), q_bytes, flops)
            add(case, shape, "torch bf16 no-LoRA", lambda: F.linear(x, next_w()), 2 * N * K, 2 * M * N * K)
            flush()

        del next_q, next_w, next_b, next_t, w
        if ctx.cuda:
            torch.cuda.empty_cache()

    _layer_rows(ctx, add)
    flush()
    return rows


def _layer_rows(ctx: Context, add) -> None:
    """LoRA layer forward + backward, x requiring grad, base frozen; rows go through `add`."""
    dev = ctx.device
    M, N, K = (256, 256, 512) if ctx.quick else LAYER
    shape, case = f"{N}x{K}", f"layer fwd+bwd M={M}"
    flops = 3 * 2 * M * N * K
    try:
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=DTYPE)
        ours = qlora.nn.LoraLinear4bit.from_linear(lin, r=R, alpha=ALPHA)
        torch.nn.init.normal_(ours.lora_B.weight, std=0.01)
        lin.weight.requires_grad_(False)
        lora_A = torch.nn.Linear(K, R, bias=False, device=dev, dtype=DTYPE)
        lora_B = torch.nn.Linear(R, N, bias=False, device=dev, dtype=DTYPE)
        x = torch.randn(M, K, device=dev, dtype=DTYPE, requires_grad=True)
        gy = torch.randn(M, N, device=dev, dtype=DTYPE)
    except Exception as exc:
        print(f"[lora_linear] layer setup failed: {type(exc).__name__}: {exc}", flush=True)
        return

    def step(forward):
        def fn():
            x.grad = None
            forward(x).backward(gy)
        return fn

    scale = ALPHA / R
    add(case, shape, "qlora", step(ours), flops=flops)
    add(case, shape, "torch bf16", step(lambda v: lin(v) + scale * lora_B(lora_A(v))), flops=flops)
    if ctx.bnb is not None:
        try:
            bnb_layer = ctx.bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                                              quant_type="nf4")
            bnb_layer.weight = ctx.bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4", blocksize=64)
            bnb_layer = bnb_layer.to(dev)
            add(case, shape, "bitsandbytes", step(lambda v: bnb_layer(v) + scale * lora_B(lora_A(v))), flops=flops)
        except Exception as exc:
            print(f"[lora_linear] bitsandbytes layer failed: {type(exc).__name__}: {exc}", flush=True)
