"""Pure-PyTorch versions of every qlora op: the oracle the tests compare the kernels against.

Written for clarity, not speed, and never used on the product path. Arithmetic is float32 exactly where
the format defines it in float32 (scaling, thresholds, the double-quantized absmax), so codes must match
the kernels bit for bit.
"""

from __future__ import annotations

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


def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, absmax2=None, code2=None, offset=None):
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
