"""Host time of one lora_linear_4bit call at small M, in parts: the Python wrapper, the dispatcher, the op's C++
glue and its launches, against F.linear's in the same process. A sleep kernel keeps the GPU busy while the host
enqueues, so the loop times the host alone. Last, torch.profiler's CPU table of the op's calls.

    PYTHONPATH=python:. python tools/host_time.py            # M = 1, 8192x28672 and 4096x4096
    PYTHONPATH=python:. python tools/host_time.py --m 4
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import qlora


def host_us(fn, calls=100, rounds=7):
    """Median over rounds of the host µs per call, the GPU held busy by a sleep kernel queued first."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        torch.cuda._sleep(50_000_000)  # tens of ms: longer than the loop, so the host never waits for the GPU
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--shapes", default="8192x28672,4096x4096")
    args = parser.parse_args()
    dev = torch.device("cuda")
    r, scale = 16, 2.0
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        packed, qs = qlora.quantize_4bit(w)
        tiled = qlora.tile_order(packed, qs)
        x = torch.randn(args.m, K, device=dev, dtype=torch.bfloat16)
        A = torch.randn(r, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
        B = torch.randn(N, r, device=dev, dtype=torch.bfloat16) * 0.01
        op = torch.ops.qlora.lora_linear_4bit.default
        dims = list(qs.shape)
        cases = {
            "torch.empty(M, N)": lambda: torch.empty(args.m, N, device=dev, dtype=torch.bfloat16),
            "F.linear": lambda: F.linear(x, w),
            "F.linear + LoRA (PyTorch)": lambda: F.linear(x, w) + scale * F.linear(F.linear(x, A), B),
            "qlora.lora_linear_4bit": lambda: qlora.lora_linear_4bit(x, tiled, qs, None, A, B, scale),
            "op.default, LoRA": lambda: op(x, tiled, qs.absmax, qs.blocksize, qs.quant_type, dims, qs.absmax2,
                                            qs.code2, qs.offset, None, A, B, scale, None, 0),
            "op.default, no LoRA": lambda: op(x, tiled, qs.absmax, qs.blocksize, qs.quant_type, dims, qs.absmax2,
                                               qs.code2, qs.offset, None, None, None, 1.0, None, 0),
            "op.default, LoRA, row-major fused": lambda: op(x, packed, qs.absmax, qs.blocksize, qs.quant_type, dims,
                                                             qs.absmax2, qs.code2, qs.offset, None, A, B, scale, None,
                                                             1),
        }
        print(f"{shape} M={args.m}: host µs per call (median of 7 rounds of 100)")
        for name, fn in cases.items():
            print(f"  {name:<36} {host_us(fn):7.1f}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                qlora.lora_linear_4bit(x, tiled, qs, None, A, B, scale)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
