"""dequantize_4bit_lora: dequant(W) + scale·B·A (the weight with a LoRA adapter merged in) against the reference,
on the CPU and on the GPU, where a kernel computes it for K % 16 == 0 and r <= 64 and other layouts fall back."""

from __future__ import annotations

import math

import pytest
import torch

import qlora
from qlora import reference

from conftest import CUDA

OP = torch.ops.qlora.dequantize_4bit_lora
# (N, K, r): whole 64-column strips; a last strip of 32 columns (a CTA whose second strip lies past K) and a partial
# 16-row tile; an odd rank; a rank that is not a multiple of 16 (padded); the largest rank the kernel takes; more
# rows than one CTA's 96 (its warps walk 6 16-row tiles), ending in a partial tile; then three layouts the kernel
# refuses (K % 16 != 0 twice, r > 64) and the composite computes.
SHAPES = [(48, 256, 16), (33, 160, 8), (21, 80, 5), (24, 112, 40), (40, 96, 64), (520, 1024, 16), (16, 100, 8),
          (21, 72, 5), (20, 64, 65)]
# One unit in the last place of each dtype, relative: the reference rounds once, the ops may land one ulp away.
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}


def sample_inputs(device, N, K, r, dtype, blocksize=64, quant_type="nf4", double_quant=True):
    w = torch.randn(N, K, device=device) * 0.05
    packed, qs = qlora.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    lora_A = (torch.randn(r, K, device=device) / math.sqrt(K)).to(dtype)
    lora_B = (torch.randn(N, r, device=device) * 0.1).to(dtype)
    return dict(packed=packed, absmax=qs.absmax, blocksize=qs.blocksize, quant_type=qs.quant_type, shape=[N, K],
                dtype=dtype, lora_A=lora_A, lora_B=lora_B, scale=2.0, absmax2=qs.absmax2, code2=qs.code2,
                offset=qs.offset)


def float32_sum_bound(a):
    """The rounding error float32 arithmetic may make in w + s·Σ_j B[n,j]·A[j,k] (r + 1 terms): (r + 1)·2^-24 of the
    sum of the terms' magnitudes."""
    w = reference.dequantize_4bit(a["packed"], a["absmax"], a["blocksize"], a["quant_type"], a["shape"],
                                  torch.float64, a["absmax2"], a["code2"], a["offset"])
    terms = w.abs() + a["scale"] * (a["lora_B"].double().abs() @ a["lora_A"].double().abs())
    return (a["lora_A"].shape[0] + 1) * 2.0 ** -24 * terms


def assert_within_ulp(out, ref, a):
    """Within one unit in the last place of ref's dtype (subnormals: of the smallest normal), plus float32's
    summation error."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    ulp = ULP[ref.dtype] * torch.maximum(ref.double().abs(), torch.tensor(torch.finfo(ref.dtype).smallest_normal))
    tol = ulp + float32_sum_bound(a).to(out.device)
    bad = ((out.double() - ref.double()).abs() > tol).sum().item()
    assert bad == 0, f"{bad} of {ref.numel()} elements more than one ulp from the reference"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_reference(device, shape, dtype):
    a = sample_inputs(device, *shape, dtype)
    assert_within_ulp(OP(**a), reference.dequantize_4bit_lora(**a), a)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_formats(device, quant_type, double_quant, blocksize):
    a = sample_inputs(device, 40, 512, 16, torch.bfloat16, blocksize, quant_type, double_quant)
    assert_within_ulp(OP(**a), reference.dequantize_4bit_lora(**a), a)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    a = sample_inputs("cpu", 520, 1024, 16, torch.bfloat16)
    cpu = OP(**a)
    gpu = OP(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in a.items()}).cpu()
    assert_within_ulp(gpu, cpu, a)


@pytest.mark.parametrize("r", [16, 5])
def test_lora_B_alignment_does_not_matter(device, r):
    """B one element past a 4-byte boundary (the kernel then cannot load two ranks at once) gives the same bits."""
    a = sample_inputs(device, 48, 256, r, torch.bfloat16)
    shifted = torch.empty(a["lora_B"].numel() + 1, dtype=a["lora_B"].dtype, device=device)[1:].view_as(a["lora_B"])
    shifted.copy_(a["lora_B"])
    assert shifted.data_ptr() % 4 != 0
    assert torch.equal(OP(**{**a, "lora_B": shifted}), OP(**a))


def test_zero_adapter_is_the_dequantized_weight(device):
    a = sample_inputs(device, 48, 256, 16, torch.bfloat16)
    a["lora_B"].zero_()
    want = qlora.dequantize_4bit(a["packed"], qlora.QuantState(a["absmax"], [48, 256], torch.bfloat16, 64, "nf4",
                                                                a["absmax2"], a["code2"], a["offset"]))
    assert torch.equal(OP(**a), want)


@pytest.mark.parametrize("shape", [(48, 256, 16), (16, 100, 8)], ids=str)
def test_opcheck(device, shape):
    torch.library.opcheck(OP.default, (), sample_inputs(device, *shape, torch.bfloat16))


@pytest.mark.parametrize("name, edit, message", [
    ("lora_A shape", lambda a: a.update(lora_A=a["lora_A"][:, :-16]), "lora_A must be"),
    ("lora_B shape", lambda a: a.update(lora_B=a["lora_B"][:, :-1]), "lora_B must be"),
    ("lora_A dtype", lambda a: a.update(lora_A=a["lora_A"].float()), "lora_A must be"),
    ("1-D shape", lambda a: a.update(shape=[48 * 256]), "shape must be"),
    ("packed size", lambda a: a.update(shape=[48, 512]), "packed has"),
])
def test_bad_inputs(device, name, edit, message):
    a = sample_inputs(device, 48, 256, 16, torch.bfloat16)
    edit(a)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        OP(**a)
