"""Fake kernel for torch.ops.qlora.lora_linear_4bit (imported by qlora._ops). Its autograd is registered in C++
(csrc/lora_linear_4bit_autograd.cpp), where each call costs far less host time than a Python wrapper."""

from __future__ import annotations

import torch


@torch.library.register_fake("qlora::lora_linear_4bit")
def _lora_linear_4bit_fake(x, packed, absmax, blocksize, quant_type, shape, absmax2=None, code2=None, offset=None,
                           bias=None, lora_A=None, lora_B=None, scale=1.0, x_lora=None, path=0):
    torch._check(len(shape) == 2, lambda: f"shape must be the weight's [out_features, in_features], got {shape}")
    torch._check(x.shape[-1] == shape[1],
                 lambda: f"x has {x.shape[-1]} features in its last dimension but the weight has {shape[1]}")
    return x.new_empty((*x.shape[:-1], shape[0]))
