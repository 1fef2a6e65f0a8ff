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


@pytest.mark.parametrize("N, K", SHAPES, ids=str)
@pytest.mark.parametrize("r, scale", [(8, 0.5), (16, 2.0), (16, 0.3), (40, 0.7), (64, 1.0)])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("fmt", [("nf4", True), ("fp4", False)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dequantize_lora_reads_either_order(device, N, K, r, scale, blocksize, fmt, dtype):
    """The merged weight from tile order equals the one from row-major bytes, bit for bit, for every rank chunking,
    scale kind (a power of two or not) and scale format."""
    quant_type, double_quant = fmt
    packed, qs = quantized(device, N, K, blocksize, quant_type, double_quant)
    tiled = qlora.tile_order(packed, qs)
    lora_A = (torch.randn(r, K, device=device) * 0.1).to(dtype)
    lora_B = (torch.randn(N, r, device=device) * 0.1).to(dtype)
    args = (qs.absmax, blocksize, quant_type, [N, K], dtype, lora_A, lora_B, scale, qs.absmax2, qs.code2, qs.offset)
    assert torch.equal(torch.ops.qlora.dequantize_4bit_lora(tiled, *args),
                       torch.ops.qlora.dequantize_4bit_lora(packed, *args))


@cuda_only
@pytest.mark.parametrize("blocksize, converts", [(64, False), (256, False), (32, True)])
def test_dequantize_lora_reads_tile_order_without_a_copy(blocksize, converts):
    """From blocksize 64 up the merging kernel reads tile order itself; at 32 a lane's 16 weights of a row span two
    quantization blocks, so the op merges from a row-major copy."""
    N, K = 256, 1024
    packed, qs = quantized("cuda", N, K, blocksize)
    tiled = qlora.tile_order(packed, qs)
    lora_A = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
    lora_B = torch.randn(N, 16, device="cuda", dtype=torch.bfloat16)
    args = (qs.absmax, blocksize, "nf4", [N, K], torch.bfloat16, lora_A, lora_B, 2.0, qs.absmax2, qs.code2, qs.offset)
    names = launched_kernels(lambda: torch.ops.qlora.dequantize_4bit_lora(tiled, *args))
    assert any("dequantize_lora_kernel" in n for n in names), names
    copies = [n for n in names if "elementwise" in n or "copy" in n.lower()]
    assert bool(copies) == converts, names


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


def tiled_inputs(M, N, K, r=16, dtype=torch.bfloat16, **kw):
    a = sample_inputs("cuda", M, N, K, r, dtype, **kw)
    return a, {**a, "packed": torch.ops.qlora.tile_order_4bit(a["packed"], [N, K])}


# (N, K): one K split with idle warps in the last CTA (141 tiles, 2 warps a CTA); K splits and the split-K epilogue;
# K splits over many CTAs, a CTA of one busy warp among four.
TILED_SHAPES = [(2256, 256), (64, 2048), (2064, 1024)]


@cuda_only
@pytest.mark.parametrize("M", [1, 2, 3, 7, 8])
@pytest.mark.parametrize("N, K", TILED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tiled_gemv(M, N, K, dtype):
    """The small-M GEMV for tile-ordered weights (path 8) against the fp32 reference, the same bits on every call."""
    a, tiled = tiled_inputs(M, N, K, dtype=dtype)
    y = OP(**tiled, path=8)
    assert_accurate(y, reference.lora_linear_4bit(**a), torch_baseline(a), dtype)
    assert torch.equal(y, OP(**tiled, path=8))


@cuda_only
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("fp4", True), ("fp4", False)])
@pytest.mark.parametrize("N, K", [(2256, 256), (64, 2048)], ids=str)
def test_tiled_gemv_formats(quant_type, double_quant, N, K):
    a, tiled = tiled_inputs(3, N, K, quant_type=quant_type, double_quant=double_quant)
    assert_accurate(OP(**tiled, path=8), reference.lora_linear_4bit(**a), torch_baseline(a), torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("lora, bias, x_lora, r", [(False, False, False, 16), (False, True, False, 16),
                                                   (True, False, True, 16), (True, True, False, 64),
                                                   (True, True, False, 8)])
@pytest.mark.parametrize("N, K", [(2256, 256), (64, 2048)], ids=str)
def test_tiled_gemv_optional_parts(lora, bias, x_lora, r, N, K):
    a, tiled = tiled_inputs(5, N, K, r, lora=lora, bias=bias, x_lora=x_lora)
    assert_accurate(OP(**tiled, path=8), reference.lora_linear_4bit(**a), torch_baseline(a), torch.bfloat16)


@cuda_only
def test_tiled_gemv_3d_input_and_graph_capture():
    """A 3-D x, and the forward replayed in a CUDA graph with an eager call's results."""
    a, tiled = tiled_inputs(0, 2064, 1024, x_shape=(2, 3))
    eager = OP(**tiled, path=8)
    assert eager.shape == (2, 3, 2064)
    assert_accurate(eager, reference.lora_linear_4bit(**a), torch_baseline(a), torch.bfloat16)
    static_x = tiled["x"].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OP(**{**tiled, "x": static_x}, path=8)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(**{**tiled, "x": static_x}, path=8)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, OP(**{**tiled, "x": static_x}, path=8))
    static_x.copy_(tiled["x"])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def launched_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@cuda_only
@pytest.mark.parametrize("N, K, M, tiled_expected", [(8192, 16384, 1, True), (8192, 16384, 8, True),
                                                     (8192, 16384, 9, False), (8192, 8192, 1, True),
                                                     (12288, 4096, 2, True), (4096, 8192, 2, True),
                                                     (4096, 14336, 8, True), (5120, 5120, 1, True),
                                                     (6144, 4096, 8, True), (4096, 4096, 1, False),
                                                     (4096, 11008, 1, False), (5120, 11008, 1, False)])
def test_automatic_choice_of_the_tiled_gemv(N, K, M, tiled_expected):
    """The automatic choice takes the tiled GEMV for a tile-ordered weight, up to 8 rows, of at least 2^27 elements; and,
    where the tiled GEMV streams with at least 6 warps an SM, of at least 2^25 elements or where the tensor-core GEMM's
    launch is not one full wave (on a 132-SM H200: 8192², 4096x8192, 4096x14336, 5120² and 6144x4096; not 4096², one
    GEMM wave of 2^24 elements, nor 4096x11008 and 5120x11008, whose 43 groups of K leave the tiled GEMV one split of
    256 and 321 warps)."""
    _, tiled = tiled_inputs(M, N, K)
    names = launched_kernels(lambda: OP(**tiled))
    assert any("lora_gemv_tiled_kernel" in n for n in names) == tiled_expected, names


@cuda_only
@pytest.mark.parametrize("tile, M, K, blocksize, dtype, message", [
    (False, 1, 256, 64, torch.bfloat16, "packed must be in tile order"),
    (True, 9, 256, 64, torch.bfloat16, "x must have 1 to 8 rows"),
    (True, 1, 256, 128, torch.bfloat16, "blocksize must be 64"),
    (True, 1, 320, 64, torch.bfloat16, "in_features (K) of 256"),
    (True, 1, 256, 64, torch.float32, "x must be float16 or bfloat16"),
])
def test_tiled_gemv_refuses(tile, M, K, blocksize, dtype, message):
    a, tiled = tiled_inputs(M, 64, K, dtype=dtype, blocksize=blocksize)
    with pytest.raises(ValueError, match=re.escape(message)):
        OP(**(tiled if tile else a), path=8)


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
