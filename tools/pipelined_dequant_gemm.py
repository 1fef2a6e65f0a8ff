"""Large M, dequantize + cuBLAS with the dequantization hidden: the weight's rows in C chunks, each dequantized on a
high-priority side stream while the main stream multiplies the chunk before it into its columns of y. Times the
pipelined forms (adapter merged into each chunk, or the low-rank term written first) against the op's automatic
path, the same chunks without the side stream, and bf16 F.linear, all with triton's do_bench (L2 emptied).

    PYTHONPATH=python:. python tools/pipelined_dequant_gemm.py            # M = 4096
    PYTHONPATH=python:. python tools/pipelined_dequant_gemm.py 2048,4096
"""

import sys

import torch
import torch.nn.functional as F

import qlora
from bench.common import time_us

from time_lora_paths import SCALE, SHAPES, layer  # this folder is on sys.path when run as a script


def chunk_state(packed, qs, n0, n1):
    """packed bytes and dequantize_4bit's scale arguments of rows [n0, n1)."""
    N, K = qs.shape
    b0, b1 = n0 * K // qs.blocksize, n1 * K // qs.blocksize
    assert b0 % 256 == 0, "chunks must start on a double-quantization block"
    return (packed[n0 * K // 2:n1 * K // 2], qs.absmax[b0:b1], qs.absmax2[b0 // 256:(b1 + 255) // 256], qs.code2,
            qs.offset)


def dequantize_rows(packed, qs, n0, n1, A, B, merged):
    p, absmax, absmax2, code2, offset = chunk_state(packed, qs, n0, n1)
    K = qs.shape[1]
    if merged:
        return torch.ops.qlora.dequantize_4bit_lora(p, absmax, qs.blocksize, qs.quant_type, [n1 - n0, K],
                                                    torch.bfloat16, A, B[n0:n1], SCALE, absmax2, code2, offset)
    return torch.ops.qlora.dequantize_4bit(p, absmax, qs.blocksize, qs.quant_type, [n1 - n0, K], torch.bfloat16,
                                           absmax2, code2, offset)


def pipelined(x, packed, qs, A, B, chunks, merged, side):
    N, K = qs.shape
    main = torch.cuda.current_stream()
    if merged:
        y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    else:
        y = F.linear(F.linear(x, A), B) * SCALE
    bounds = [N * c // chunks for c in range(chunks + 1)]
    side.wait_stream(main)
    for n0, n1 in zip(bounds, bounds[1:]):
        with torch.cuda.stream(side):
            w = dequantize_rows(packed, qs, n0, n1, A, B, merged)
            done = torch.cuda.Event()
            done.record(side)
        w.record_stream(main)
        main.wait_event(done)
        if merged:
            torch.mm(x, w.t(), out=y[:, n0:n1])
        else:
            y[:, n0:n1].addmm_(x, w.t())
    return y


def sequential(x, packed, qs, A, B, chunks, merged):
    N, K = qs.shape
    y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    bounds = [N * c // chunks for c in range(chunks + 1)]
    for n0, n1 in zip(bounds, bounds[1:]):
        torch.mm(x, dequantize_rows(packed, qs, n0, n1, A, B, merged).t(), out=y[:, n0:n1])
    return y


def main():
    Ms = [int(m) for m in sys.argv[1].split(",")] if len(sys.argv) > 1 else [4096]
    torch.manual_seed(0)
    dev = torch.device("cuda")
    side = torch.cuda.Stream(priority=-1)
    for N, K in SHAPES:
        w, packed, qs, A, B = layer(N, K, dev)
        for M in Ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE).float()
            for merged in (True, False):
                err = (pipelined(x, packed, qs, A, B, 4, merged, side).float() - ref).abs().max().item()
                assert err <= 0.02 * ref.abs().max().item(), f"pipelined (merged={merged}) differs from the op: {err}"
            timed = {"bf16": lambda: F.linear(x, w),
                     "op": lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE)}
            for chunks in (2, 4, 8):
                timed[f"seq{chunks}m"] = lambda c=chunks: sequential(x, packed, qs, A, B, c, True)
                timed[f"pipe{chunks}m"] = lambda c=chunks: pipelined(x, packed, qs, A, B, c, True, side)
                timed[f"pipe{chunks}u"] = lambda c=chunks: pipelined(x, packed, qs, A, B, c, False, side)
            us = {name: time_us(fn, dev) for name, fn in timed.items()}
            bf16 = us["bf16"]
            print(f"{N}x{K} M={M}: " + "  ".join(f"{k} {v:.1f} ({v / bf16:.3f})" for k, v in us.items()), flush=True)


if __name__ == "__main__":
    main()
