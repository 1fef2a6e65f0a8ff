"""One optimizer step over 256M float32 parameters (16 tensors of 16M): qlora's fused AdamW variants against
torch.optim.AdamW(fused=True) and bitsandbytes' 32-bit and 8-bit (paged) AdamW."""

from __future__ import annotations

import gc

import torch

import qlora.optim
from bench.common import Context, Row, time_us

TENSORS, NUMEL = 16, 16 * 2**20               # 256M parameters
QUICK_TENSORS, QUICK_NUMEL = 4, 2**20         # 4M parameters
# Fewest bytes per parameter: p read + write, grad read, and both states read + written.
BYTES_32BIT = 4 + 4 + 4 + 2 * (4 + 4)         # 28
BYTES_8BIT = 4 + 4 + 4 + 2 * (1 + 1)          # 16 (the absmax adds 2 x 8 bytes per 256 parameters)


def _params(ctx: Context, count: int, numel: int) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(numel, device=ctx.device) * 0.1) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    return params


def _time_step(ctx: Context, make_optimizer, count: int, numel: int) -> float:
    params = _params(ctx, count, numel)
    opt = make_optimizer(params)
    opt.step()  # allocates the states
    us = time_us(opt.step, ctx.device)
    del opt, params
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return us


def run(ctx: Context) -> list[Row]:
    count, numel = (QUICK_TENSORS, QUICK_NUMEL) if ctx.quick else (TENSORS, NUMEL)
    n = count * numel
    shape = f"{count}x{numel // 2**20}M fp32"
    lr = dict(lr=1e-4)
    torch_us = _time_step(ctx, lambda ps: torch.optim.AdamW(ps, fused=True, **lr), count, numel)
    cases = [
        ("AdamW 32-bit", BYTES_32BIT, qlora.optim.AdamW, "AdamW32bit"),
        ("AdamW 32-bit paged", BYTES_32BIT, qlora.optim.PagedAdamW, "PagedAdamW32bit"),
        ("AdamW 8-bit", BYTES_8BIT, qlora.optim.AdamW8bit, "AdamW8bit"),
        ("AdamW 8-bit paged", BYTES_8BIT, qlora.optim.PagedAdamW8bit, "PagedAdamW8bit"),
    ]
    rows = []
    for case, per_param, ours, bnb_name in cases:
        rows.append(Row("adamw", case, shape, "qlora", _time_step(ctx, lambda ps: ours(ps, **lr), count, numel),
                        per_param * n))
        rows.append(Row("adamw", case, shape, "torch fused", torch_us, BYTES_32BIT * n,
                        note="torch.optim.AdamW(fused=True), 32-bit states; one measurement repeated per case"))
        if ctx.bnb is not None:
            bnb_cls = getattr(ctx.bnb.optim, bnb_name)
            rows.append(Row("adamw", case, shape, "bitsandbytes",
                            _time_step(ctx, lambda ps: bnb_cls(ps, **lr), count, numel), per_param * n))
    return rows
