"""Tile-ordered packed weights: the conversion against the reference's index formula, and every op that reads packed
bytes giving the same result from either order."""

from __future__ import annotations

import re

import pytest
import torch

import qlora
from qlora import reference

from conftest import cuda_only
from test_lora_linear import OP, assert_accurate, sample_inputs, tensor_core_runs, torch_baseline

# (N, K): one tile; several tiles and blocks; a last 64-row CTA of one tile (528 = 8·64 + 16); long rows.
SHAPES = [(16, 64), (48, 320), (528, 256), (32, 4160)]


def quantized(device, N, K, blocksize=64, quant_type="nf4", double_quant=True):
    w = torch.randn(N, K, device=device) * 0.05
    return qlora.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)


@pytest.mark.parametrize("N, K", SHAPES, ids=str)
def test_conversion_matches_reference(device, N, K):
    packed, qs = quantized(device, N, K)
    tiled = qlora.tile_order(packed, qs)
    assert tiled.shape == (N // 16, K // 64, 512) and tiled.dtype == torch.uint8
    assert torch.equal(tiled, reference.tile_order(packed, N, K))
    back = qlora.row_order(tiled)
    assert back.shape == packed.shape and torch.equal(back, packed)
    assert torch.equal(reference.row_order(tiled), packed)
    assert torch.equal(qlora.row_order(packed), packed) and qlora.row_order(packed).data_ptr() != packed.data_ptr()


def test_reference_order_by_hand():
    """Byte j of lane 4g + t, half h, is byte 4j + t of row 8h + g's 32-byte block row."""
    N, K = 16, 64
    packed = torch.arange(N * K // 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(-1, 1)
    tiled = reference.tile_order(packed, N, K).reshape(32, 2, 8)
    for lane in (0, 5, 31):
        for h in (0, 1):
            for j in (0, 3, 7):
                g, t = lane // 4, lane % 4
                assert tiled[lane, h, j] == packed[(8 * h + g) * 32 + 4 * j + t, 0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_reads_either_order(device, quant_type, double_quant, blocksize, dtype):
    N, K = 48, 320
    packed, qs = quantized(device, N, K, blocksize, quant_type, double_quant)
    qs = qlora.QuantState(qs.absmax, qs.shape, dtype, qs.blocksize, qs.quant_type, qs.absmax2, qs.code2, qs.offset)
    tiled = qlora.tile_order(packed, qs)
    assert torch.equal(qlora.dequantize_4bit(tiled, qs), qlora.dequantize_4bit(packed, qs))
    if dtype != torch.float32:
        lora_A = torch.randn(16, K, device=device).to(dtype)
        lora_B = torch.randn(N, 16, device=device).to(dtype)
        args = (qs.absmax, blocksize, quant_type, [N, K], dtype, lora_A, lora_B, 0.5, qs.absmax2, qs.code2, qs.offset)
        assert torch.equal(torch.ops.qlora.dequantize_4bit_lora(tiled, *args),
                           torch.ops.qlora.dequantize_4bit_lora(packed, *args))


def forced_paths(device, dtype, M):
    """Every implementation the arguments allow (CPU: the one)."""
    if device.type != "cuda":
        return [0]
    out = [2, 4, 5] + ([1, 3] if dtype != torch.float32 and M <= 64 else [])
    if tensor_core_runs(device) and dtype == torch.bfloat16:
        out += [6, 7]
    return out


@pytest.mark.parametrize("M", [1, 16, 17, 64, 255, 1100])
@pytest.mark.parametrize("N, K", [(528, 256), (32, 4160)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_lora_linear_reads_either_order(device, M, N, K, dtype):
    """Each path gives the same bits from the tile-ordered weight as from the row-major one; the automatic choice
    (the tensor-core GEMM from one token where it runs) is accurate."""
    if device.type == "cpu" and M > 255:
        pytest.skip("GPU-sized")
    a = sample_inputs(device, M, N, K, 16, dtype)
    tiled = {**a, "packed": torch.ops.qlora.tile_order_4bit(a["packed"], [N, K])}
    for path in forced_paths(device, dtype, M):
        assert torch.equal(OP(**tiled, path=path), OP(**a, path=path)), f"path {path}"
    assert_accurate(OP(**tiled), reference.lora_linear_4bit(**a), torch_baseline(a), dtype)


@cuda_only
@pytest.mark.parametrize("M, N, K, path", [
    (1, 4096, 4096, 6), (16, 4096, 1024, 6), (40, 520 + 8, 4096, 6), (100, 528, 4096, 6),  # split form, clusters
    (24, 16384, 320, 6), (64, 16384, 4160, 6),  # row form, stage pairs and step pipelining
    (300, 20480, 4160, 6), (300, 528, 4096, 7), (600, 4096, 1024, 7),  # stream-K, wide tiles split over clusters
])
def test_tensor_core_forms(M, N, K, path):
    """The tensor-core GEMM's forms (split and row form, token tiles, K split over clusters, stream-K) give the same
    bits from a tile-ordered weight as from the row-major one."""
    if not tensor_core_runs(torch.device("cuda")):
        pytest.skip("the tensor-core GEMM does not run here")
    a = sample_inputs("cuda", M, N, K, 16, torch.bfloat16)
    tiled = {**a, "packed": torch.ops.qlora.tile_order_4bit(a["packed"], [N, K])}
    y = OP(**tiled, path=path)
    assert torch.equal(y, OP(**a, path=path))
    assert torch.equal(y, OP(**tiled, path=path))


def test_gradients_from_either_order(device):
    a = sample_inputs(device, 7, 48, 320, 8, torch.float32)
    grads = []
    for packed in (a["packed"], torch.ops.qlora.tile_order_4bit(a["packed"], [48, 320])):
        x = a["x"].clone().requires_grad_()
        A, B = a["lora_A"].clone().requires_grad_(), a["lora_B"].clone().requires_grad_()
        OP(**{**a, "x": x, "packed": packed, "lora_A": A, "lora_B": B}).square().sum().backward()
        grads.append((x.grad, A.grad, B.grad))
    for g_row, g_tiled in zip(*grads):
        assert torch.equal(g_row, g_tiled)


@pytest.mark.parametrize("N, K", [(16, 64), (48, 320)], ids=str)
def test_opcheck(device, N, K):
    packed, qs = quantized(device, N, K)
    torch.library.opcheck(torch.ops.qlora.tile_order_4bit, (packed, [N, K]))
    torch.library.opcheck(torch.ops.qlora.row_order_4bit, (qlora.tile_order(packed, qs),))


@pytest.mark.parametrize("edit, message", [
    (lambda p, qs: qlora.tile_order(p, qlora.QuantState(qs.absmax, torch.Size([24, 128]), qs.dtype)),
     "tile order needs out_features % 16 == 0"),
    (lambda p, qs: qlora.tile_order(qlora.tile_order(p, qs), qs), "already in tile order"),
    (lambda p, qs: qlora.dequantize_4bit(qlora.tile_order(p, qs).reshape(1, 8, 512), qs),
     "tile-ordered weight [out_features / 16, in_features / 64, 512]"),
    (lambda p, qs: qlora.dequantize_4bit(p.reshape(4, 2, 512), qs), "tile-ordered weight"),
    (lambda p, qs: qlora.row_order(p.reshape(4, 4, 256)), "a 3-D packed weight is in tile order"),
])
def test_bad_inputs(edit, message):
    packed, qs = quantized("cpu", 32, 256)
    with pytest.raises(ValueError, match=re.escape(message)):
        edit(packed, qs)
