"""bf16 F.linear timed as the standalone programs in tools/ time their kernels (tools/flushed_timing.cuh): 256 MB
written before each call, CUDA events around it, the median after a warm-up. Shapes are "N,K,M" as those programs take.

    python tools/bf16_flushed.py 8192,28672,4096 28672,8192,4096
"""

import sys

import torch
import torch.nn.functional as F

RUNS, WARMUP = 45, 5


def flushed_median_us(fn, flush):
    times = []
    for i in range(RUNS):
        flush.fill_(i % 256)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= WARMUP:
            times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def main(specs):
    if not torch.cuda.is_available():
        sys.exit("bf16_flushed.py needs a GPU")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for spec in specs:
        N, K, M = map(int, spec.split(","))
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        print(f"bf16 F.linear {N}x{K} M={M}: {flushed_median_us(lambda: F.linear(x, w), flush):.1f} us")


if __name__ == "__main__":
    main(sys.argv[1:] or ["4096,4096,4096"])
