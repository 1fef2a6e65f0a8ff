"""Per-kernel CUDA times of NF4+DQ quantize and dequantize on one weight shape (torch.profiler)."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import qlora

N, K = (int(v) for v in (sys.argv[1:3] if len(sys.argv) > 2 else (28672, 8192)))
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
packed, qs = qlora.quantize_4bit(w)
for _ in range(3):
    qlora.dequantize_4bit(packed, qs)
    qlora.quantize_4bit(w)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        qlora.quantize_4bit(w)
        qlora.dequantize_4bit(packed, qs)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
