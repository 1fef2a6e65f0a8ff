"""Where lora_linear_4bit's time goes: do_bench of the op with and without its LoRA term, of x·Aᵀ alone and of
bf16 F.linear (with and without the same LoRA in PyTorch), then torch.profiler's per-kernel times of the op with
and without LoRA (calls back to back). Finally the host time to enqueue one call, against F.linear's.

    PYTHONPATH=python:. python tools/lora_time_split.py            # M = 1, 16, 256
    PYTHONPATH=python:. python tools/lora_time_split.py 1,4096
"""

import sys
import time

import torch
import torch.nn.functional as F

import qlora
from bench.common import time_us

from time_lora_paths import SCALE, SHAPES, layer  # this folder is on sys.path when run as a script


def kernel_times(fn, calls=5):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:40]: e.device_time_total / e.count for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA}


def enqueue_us(fn, calls=300):
    """Host µs per call: launches return before their kernels run, so the loop times what the host does to
    enqueue a call (until the launch queue fills)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def main():
    Ms = [int(m) for m in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 16, 256]
    torch.manual_seed(0)
    dev = "cuda"
    for N, K in SHAPES:
        w, packed, qs, A, B = layer(N, K, dev)
        for M in Ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            op = lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE)
            op_plain = lambda: qlora.lora_linear_4bit(x, packed, qs)
            bf16 = lambda: F.linear(x, w)
            timed = {"op": op, "op without LoRA": op_plain, "x·Aᵀ": lambda: F.linear(x, A), "bf16": bf16,
                     "bf16 + LoRA": lambda: F.linear(x, w).add_(F.linear(F.linear(x, A), B), alpha=SCALE)}
            us = {name: time_us(fn, torch.device(dev)) for name, fn in timed.items()}
            print(f"{N}x{K} M={M}: " + "  ".join(f"{k} {v:.1f}" for k, v in us.items()), flush=True)
            for name, fn in [("with LoRA", op), ("without", op_plain)]:
                print(f"   kernels {name} (µs each): " +
                      "  ".join(f"{k}: {v:.1f}" for k, v in kernel_times(fn).items()), flush=True)
            print(f"   enqueue µs a call: op {enqueue_us(op):.1f}, F.linear {enqueue_us(bf16):.1f}", flush=True)


if __name__ == "__main__":
    main()
