"""Pure-PyTorch versions of every qlora op: the oracle the tests compare the kernels against.

Written for clarity, not speed, and never used on the product path. Arithmetic is float32 exactly where
the format defines it in float32 (scaling, thresholds, the double-quantized absmax), so codes must match
the kernels bit for bit.
"""

from __future__ import annotations

import math

import torch

from .codebook import (ABSMAX_BLOCKSIZE, FP4_CODE_OF_RANK, FP4_THRESHOLDS, NF4_THRESHOLDS, code_values)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x flattened to float32 and zero-padded into rows of `blocksize`."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    # amax propagates NaN: a block holding NaN gets a NaN absmax.
    return blocks.abs().amax(dim=1)


def _inverse_scale(absmax: torch.Tensor) -> torch.Tensor:
    return torch.where(absmax > 0, torch.ones_like(absmax) / absmax, torch.zeros_like(absmax))


def _count_below(x: torch.Tensor, thresholds) -> torch.Tensor:
    t = torch.tensor(thresholds, dtype=torch.float32, device=x.device)
    return (x.unsqueeze(-1) > t).sum(-1)


def code_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit code of each scaled value: the nearest codebook entry, ties to the lower one; NaN gives 0."""
    if quant_type == "nf4":
        return _count_below(scaled, NF4_THRESHOLDS)
    rank = _count_below(scaled.abs(), FP4_THRESHOLDS)
    magnitude = torch.tensor(FP4_CODE_OF_RANK, device=scaled.device)[rank]
    return magnitude + 8 * (scaled < 0)


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    n = A.numel()
    blocks = _blocks(A, blocksize)
    absmax = _absmax(blocks)
    codes = code_4bit(blocks * _inverse_scale(absmax)[:, None], quant_type).reshape(-1)[:n]
    codes = torch.nn.functional.pad(codes, (0, n % 2), value=int(code_4bit(torch.zeros(1), quant_type)))
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8).view(-1, 1)
    return packed, absmax


def code_8bit(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Nearest entry of a sorted 256-entry code, found as bitsandbytes' 8-bit quantizer finds it."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val
    pick_up = x > (upper + val) * 0.5
    pick_down = x < (lower + val) * 0.5
    return torch.where(above, torch.where(pick_up, upper_pivot, pivot), torch.where(pick_down, lower_pivot, pivot))


def double_quantize(absmax: torch.Tensor, code: torch.Tensor):
    """absmax - mean as 8-bit codes in blocks of 256, one float32 scale per block, and the mean."""
    offset = absmax.double().mean().float() if absmax.numel() else torch.zeros((), device=absmax.device)
    centered = absmax.float() - offset
    blocks = _blocks(centered, ABSMAX_BLOCKSIZE)
    absmax2 = _absmax(blocks)
    q = code_8bit(code.float(), blocks * _inverse_scale(absmax2)[:, None]).reshape(-1)[: absmax.numel()]
    return q.to(torch.uint8), absmax2, offset.reshape(())


def dequantize_absmax(qabsmax, absmax2, code2, offset) -> torch.Tensor:
    scale = absmax2.repeat_interleave(ABSMAX_BLOCKSIZE)[: qabsmax.numel()]
    return code2[qabsmax.long()] * scale + offset  # two roundings, like the kernels


def tile_order_index(N: int, K: int) -> torch.Tensor:
    """For each byte of a tile-ordered packed weight [N, K], the index of the same byte in row-major order: byte
    16·lane + 8·h + j of tile ti, block b (lane = 4g + t) is byte 4j + t of block b's 32 bytes in row 16·ti + 8h + g."""
    ti, b, lane, h, j = torch.meshgrid(torch.arange(N // 16), torch.arange(K // 64), torch.arange(32), torch.arange(2),
                                       torch.arange(8), indexing="ij")
    g, t = lane // 4, lane % 4
    row = 16 * ti + 8 * h + g
    return (row * (K // 2) + 32 * b + 4 * j + t).reshape(N // 16, K // 64, 512)


def tile_order(packed, N: int, K: int) -> torch.Tensor:
    return packed.reshape(-1)[tile_order_index(N, K).to(packed.device)]


def row_order(packed) -> torch.Tensor:
    """Row-major [(N·K) / 2, 1] bytes of a tile-ordered [N / 16, K / 64, 512] packed weight."""
    N, K = packed.shape[0] * 16, packed.shape[1] * 64
    out = torch.empty(N * K // 2, dtype=packed.dtype, device=packed.device)
    out[tile_order_index(N, K).to(packed.device).reshape(-1)] = packed.reshape(-1)
    return out.reshape(-1, 1)


def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, absmax2=None, code2=None, offset=None):
    if packed.dim() == 3:
        packed = row_order(packed)
    if absmax.dtype == torch.uint8:
        absmax = dequantize_absmax(absmax, absmax2, code2, offset)
    n = 1
    for s in shape:
        n *= s
    p = packed.reshape(-1).long()
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]
    values = code_values(quant_type, device=packed.device)[codes]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)


def dequantize_4bit_lora(packed, absmax, blocksize, quant_type, shape, dtype, lora_A, lora_B, scale, absmax2=None,
                         code2=None, offset=None):
    """dequant(W) + scale·B·A, summed in float64 and rounded once to dtype."""
    w = dequantize_4bit(packed, absmax, blocksize, quant_type, shape, torch.float32, absmax2, code2, offset)
    return (w.double() + scale * (lora_B.double() @ lora_A.double())).to(dtype)


# ---- AdamW (the fused optimizer ops) ------------------------------------------------------------------------
# Every float32 operation below is one torch op, rounded once, in the kernels' order, so the reference
# reproduces the kernels' bits; the per-tensor constants are computed in Python floats (double) as the
# kernels compute them.

OPTIMIZER_BLOCKSIZE = 256
_CODE_TOP_INDEX = (127, 63, 191, 31, 95, 159, 223)


def _pow_int(base: float, e: int) -> float:
    result = 1.0
    while e > 0:
        if e & 1:
            result *= base
        base *= base
        e >>= 1
    return result


def adamw_scalars(lr: float, step: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> dict:
    """The per-tensor float32 constants of one AdamW step (bias corrections as torch.optim.AdamW)."""
    t = int(step)
    bc1 = 1.0 - _pow_int(beta1, t)
    bc2 = 1.0 - _pow_int(beta2, t)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return {"decay": f32(1.0 - lr * weight_decay), "one_minus_beta1": f32(1.0 - beta1), "beta2": f32(beta2),
            "one_minus_beta2": f32(1.0 - beta2), "neg_step_size": f32(-(lr / bc1)), "bc2_sqrt": f32(math.sqrt(bc2)),
            "eps": f32(eps)}


def adamw_elements(p, g, m, v, s):
    """New (p, m, v) in float32; elements whose gradient is not finite keep their old values."""
    s = {k: x.to(p.device) for k, x in s.items()}
    p2 = p * s["decay"]
    m2 = m + s["one_minus_beta1"] * (g - m)
    v2 = v * s["beta2"] + (s["one_minus_beta2"] * g) * g
    # A full tensor as divisor: torch turns division by a scalar into multiplication by its reciprocal.
    # sqrt in float64 rounded once to float32 is the correctly rounded float32 sqrt (torch's float32 CPU sqrt
    # is not always).
    denom = torch.sqrt(v2.double()).float() / torch.full_like(v2, s["bc2_sqrt"].item()) + s["eps"]
    p2 = p2 + (s["neg_step_size"] * m2) / denom
    ok = torch.isfinite(g)
    return torch.where(ok, p2, p), torch.where(ok, m2, m), torch.where(ok, v2, v)


def adamw_32bit(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, lr_tensor=None):
    """In-place AdamW step with float32 states, as the adamw_32bit op computes it."""
    lr = float(lr_tensor) if lr_tensor is not None else lr
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        s = adamw_scalars(lr, float(step), beta1, beta2, eps, weight_decay)
        p2, m2, v2 = adamw_elements(p.float(), g.float(), m, v, s)
        p.copy_(p2.to(p.dtype))
        m.copy_(m2)
        v.copy_(v2)


def _code_state1(code, scaled, value):
    c = code_8bit(code, scaled)
    mismatch = torch.signbit(code[c]) != torch.signbit(value)
    up = mismatch & (value > 0) & (c < 255)
    down = mismatch & (value <= 0) & (c > 0)
    return c + up.long() - down.long()


def adamw_8bit_blockwise(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, lr, beta1, beta2,
                         eps, weight_decay, lr_tensor=None):
    """In-place AdamW step with 8-bit blockwise states, as the adamw_8bit_blockwise op computes it."""
    lr = float(lr_tensor) if lr_tensor is not None else lr
    for p, g, c1, c2, a1, a2, step in zip(params, grads, state1, state2, absmax1, absmax2, steps):
        s = adamw_scalars(lr, float(step), beta1, beta2, eps, weight_decay)
        n = p.numel()
        scale1 = a1.repeat_interleave(OPTIMIZER_BLOCKSIZE)[:n]
        scale2 = a2.repeat_interleave(OPTIMIZER_BLOCKSIZE)[:n]
        m = qmap1[c1.reshape(-1).long()] * scale1
        v = qmap2[c2.reshape(-1).long()] * scale2
        p2, m2, v2 = adamw_elements(p.reshape(-1).float(), g.reshape(-1).float(), m, v, s)
        new1 = _absmax(_blocks(m2, OPTIMIZER_BLOCKSIZE))
        new2 = _absmax(_blocks(v2, OPTIMIZER_BLOCKSIZE))
        inv1 = _inverse_scale(new1).repeat_interleave(OPTIMIZER_BLOCKSIZE)[:n]
        inv2 = _inverse_scale(new2).repeat_interleave(OPTIMIZER_BLOCKSIZE)[:n]
        p.copy_(p2.to(p.dtype).view_as(p))
        c1.copy_(_code_state1(qmap1, m2 * inv1, m2).to(torch.uint8).view_as(c1))
        c2.copy_(code_8bit(qmap2, v2 * inv2).to(torch.uint8).view_as(c2))
        a1.copy_(new1)
        a2.copy_(new2)


# ---- fused 4-bit linear + LoRA ------------------------------------------------------------------------------


def lora_linear_4bit(x, packed, absmax, blocksize, quant_type, shape, absmax2=None, code2=None, offset=None,
                     bias=None, lora_A=None, lora_B=None, scale=1.0, x_lora=None, path=0):
    """y = x·Wᵀ + scale·(x_lora·Aᵀ)·Bᵀ + bias in float64, W the float32 dequantized weight. Returns float64."""
    w = dequantize_4bit(packed, absmax, blocksize, quant_type, shape, torch.float32, absmax2, code2, offset).double()
    y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    if lora_A is not None:
        xl = (x if x_lora is None else x_lora).double()
        y = y + scale * (xl @ lora_A.double().t()) @ lora_B.double().t()
    return y
