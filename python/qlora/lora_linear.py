"""Functional 4-bit linear + LoRA: y = x·dequant(W)ᵀ + scale·(x_lora·Aᵀ)·Bᵀ + bias, one op, differentiable."""

from __future__ import annotations

from typing import Optional

import torch

from .quantization import QuantState

__all__ = ["lora_linear_4bit", "PATH_AUTO", "PATH_FUSED", "PATH_DEQUANTIZE_GEMM", "PATH_FUSED_BLOCK_SCALED",
           "PATH_DEQUANTIZE_GEMM_MERGED", "PATH_DEQUANTIZE_GEMM_UNMERGED", "PATH_TENSOR_CORE", "PATH_TENSOR_CORE_WIDE",
           "PATH_FUSED_TILED"]

#: Implementation choice on CUDA (``path`` argument). Anything but PATH_AUTO is meant for benchmarking.
PATH_AUTO, PATH_FUSED, PATH_DEQUANTIZE_GEMM, PATH_FUSED_BLOCK_SCALED = 0, 1, 2, 3
PATH_DEQUANTIZE_GEMM_MERGED, PATH_DEQUANTIZE_GEMM_UNMERGED, PATH_TENSOR_CORE, PATH_TENSOR_CORE_WIDE = 4, 5, 6, 7
PATH_FUSED_TILED = 8


def lora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState,
                     bias: Optional[torch.Tensor] = None, lora_A: Optional[torch.Tensor] = None,
                     lora_B: Optional[torch.Tensor] = None, scale: float = 1.0,
                     x_lora: Optional[torch.Tensor] = None, path: int = PATH_AUTO) -> torch.Tensor:
    """A frozen 4-bit linear layer with an optional LoRA adapter, forward and backward.

    Parameters
    ----------
    x : Tensor
        ``[..., in_features]``, float32, float16 or bfloat16; the output has x's dtype.
    packed, quant_state :
        The 4-bit weight ``[out_features, in_features]`` from :func:`qlora.quantize_4bit`, its bytes in bitsandbytes'
        row-major order or in tile order (:func:`qlora.tile_order`). A tile-ordered weight of at least 2^27 elements (or,
        where the tiled small-M GEMV keeps at least 6 warps an SM streaming, of at least 2^25 elements or where the
        tensor-core GEMM's launch is not one full wave of the GPU) goes to that GEMV for up to 8 rows of x
        (``PATH_FUSED_TILED``),
        otherwise to the tensor-core GEMM from one token where that runs (the fused small-M
        kernel reads row-major bytes only), and is otherwise read as the row-major one; every path that takes both
        orders gives the same bits from either.
    bias : Tensor, optional
        ``[out_features]``, x's dtype.
    lora_A, lora_B : Tensor, optional
        ``[r, in_features]`` and ``[out_features, r]``, x's dtype; both or neither.
    scale : float
        LoRA scaling, ``alpha / r``.
    x_lora : Tensor, optional
        Input of the LoRA branch, e.g. ``dropout(x)``; defaults to x. Passing the dropped-out tensor keeps the op
        itself deterministic.
    path : int
        CUDA only: ``PATH_AUTO`` picks the fused small-M kernel for up to 16 rows of x, then up to 512 rows (1024
        where in_features >= 8192) the tensor-core GEMM that decodes the 4-bit weight in its main loop where it
        runs (``PATH_TENSOR_CORE``: bfloat16, in_features % 64 == 0, blocksize >= 64, an sm_90 GPU and a library
        built for sm_90a); up to 64 rows it takes that GEMM only where its launch fills the GPU, else the fused
        kernel (up to 64 rows with blocksize 64 and in_features % 64 == 0, up to 32 otherwise; float16/bfloat16,
        in_features % 32 == 0); dequantize + cuBLAS beyond. The other values force one (benchmarking).
        ``PATH_TENSOR_CORE_WIDE`` is that GEMM with 256-token tiles whatever the rows (``PATH_TENSOR_CORE`` takes
        them above 128 rows where their grid fills the GPU). ``PATH_FUSED_BLOCK_SCALED`` is the fused kernel that
        scales per quantization block instead of per weight (blocksize 64, in_features % 64 == 0, any rows of x in
        slices of 32; elsewhere as ``PATH_FUSED``). ``PATH_FUSED_TILED`` is the small-M GEMV for a tile-ordered
        weight (1 to 8 rows of x, float16/bfloat16, blocksize 64, out_features % 16 == 0, in_features % 256 == 0).
        Dequantize + cuBLAS merges the adapter into the dequantized weight when the LoRA branch reads x itself
        (no ``x_lora``), x is 16-bit and rows are many against the weight (M at least a sixth of the harmonic
        mean of its dimensions); ``PATH_DEQUANTIZE_GEMM_MERGED`` and ``PATH_DEQUANTIZE_GEMM_UNMERGED`` force either way.

    Returns
    -------
    Tensor
        ``[..., out_features]``. Gradients flow to x, x_lora, bias, lora_A and lora_B, never to the weight.
    """
    qs = quant_state
    if len(qs.shape) != 2:
        raise ValueError(f"quant_state.shape must be [out_features, in_features], got {list(qs.shape)}")
    return torch.ops.qlora.lora_linear_4bit(x, packed, qs.absmax, qs.blocksize, qs.quant_type, list(qs.shape),
                                            qs.absmax2, qs.code2, qs.offset, bias, lora_A, lora_B, float(scale),
                                            x_lora, path)
