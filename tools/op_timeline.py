"""Where one call of lora_linear_4bit spends its GPU time: each kernel's start and end after the end of a 256 MB
L2 flush that precedes every call (as do_bench's does), medians over the calls, from torch.profiler.
The gap before the first kernel is the launch latency the host left; gaps between kernels are launch boundaries.
With many calls, the first and last tenth's medians of the call's end show whether sustained load slows it.

    python tools/op_timeline.py [--shapes 28672x8192,14336x4096] [--ms 256,512] [--path 0] [--calls 20] [--bf16]
                                [--tile-order]
"""

import argparse
import statistics

import torch

import qlora
from time_lora_paths import SCALE, layer  # this folder is on sys.path when run as a script


def timeline(fn, calls):
    """[(kernel name, median start, median end)] in µs after each flush's end, in the order of the first call, and
    each call's end (its last kernel's) in the order of the calls."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.neg_()  # a kernel of its own name marks where each call starts
            fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    runs, current, t0 = [], None, 0.0
    for e in kernels:
        if "neg_kernel" in e.name:
            current, t0 = [], e.time_range.end
            runs.append(current)
        elif current is not None:
            current.append((e.name, e.time_range.start - t0, e.time_range.end - t0))
    runs = [r for r in runs if len(r) == len(runs[0])]
    rows = [(runs[0][i][0], statistics.median(r[i][1] for r in runs), statistics.median(r[i][2] for r in runs))
            for i in range(len(runs[0]))]
    return rows, [max(end for _, _, end in r) for r in runs]


def short(name):
    name = name.removeprefix("void ")
    return name if len(name) <= 90 else name[:87] + "..."


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="28672x8192,14336x4096", help="N x K, comma-separated")
    parser.add_argument("--ms", default="256,512")
    parser.add_argument("--path", type=int, default=0, help="lora_linear_4bit's path argument (0: automatic)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="also bf16 F.linear with the same weight, no adapter")
    parser.add_argument("--tile-order", action="store_true", help="the weight in tile order, as the modules hold it")
    args = parser.parse_args()
    dev = torch.device("cuda")
    for N, K in (tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")):
        W, packed, qs, A, B = layer(N, K, dev)
        if args.tile_order:
            packed = qlora.tile_order(packed, qs)
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ops = {f"path {args.path}": lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE, None, args.path)}
            if args.bf16:
                ops["bf16 F.linear"] = lambda: torch.nn.functional.linear(x, W)
            for label, fn in ops.items():
                rows, ends = timeline(fn, args.calls)
                tenth = max(1, len(ends) // 10)
                print(f"{N}x{K} M={M}, {label}: last kernel ends {max(end for _, _, end in rows):.1f} µs after the"
                      f" flush (first tenth of the calls {statistics.median(ends[:tenth]):.1f},"
                      f" last tenth {statistics.median(ends[-tenth:]):.1f})")
                for name, start, end in rows:
                    print(f"  {start:8.1f} {end:8.1f} {end - start:8.1f}  {short(name)}")


if __name__ == "__main__":
    main()
