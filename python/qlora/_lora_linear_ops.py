"""Fake kernel and autograd for torch.ops.qlora.lora_linear_4bit (imported by qlora._ops)."""

from __future__ import annotations

import torch

# Positions of the op's arguments, in schema order (csrc/registration.cpp).
_X, _BIAS, _LORA_A, _LORA_B, _X_LORA = 0, 9, 10, 11, 13
_NUM_INPUTS = 15


@torch.library.register_fake("qlora::lora_linear_4bit")
def _lora_linear_4bit_fake(x, packed, absmax, blocksize, quant_type, shape, absmax2=None, code2=None, offset=None,
                           bias=None, lora_A=None, lora_B=None, scale=1.0, x_lora=None, path=0):
    torch._check(len(shape) == 2, lambda: f"shape must be the weight's [out_features, in_features], got {shape}")
    torch._check(x.shape[-1] == shape[1],
                 lambda: f"x has {x.shape[-1]} features in its last dimension but the weight has {shape[1]}")
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, blocksize, quant_type, shape, absmax2, code2, offset, bias, lora_A, lora_B, scale, x_lora,
     _path) = inputs
    ctx.blocksize, ctx.quant_type, ctx.shape, ctx.scale = blocksize, quant_type, list(shape), scale
    ctx.has_bias, ctx.has_lora, ctx.has_x_lora = bias is not None, lora_A is not None, x_lora is not None
    # Only inputs are kept: the LoRA branch's input (for grad_A, and to recompute x_lora·Aᵀ for grad_B) and the
    # packed weight, never a dequantized copy.
    lora_input = (x_lora if x_lora is not None else x) if lora_A is not None else None
    ctx.save_for_backward(lora_input, packed, absmax, absmax2, code2, offset, lora_A, lora_B)


def _backward(ctx, grad):
    lora_input, packed, absmax, absmax2, code2, offset, lora_A, lora_B = ctx.saved_tensors
    needs = ctx.needs_input_grad
    N, K = ctx.shape
    g = grad.reshape(-1, N)
    grads = [None] * _NUM_INPUTS
    grad_x = None
    if needs[_X]:
        # Large-M backward: dequantize into a temporary (reused by the caching allocator) and one GEMM.
        w = torch.ops.qlora.dequantize_4bit(packed, absmax, ctx.blocksize, ctx.quant_type, ctx.shape, grad.dtype,
                                            absmax2, code2, offset)
        grad_x = torch.mm(g, w)
    if ctx.has_lora:
        gb = torch.mm(g, lora_B) * ctx.scale  # s·g·B, [M, r]
        xl = lora_input.reshape(-1, K)
        if ctx.has_x_lora:
            if needs[_X_LORA]:
                grads[_X_LORA] = torch.mm(gb, lora_A).reshape(lora_input.shape)
        elif grad_x is not None:
            grad_x = torch.addmm(grad_x, gb, lora_A)
        if needs[_LORA_A]:
            grads[_LORA_A] = torch.mm(gb.t(), xl)
        if needs[_LORA_B]:
            xa = torch.mm(xl, lora_A.t()) * ctx.scale
            grads[_LORA_B] = torch.mm(g.t(), xa)
    if grad_x is not None:
        grads[_X] = grad_x.reshape(*grad.shape[:-1], K)
    if ctx.has_bias and needs[_BIAS]:
        grads[_BIAS] = g.sum(0)
    return tuple(grads)


torch.library.register_autograd("qlora::lora_linear_4bit", _backward, setup_context=_setup_context)
