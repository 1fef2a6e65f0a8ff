"""Cost of paging in the optimizer step: 256M float32 parameters (16 x 16M), as bench/bench_adamw.py.

Times PagedAdamW / PagedAdamW8bit with prefetch "auto" (default), True and False, next to the device-memory versions, and the
host time of one paged_prefetch call on already-resident states.
"""

import time

import torch

import qlora.optim
from bench.common import time_us

device = torch.device("cuda")
params = [torch.nn.Parameter(torch.randn(16 * 2**20, device=device) * 0.1) for _ in range(16)]
for p in params:
    p.grad = torch.randn_like(p) * 0.01

for name, make in [("AdamW", lambda: qlora.optim.AdamW(params, lr=1e-4)),
                   ("PagedAdamW", lambda: qlora.optim.PagedAdamW(params, lr=1e-4)),
                   ("PagedAdamW prefetch=True", lambda: qlora.optim.PagedAdamW(params, lr=1e-4, prefetch=True)),
                   ("PagedAdamW prefetch=False", lambda: qlora.optim.PagedAdamW(params, lr=1e-4, prefetch=False)),
                   ("AdamW8bit", lambda: qlora.optim.AdamW8bit(params, lr=1e-4)),
                   ("PagedAdamW8bit", lambda: qlora.optim.PagedAdamW8bit(params, lr=1e-4)),
                   ("PagedAdamW8bit prefetch=False", lambda: qlora.optim.PagedAdamW8bit(params, lr=1e-4, prefetch=False))]:
    opt = make()
    opt.step()
    torch.cuda.synchronize()
    us = [time_us(opt.step, device) for _ in range(3)]
    t0 = time.perf_counter()
    for _ in range(10):
        opt.step()
    host_us = (time.perf_counter() - t0) / 10 * 1e6
    torch.cuda.synchronize()
    line = f"{name:32} step {' / '.join(f'{u:.0f}' for u in us)} µs (3 repeats), host time per step {host_us:.0f} µs"
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    if qlora.optim.is_paged(states[0]):
        t0 = time.perf_counter()
        for t in states:
            qlora.optim.prefetch(t)
        line += f"; prefetch of {len(states)} resident states: host {(time.perf_counter() - t0) * 1e6:.0f} µs"
        torch.cuda.synchronize()
        line += f", with sync {(time.perf_counter() - t0) * 1e6:.0f} µs"
    print(line, flush=True)
    del opt
    torch.cuda.empty_cache()
