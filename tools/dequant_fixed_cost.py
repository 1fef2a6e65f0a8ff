"""do_bench (timed as bench/ does) of dequantize_4bit and of a bf16 clone (a device copy) at four sizes, and a fit of
time = t0 + bytes / R for each: what fixed cost and steady rate a small dequantize is up against.

    PYTHONPATH=python:. python tools/dequant_fixed_cost.py
"""
import torch
import qlora
from bench.common import rotating, time_us

dev = torch.device("cuda")
rows = []
for N, K in [(4096, 4096), (8192, 8192), (16384, 8192), (28672, 8192)]:
    n = N * K
    weight = lambda: torch.randn(N, K, device=dev, dtype=torch.bfloat16)  # noqa: E731
    next_q = rotating(lambda: qlora.quantize_4bit(weight()), n / 2)
    next_w = rotating(weight, 2 * n)
    dq = time_us(lambda: qlora.dequantize_4bit(*next_q()), dev)
    cp = time_us(lambda: next_w().clone(), dev)
    rows.append((n, dq, cp))
    print(f"{N}x{K}: dequantize {dq:.2f} us ({(n / 2 + 2 * n) / dq / 1e3:.0f} GB/s), clone {cp:.2f} us ({4 * n / cp / 1e3:.0f} GB/s)")
    del next_q, next_w
    torch.cuda.empty_cache()
tiny = torch.zeros(1, device=dev)
print(f"one-element add: {time_us(lambda: tiny.add_(1), dev):.2f} us")
for name, col, per in (("dequantize", 1, 2.5), ("clone", 2, 4.0)):
    x = torch.tensor([r[0] * per for r in rows], dtype=torch.float64)
    y = torch.tensor([r[col] for r in rows], dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x], 1)
    t0, inv_r = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    print(f"fit {name}: t0 {t0:.2f} us + bytes / {1 / inv_r / 1e6:.2f} TB/s")
