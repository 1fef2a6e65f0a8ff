"""Times lora_linear_4bit on each CUDA path against bf16 F.linear, two ways: triton's do_bench (launch gaps
included, L2 emptied between runs) and do_bench_cudagraph (GPU time only; warm L2 for weights that fit in it).
Prints "do_bench/graph" in µs per path, then torch.profiler's per-kernel split of the fused path at 4096x4096.

    python tools/time_lora_paths.py [--shapes 4096x4096,1024x4096] [--ms 1,16,32] [--paths auto,tensor-core] [--profile]
"""

import argparse
import math

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

import qlora

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # N x K
MS = [1, 8, 16, 32]
R, SCALE = 16, 2.0


def both(fn):
    eager = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    with torch.cuda.stream(torch.cuda.Stream()):
        graph = do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    return eager, graph


def layer(N, K, dev):
    """A bf16 weight [N, K], its NF4 + double-quantized form and an r = R adapter: (w, packed, qs, A, B)."""
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    packed, qs = qlora.quantize_4bit(w)
    A = torch.randn(R, K, device=dev, dtype=torch.bfloat16) / math.sqrt(K)
    B = torch.randn(N, R, device=dev, dtype=torch.bfloat16) * 0.01
    return w, packed, qs, A, B


def tensor_core_runs(x, packed, qs, A, B):
    try:
        qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE, None, 6)
        return True
    except ValueError:
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N x K, comma-separated")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--paths",
                        default="auto,fused,block-scaled,dequant+gemm,tensor-core,tensor-core-wide,bf16,bf16+LoRA")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's split of the fused path at 4096x4096")
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    wanted = set(args.paths.split(","))
    dev = torch.device("cuda")
    for N, K in shapes:
        w, packed, qs, A, B = layer(N, K, dev)
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            cells = []
            tensor_core = tensor_core_runs(x, packed, qs, A, B)
            for name, path in [("auto", 0), ("fused", 1), ("block-scaled", 3), ("dequant+gemm", 2), ("tensor-core", 6),
                               ("tensor-core-wide", 7)]:
                if name not in wanted or (path == 3 and M > 32):
                    continue
                if path in (6, 7) and not tensor_core:
                    continue
                eager, graph = both(lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE, None, path))
                cells.append(f"{name} {eager:.1f}/{graph:.1f}")
            if "bf16" in wanted:
                eager, graph = both(lambda: F.linear(x, w))
                cells.append(f"bf16 {eager:.1f}/{graph:.1f}")
            if "bf16+LoRA" in wanted:
                eager, graph = both(lambda: F.linear(x, w) + SCALE * F.linear(F.linear(x, A), B))
                cells.append(f"bf16+LoRA {eager:.1f}/{graph:.1f}")
            print(f"{N}x{K} M={M}: " + "  ".join(cells), flush=True)
        if args.profile and (N, K) == (4096, 4096):
            for M in (1, 16):
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE, None, 0)
                    torch.cuda.synchronize()
                print(f"M={M}, 20 calls:")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=4, max_name_column_width=50))


if __name__ == "__main__":
    main()
