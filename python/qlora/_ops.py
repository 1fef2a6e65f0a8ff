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


@torch.library.register_fake("qlora::dequantize_4bit_lora")
def _dequantize_4bit_lora_fake(packed, absmax, blocksize, quant_type, shape, dtype, lora_A, lora_B, scale, absmax2=None,
                               code2=None, offset=None):
    torch._check(len(shape) == 2, lambda: f"shape must be the weight's [out_features, in_features], got {shape}")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == shape[1], lambda: "lora_A must be [r, in_features]")
    torch._check(lora_B.dim() == 2 and lora_B.shape[0] == shape[0] and lora_B.shape[1] == lora_A.shape[0],
                 lambda: "lora_B must be [out_features, r]")
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("qlora::tile_order_4bit")
def _tile_order_4bit_fake(packed, shape):
    torch._check(len(shape) == 2, lambda: f"shape must be the weight's [out_features, in_features], got {shape}")
    torch._check(packed.dim() != 3, lambda: "packed is already in tile order")
    return packed.new_empty((shape[0] // 16, shape[1] // 64, 512))


@torch.library.register_fake("qlora::row_order_4bit")
def _row_order_4bit_fake(packed):
    if packed.dim() == 3:
        return packed.new_empty((packed.shape[0] * packed.shape[1] * packed.shape[2], 1))
    return packed.new_empty(packed.shape)


# ---- paged optimizers ---------------------------------------------------------------------------------------

@torch.library.register_fake("qlora::paged_empty")
def _paged_empty_fake(size, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


@torch.library.register_fake("qlora::paged_prefetch")
def _paged_prefetch_fake(t, to_device=True):
    return None


@torch.library.register_fake("qlora::paged_advise")
def _paged_advise_fake(t, location="device"):
    return None


@torch.library.register_fake("qlora::is_paged")
def _is_paged_fake(t):
    return False


@torch.library.register_fake("qlora::adamw_32bit")
def _adamw_32bit_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                      lr_tensor=None):
    return None


@torch.library.register_fake("qlora::adamw_8bit_blockwise")
def _adamw_8bit_blockwise_fake(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, lr, beta1,
                               beta2, eps, weight_decay, lr_tensor=None):
    return None


from . import _lora_linear_ops  # noqa: E402,F401  (lora_linear_4bit: fake kernel)
