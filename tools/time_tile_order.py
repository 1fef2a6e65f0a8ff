"""Row-major against tile-ordered packed weights (qlora.tile_order), µs: dequantize_4bit (do_bench and the GPU alone)
and dequantize_4bit_lora, then lora_linear_4bit with r = 16 on the automatic choice and the tensor-core GEMM (path
6), beside bf16 F.linear; --fused adds the fused kernel's block-scaled loop (path 3) on either order, --tiled the
tiled small-M GEMV (path 8, up to 8 rows) and the fused kernel on row-major bytes. Each group is timed in order and
again in reverse (bench.common.time_both_orders).

    python tools/time_tile_order.py [--ms 1,16,64,256,1024,2048] [--dequantize-only] [--fused] [--tiled]
"""

import argparse
import math

import torch
import torch.nn.functional as F

import qlora
from bench.common import gpu_alone_us, time_both_orders

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192), (14336, 4096), (4096, 14336)]  # N x K
OP = torch.ops.qlora.lora_linear_4bit


def adapter(N, K, dev):
    """A rank-16 LoRA adapter (A, B) for an N x K weight, bfloat16."""
    return (torch.randn(16, K, device=dev, dtype=torch.bfloat16) / math.sqrt(K),
            torch.randn(N, 16, device=dev, dtype=torch.bfloat16) * 0.01)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,16,64,256,1024,2048")
    parser.add_argument("--dequantize-only", action="store_true")
    parser.add_argument("--fused", action="store_true", help="also the fused kernel's block-scaled loop (path 3)")
    parser.add_argument("--tiled", action="store_true", help="also the tiled small-M GEMV (path 8) where M <= 8")
    parser.add_argument("--shapes", default=None, help="N x K list, e.g. 8192x28672,4096x4096")
    args = parser.parse_args()
    dev = torch.device("cuda")
    print("dequantize_4bit, N x K: row-major | tile order (do_bench) | row-major | tile order (GPU alone) || "
          "dequantize_4bit_lora (r = 16, s = 2): row-major | tile order (do_bench)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    for N, K in shapes[:4]:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        packed, qs = qlora.quantize_4bit(w)
        tiled = qlora.tile_order(packed, qs)
        assert torch.equal(qlora.dequantize_4bit(tiled, qs), qlora.dequantize_4bit(packed, qs))
        fns = [lambda: qlora.dequantize_4bit(packed, qs), lambda: qlora.dequantize_4bit(tiled, qs)]
        t = time_both_orders(fns, dev, ["row-major", "tile order"])
        g = [gpu_alone_us(f, dev) for f in fns]
        A, B = adapter(N, K, dev)

        def merged(p):
            return lambda: torch.ops.qlora.dequantize_4bit_lora(p, qs.absmax, qs.blocksize, qs.quant_type, [N, K],
                                                                torch.bfloat16, A, B, 2.0, qs.absmax2, qs.code2,
                                                                qs.offset)
        assert torch.equal(merged(tiled)(), merged(packed)())
        m = time_both_orders([merged(packed), merged(tiled)], dev, ["row-major", "tile order"])
        print(f"{N}x{K} | {t[0]:.1f} | {t[1]:.1f} | {g[0]:.1f} | {g[1]:.1f} || {m[0]:.1f} | {m[1]:.1f}", flush=True)
    if args.dequantize_only:
        return
    print("lora_linear_4bit, N x K, M: auto row-major | auto tile order | GEMM row-major | GEMM tile order | bf16 F.linear"
          + (" | fused row-major | fused tile order" if args.fused else "")
          + (" | fused row-major" if args.tiled and not args.fused else "") + (" | tiled GEMV" if args.tiled else ""))
    for N, K in shapes:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        packed, qs = qlora.quantize_4bit(w)
        tiled = qlora.tile_order(packed, qs)
        A, B = adapter(N, K, dev)
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)

            def call(p, path):
                return lambda: OP(x, p, qs.absmax, qs.blocksize, qs.quant_type, [N, K], qs.absmax2, qs.code2, qs.offset,
                                  None, A, B, 2.0, None, path)

            same = torch.equal(call(packed, 6)(), call(tiled, 6)())
            fns = [call(packed, 0), call(tiled, 0), call(packed, 6), call(tiled, 6), lambda: F.linear(x, w)]
            names = ["auto row-major", "auto tile order", "GEMM row-major", "GEMM tile order", "bf16"]
            if args.fused:
                fns += [call(packed, 3), call(tiled, 3)]
                names += ["fused row-major", "fused tile order"]
            if args.tiled and M <= 8:
                if not args.fused:
                    fns.append(call(packed, 3))
                    names.append("fused row-major")
                fns.append(call(tiled, 8))
                names.append("tiled GEMV")
            t = time_both_orders(fns, dev, names)
            print(f"{N}x{K} M={M} | " + " | ".join("failed" if v is None else f"{v:.1f}" for v in t) + ("" if same else " | GEMM OUTPUTS DIFFER"),
                  flush=True)


if __name__ == "__main__":
    main()
