"""How much of lora_linear_4bit's small-M time is the write-back of dirty L2 lines: the op (and bf16 F.linear) timed
after 256 MB written, as do_bench empties L2, and after the same buffer is then read twice, which leaves L2 clean.
A kernel that only streams its weight pays the write-backs beside its own reads (tools/l2_evict.cu); the gap bounds
what an L2 evict_first policy on the weight's loads could recover.

    PYTHONPATH=python:. python tools/clean_l2_timing.py
"""

import statistics

import torch
import torch.nn.functional as F

import qlora

from time_lora_paths import SCALE, layer  # this folder is on sys.path when run as a script

SHAPES = [(4096, 4096), (8192, 28672), (28672, 8192)]


def flushed_us(fn, clean, reps=30):
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    times = []
    for i in range(reps):
        flush.fill_(i)
        if clean:
            flush.max()
            flush.max()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # the host queues the call before the GPU reaches it
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    for N, K in SHAPES:
        w, packed, qs, A, B = layer(N, K, "cuda")
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            cells = []
            for name, fn in [("op", lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE)),
                             ("op without LoRA", lambda: qlora.lora_linear_4bit(x, packed, qs)),
                             ("bf16 F.linear", lambda: F.linear(x, w))]:
                dirty, clean = flushed_us(fn, False), flushed_us(fn, True)
                cells.append(f"{name} {dirty:.1f} / {clean:.1f}")
            print(f"{N}x{K} M={M} (µs after a written / a read flush): " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
