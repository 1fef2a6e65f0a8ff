"""Bit-compatibility with bitsandbytes' 4-bit format, checked against bitsandbytes itself (CUDA only)."""

from __future__ import annotations

import pytest
import torch

import qlora
from qlora import codebook

from conftest import CUDA

pytestmark = pytest.mark.skipif(not CUDA, reason="bitsandbytes' 4-bit kernels need a CUDA GPU")
bnb = pytest.importorskip("bitsandbytes") if CUDA else None
F = bnb.functional if bnb is not None else None

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bnb_quantize(w, blocksize, quant_type, double_quant):
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def assert_bits_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    assert_bits_equal(qlora.dynamic_map(signed), F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codebooks_equal_bitsandbytes(quant_type):
    assert_bits_equal(qlora.codebook.code_values(quant_type), F.get_4bit_type(quant_type, device="cpu"))


def unpack(packed):
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)


def rank(codes, quant_type):
    """Position of each code in value order (FP4 codes are sign-magnitude, not ordered)."""
    if quant_type == "nf4":
        return codes
    of_code = torch.tensor([codebook.FP4_CODE_OF_RANK.index(c) for c in range(8)], device=codes.device)
    magnitude = of_code[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("blocksize", codebook.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_equal_bitsandbytes(dtype, blocksize, quant_type):
    w = torch.randn(97, 5 * blocksize + 3, dtype=dtype, device="cuda")
    ours, qs = qlora.quantize_4bit(w, blocksize, quant_type, double_quant=False)
    theirs, bqs = bnb_quantize(w, blocksize, quant_type, double_quant=False)
    assert_bits_equal(qs.absmax, bqs.absmax)
    n = w.numel()
    ours_codes, theirs_codes = unpack(ours)[:n], unpack(theirs)[:n]
    differ = ours_codes != theirs_codes
    # bitsandbytes is built with fast math: its 1/absmax is an approximate reciprocal, so a value within
    # an ulp or two of a decision threshold may land on the neighbouring code there. qlora divides exactly.
    # Anything else would be a real difference in the format.
    assert differ.float().mean() < 1e-3
    assert torch.all((rank(ours_codes[differ], quant_type) - rank(theirs_codes[differ], quant_type)).abs() == 1)
    absmax = qs.absmax.repeat_interleave(blocksize)[:n]
    scaled = (w.reshape(-1).float() * (1.0 / absmax))[differ]
    thresholds = torch.tensor(codebook.NF4_THRESHOLDS if quant_type == "nf4" else codebook.FP4_THRESHOLDS,
                              device="cuda")
    probe = scaled if quant_type == "nf4" else scaled.abs()
    relative_gap = ((probe[:, None] - thresholds).abs() / thresholds.abs()).min(dim=1).values
    assert torch.all(relative_gap <= 4 * 2.0**-23), relative_gap.max()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_at_thresholds_equal_bitsandbytes(quant_type):
    thresholds = torch.tensor(codebook.NF4_THRESHOLDS if quant_type == "nf4" else codebook.FP4_THRESHOLDS)
    probes = torch.cat([thresholds, torch.nextafter(thresholds, torch.tensor(2.0)),
                        torch.nextafter(thresholds, torch.tensor(-2.0))])
    probes = torch.cat([probes, -probes])
    block = torch.cat([torch.tensor([1.0]), probes])
    block = torch.nn.functional.pad(block, (0, (-block.numel()) % 64)).cuda()
    ours, _ = torch.ops.qlora.quantize_4bit(block, 64, quant_type)
    theirs, _ = bnb_quantize(block, 64, quant_type, double_quant=False)
    assert_bits_equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_double_quantized_absmax_equals_bitsandbytes(dtype):
    w = torch.randn(1000, 1024, dtype=dtype, device="cuda")
    _, qs = qlora.quantize_4bit(w, 64, "nf4", double_quant=True)
    _, bqs = bnb_quantize(w, 64, "nf4", double_quant=True)
    # bitsandbytes takes the mean in float32, qlora in float64: the offsets agree to an ulp.
    torch.testing.assert_close(qs.offset, bqs.offset, rtol=2e-7, atol=0)
    if torch.equal(qs.offset, bqs.offset):
        assert_bits_equal(qs.absmax, bqs.absmax)
        assert_bits_equal(qs.absmax2, bqs.state2.absmax)
    else:
        assert (qs.absmax != bqs.absmax).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_round_trips_across_libraries_are_bit_exact(dtype, blocksize, quant_type, double_quant):
    w = torch.randn(300, 2 * blocksize + 64, dtype=dtype, device="cuda") * 0.02
    # bitsandbytes quantizes, qlora dequantizes
    theirs, bqs = bnb_quantize(w, blocksize, quant_type, double_quant)
    qs = qlora.QuantState.from_dict(bqs.as_dict(packed=True))
    assert_bits_equal(qlora.dequantize_4bit(theirs, qs), F.dequantize_4bit(theirs, bqs))
    # qlora quantizes, bitsandbytes dequantizes
    ours, qs = qlora.quantize_4bit(w, blocksize, quant_type, double_quant=double_quant)
    bqs = F.QuantState.from_dict(qs.as_dict(packed=True), device=torch.device("cuda"))
    assert_bits_equal(F.dequantize_4bit(ours, bqs), qlora.dequantize_4bit(ours, qs))


def test_linear4bit_state_dict_loads_without_bitsandbytes_code():
    layer = bnb.nn.Linear4bit(320, 192, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight.data = torch.randn(192, 320) * 0.05
    layer = layer.cuda()
    state = {k: v for k, v in layer.state_dict().items() if k.startswith("weight.")}
    qs = qlora.QuantState.from_dict(state)
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert qs.shape == (192, 320)
    assert_bits_equal(qlora.dequantize_4bit(layer.state_dict()["weight"], qs), expected)
