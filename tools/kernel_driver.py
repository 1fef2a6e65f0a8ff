"""Runs one qlora kernel a few times, for a profiler to pick a launch (e.g. ncu --launch-skip 3 --launch-count 1).

    python tools/kernel_driver.py dequantize N K
    python tools/kernel_driver.py quantize N K
    python tools/kernel_driver.py lora M N K [path]
    python tools/kernel_driver.py adamw8bit | adamw32bit
"""

import math
import sys

import torch

import qlora
import qlora.optim

what, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
dev = torch.device("cuda")
if what in ("dequantize", "quantize"):
    N, K = args
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    packed, qs = qlora.quantize_4bit(w)
    for _ in range(6):
        qlora.dequantize_4bit(packed, qs) if what == "dequantize" else qlora.quantize_4bit(w)
elif what == "lora":
    M, N, K = args[:3]
    path = args[3] if len(args) > 3 else 0
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    packed, qs = qlora.quantize_4bit(w)
    A = torch.randn(16, K, device=dev, dtype=torch.bfloat16) / math.sqrt(K)
    B = torch.randn(N, 16, device=dev, dtype=torch.bfloat16) * 0.01
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    for _ in range(6):
        qlora.lora_linear_4bit(x, packed, qs, None, A, B, 2.0, None, path)
else:
    params = [torch.nn.Parameter(torch.randn(16 * 2**20, device=dev) * 0.1) for _ in range(16)]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    opt = (qlora.optim.AdamW8bit if what == "adamw8bit" else qlora.optim.AdamW)(params, lr=1e-4)
    for _ in range(6):
        opt.step()
torch.cuda.synchronize()
