"""Large M: can the dequantization hide under cuBLAS if cuBLAS leaves a few SMs free?

The weight's rows are split into C chunks. A low-priority stream dequantizes them one after another (adapter
merged, `dequantize_4bit_lora`); a high-priority stream multiplies each chunk into its columns of y as soon as
it is ready, with cuBLAS told to target all but S SMs (`torch._C._set_sm_carveout_experimental`), so that the
next chunk's dequantization runs on the S SMs the GEMM leaves free. Prints do_bench µs (L2 emptied) and the
ratio to bf16 F.linear without LoRA, for cuBLAS and cuBLASLt as torch's BLAS backend.

    PYTHONPATH=python:. python tools/carveout_overlap.py [--shapes 8192x28672] [--ms 4096] [--chunks 4,8] [--carveouts 0,4,8]
"""

import argparse
import contextlib

import torch
import torch.nn.functional as F

import qlora
from bench.common import time_us

from pipelined_dequant_gemm import dequantize_rows  # this folder is on sys.path when run as a script
from time_lora_paths import SCALE, SHAPES, layer


@contextlib.contextmanager
def temporarily(get, set_to, value):
    """A global setting at value inside the block, restored after it."""
    before = get()
    set_to(value)
    try:
        yield
    finally:
        set_to(before)


def carveout(sms):
    return temporarily(torch._C._get_sm_carveout_experimental, torch._C._set_sm_carveout_experimental, sms)


def blas(backend):
    library = torch.backends.cuda.preferred_blas_library  # called without an argument, it reads the setting
    return temporarily(library, library, backend)


def overlapped(x, packed, qs, A, B, chunks, sms, gemm_stream, dequant_stream):
    N, K = qs.shape
    current = torch.cuda.current_stream()
    y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    bounds = [N * c // chunks for c in range(chunks + 1)]
    gemm_stream.wait_stream(current)
    dequant_stream.wait_stream(current)
    ready = []
    with torch.cuda.stream(dequant_stream):
        for n0, n1 in zip(bounds, bounds[1:]):
            w = dequantize_rows(packed, qs, n0, n1, A, B, True)
            event = torch.cuda.Event()
            event.record(dequant_stream)
            w.record_stream(gemm_stream)
            ready.append((n0, n1, w, event))
    with torch.cuda.stream(gemm_stream), carveout(sms):
        for n0, n1, w, event in ready:
            gemm_stream.wait_event(event)
            torch.mm(x, w.t(), out=y[:, n0:n1])
    current.wait_stream(gemm_stream)
    return y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N x K, comma-separated")
    parser.add_argument("--ms", default="4096")
    parser.add_argument("--chunks", default="4,8")
    parser.add_argument("--carveouts", default="0,4,8")
    parser.add_argument("--backends", default="cublas,cublaslt")
    args = parser.parse_args()
    dev = torch.device("cuda")
    sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
    gemm_stream = torch.cuda.Stream(priority=-1)
    dequant_stream = torch.cuda.Stream(priority=0)
    chunk_counts = [int(c) for c in args.chunks.split(",")]
    carveouts = [int(s) for s in args.carveouts.split(",")]
    print(f"{torch.cuda.get_device_name(dev)}, {sm_count} SMs, torch {torch.__version__}, "
          f"stream priorities {torch.cuda.Stream.priority_range()}")
    for N, K in (tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")):
        torch.manual_seed(0)
        w, packed, qs, A, B = layer(N, K, dev)
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE).float()
            bf16 = time_us(lambda: F.linear(x, w), dev)
            merge = time_us(lambda: dequantize_rows(packed, qs, 0, N, A, B, True), dev)
            cells = [f"bf16 {bf16:.1f}",
                     f"op {time_us(lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE), dev) / bf16:.3f}",
                     f"merge {merge:.1f}"]
            for backend in args.backends.split(","):
                with blas(backend):
                    for sms in carveouts:
                        with carveout(sms):
                            cells.append(f"{backend} mm-{sms} {time_us(lambda: F.linear(x, w), dev) / bf16:.3f}")
                    for chunks in chunk_counts:
                        for sms in carveouts:
                            run = lambda c=chunks, s=sms: overlapped(x, packed, qs, A, B, c, s, gemm_stream,
                                                                      dequant_stream)
                            err = (run().float() - ref).abs().max().item()
                            assert err <= 0.02 * ref.abs().max().item(), f"differs from the op by {err}"
                            cells.append(f"{backend} C{chunks}-{sms} {time_us(run, dev) / bf16:.3f}")
            print(f"{N}x{K} M={M}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
