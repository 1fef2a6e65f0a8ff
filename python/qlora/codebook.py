"""The codebooks of qlora's quantized formats: the one place these numbers are written.

The C++ kernels keep a copy (csrc/include/qlora/codebook.h) that the tests check against this module bit
for bit. Values are written as hex floats because they are float32 numbers: no decimal rounding can creep in.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["NF4_VALUES", "FP4_VALUES", "NF4_THRESHOLDS", "FP4_THRESHOLDS", "FP4_CODE_OF_RANK", "code_values",
           "dynamic_map"]

_h = float.fromhex

#: NF4 (normal float, quantiles of N(0, 1) scaled to [-1, 1]); index = 4-bit code.
NF4_VALUES = tuple(map(_h, [
    "-0x1p+0", "-0x1.647362p-1", "-0x1.0cd660p-1", "-0x1.946540p-2", "-0x1.23449ap-2", "-0x1.7a6a7ep-3",
    "-0x1.74f0e2p-4", "0x0p+0", "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
    "0x1.c34970p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1p+0"]))

#: FP4 (sign, 2 exponent bits, 1 mantissa bit: 0, 0.0625, 8, 12, 4, 6, 2, 3) divided by 12; code 8 is -0.
FP4_VALUES = tuple(map(_h, [
    "0x0p+0", "0x1.555556p-8", "0x1.555556p-1", "0x1p+0", "0x1.555556p-2", "0x1p-1", "0x1.555556p-3", "0x1p-2",
    "-0x0p+0", "-0x1.555556p-8", "-0x1.555556p-1", "-0x1p+0", "-0x1.555556p-2", "-0x1p-1", "-0x1.555556p-3",
    "-0x1p-2"]))

#: NF4 decision thresholds: code = number of thresholds strictly below the scaled value. They are the
#: midpoints of neighbouring codes as bitsandbytes' kernels round them, which keeps codes bit-compatible.
NF4_THRESHOLDS = tuple(map(_h, [
    "-0x1.b239b2p-1", "-0x1.38a4e0p-1", "-0x1.d70900p-2", "-0x1.5bd4ecp-2", "-0x1.e079d8p-3", "-0x1.1a7178p-3",
    "-0x1.74f0e2p-5", "0x1.45f5fep-5", "0x1.ec90c6p-4", "0x1.a0cfc0p-3", "0x1.2b05a8p-2", "0x1.8ea7f2p-2",
    "0x1.00da06p-1", "0x1.491b5ep-1", "0x1.b913b2p-1"]))

#: FP4 magnitude thresholds: rank of |x| = number of these below |x|.
FP4_THRESHOLDS = tuple(map(_h, [
    "0x1.555572p-9", "0x1.6p-4", "0x1.aaaaaap-3", "0x1.2aaaaap-2", "0x1.aaaaacp-2", "0x1.2aaaa0p-1",
    "0x1.aaaaaap-1"]))

#: The 3 magnitude bits of the FP4 code for each rank (codes in increasing value order).
FP4_CODE_OF_RANK = (0, 1, 6, 7, 4, 5, 2, 3)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # block size of the second-level (double) quantization


def code_values(quant_type: str, device=None) -> torch.Tensor:
    """The 16 float32 values of a 4-bit codebook, indexed by code."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    values = NF4_VALUES if quant_type == "nf4" else FP4_VALUES
    return torch.tensor(values, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """The 8-bit dynamic code as a tensor of its own; see ``_dynamic_values``.

    It is a copy of one kept on that device (quantize_4bit calls this for every tensor). On a GPU, building it
    from host values would be a host-to-device copy, which waits for all the work queued before it; on the CPU
    it would take half the time of quantizing a small tensor."""
    values = _DYNAMIC_SIGNED if signed else _DYNAMIC_UNSIGNED
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        # Traced, or under a mode such as FakeTensorMode: a tensor of that world, never kept.
        return torch.tensor(values, dtype=torch.float32, device=device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (signed, device)
    if key not in _DEVICE_MAPS:
        _DEVICE_MAPS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _DEVICE_MAPS[key].clone()


def _dynamic_values(signed: bool) -> tuple:
    """The 8-bit dynamic code (Dettmers, 8-bit approximations for parallelism, 2015): 256 sorted float32 values.

    One sign bit, then a unary exponent (a run of zeros ended by a 1) over decades 1e-6 .. 1, and the
    remaining bits a linear fraction between 0.1 and 1 of that decade, plus exact 0 and 1. The unsigned
    variant spends the sign bit on fraction. Values are computed in float32 in the same order as
    bitsandbytes computes them, so 8-bit states from either library decode identically.
    """
    exponent_bits, value_bits = 7, 7  # 8 bits less the sign
    values: list[float] = []
    for decade in range(exponent_bits):
        fraction_bits = decade + value_bits - exponent_bits + (0 if signed else 1)
        edges = torch.linspace(0.1, 1, 2**fraction_bits + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (decade - exponent_bits + 1)) * centres
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return tuple(sorted(values))


# Computed once, so that building the tensor inside a compiled region is a plain constant.
_DYNAMIC_SIGNED = _dynamic_values(signed=True)
_DYNAMIC_UNSIGNED = _dynamic_values(signed=False)
_DEVICE_MAPS: dict = {}  # (signed, device) -> the code on that device, never handed out itself
