"""Fake (meta) kernels for torch.ops.qlora.*, so the ops trace under torch.compile and FakeTensor."""

from __future__ import annotations

import torch

from .codebook import ABSMAX_BLOCKSIZE


def _ceil_div(a, b):
    return -(a // -b)


@torch.library.register_fake("qlora::quantize_4bit")
def _quantize_4bit_fake(A, blocksize=64, quant_type="nf4"):
    n = A.numel()
    packed = A.new_empty((_ceil_div(n, 2), 1), dtype=torch.uint8)
    absmax = A.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("qlora::double_quantize")
def _double_quantize_fake(absmax, code):
    n = absmax.numel()
    return (absmax.new_empty((n,), dtype=torch.uint8), absmax.new_empty((_ceil_div(n, ABSMAX_BLOCKSIZE),)),
            absmax.new_empty(()))


@torch.library.register_fake("qlora::dequantize_4bit")
def _dequantize_4bit_fake(packed, absmax, blocksize, quant_type, shape, dtype, absmax2=None, code2=None, offset=None):
    return packed.new_empty(shape, dtype=dtype)


from . import _lora_linear_ops  # noqa: E402,F401  (lora_linear_4bit: fake kernel and autograd)
