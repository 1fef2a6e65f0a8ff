"""quantize_4bit / double_quantize / dequantize_4bit: the kernels against the pure-PyTorch reference."""

from __future__ import annotations

import struct

import pytest
import torch

import qlora
from qlora import _C, codebook
from qlora import reference as ref

from conftest import CUDA, cuda_only, poison_, poisoned_allocator

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]


def sample_inputs(device):
    """(A, blocksize, quant_type) cases shared by the correctness and opcheck tests."""
    cases = []
    for dtype in DTYPES:
        for blocksize in codebook.BLOCKSIZES:
            for quant_type in QUANT_TYPES:
                cases.append((torch.randn(3 * blocksize + 17, dtype=dtype, device=device), blocksize, quant_type))
    for shape in [(1,), (3,), (17,), (1000,), (4, 33, 7), (129, 130)]:
        cases.append((torch.randn(shape, device=device, dtype=torch.bfloat16) * 3, 64, "nf4"))
    wide = torch.randn(64, 200, device=device, dtype=torch.float16)
    cases.append((wide[:, 5:150], 64, "nf4"))  # non-contiguous view
    cases.append((wide.t(), 128, "fp4"))
    return cases


def ids(cases):
    return [f"{tuple(a.shape)}-{str(a.dtype)[6:]}-{b}-{q}{'' if a.is_contiguous() else '-strided'}" for a, b, q in cases]


CPU_CASES = sample_inputs("cpu")


def on(device, case):
    """The CPU sample moved to `device`, so CPU and CUDA see the same numbers."""
    a, blocksize, quant_type = case
    return a.to(device), blocksize, quant_type


def assert_bits_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ---- one source of truth for the codebooks -----------------------------------------------------------

@pytest.mark.parametrize("name,table", [("nf4", codebook.NF4_VALUES), ("fp4", codebook.FP4_VALUES),
                                        ("nf4_thresholds", codebook.NF4_THRESHOLDS),
                                        ("fp4_thresholds", codebook.FP4_THRESHOLDS)])
def test_cpp_tables_equal_python_tables(name, table):
    bits = lambda values: [struct.pack("<f", v) for v in values]  # noqa: E731
    assert bits(_C.code_table(name)) == bits(table)


def test_thresholds_pick_the_nearest_code():
    for quant_type in QUANT_TYPES:
        values = codebook.code_values(quant_type)
        x = torch.linspace(-1, 1, 100_003)
        codes = ref.code_4bit(x, quant_type)
        err = (values[codes] - x).abs()
        best = (values[None, :] - x[:, None]).abs().min(dim=1).values
        assert torch.all(err <= best + 1e-6), quant_type


def test_dynamic_map_is_sorted_and_spans_the_range():
    for signed in (True, False):
        m = qlora.dynamic_map(signed)
        assert m.shape == (256,) and torch.all(m[1:] >= m[:-1])
        assert m[-1] == 1.0 and (0.0 in m.tolist()) and (m[0] < -0.99 if signed else m[0] == 0.0)


def test_dynamic_map_hands_out_a_tensor_of_its_own(device):
    for signed in (True, False):
        qlora.dynamic_map(signed, device=device).fill_(0.5)
        expected = torch.tensor(codebook._DYNAMIC_SIGNED if signed else codebook._DYNAMIC_UNSIGNED)
        assert torch.equal(qlora.dynamic_map(signed, device=device).cpu(), expected)


def test_dynamic_map_under_a_fake_tensor_mode_keeps_no_fake_code(device):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    codebook._DEVICE_MAPS.clear()  # so that the call under the mode is the first for this device
    with FakeTensorMode():
        assert isinstance(qlora.dynamic_map(device=device), FakeTensor)
    real = qlora.dynamic_map(device=device)
    assert not isinstance(real, FakeTensor)
    assert torch.equal(real.cpu(), torch.tensor(codebook._DYNAMIC_SIGNED))


@cuda_only
def test_quantize_4bit_queues_without_waiting_for_the_gpu():
    w = torch.randn(256, 256, device="cuda")
    qlora.quantize_4bit(w)  # first call: builds what is kept per device
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the call
    packed, qs = qlora.quantize_4bit(w)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "quantize_4bit waited for the work queued before it"
    assert torch.equal(qlora.dequantize_4bit(packed, qs), qlora.dequantize_4bit(*qlora.quantize_4bit(w)))


# ---- kernels against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("case", CPU_CASES, ids=ids(CPU_CASES))
def test_quantize_matches_reference(device, case):
    a, blocksize, quant_type = on(device, case)
    poisoned_allocator(a.numel() * 8, device)
    packed, absmax = torch.ops.qlora.quantize_4bit(a, blocksize, quant_type)
    expected_packed, expected_absmax = ref.quantize_4bit(a, blocksize, quant_type)
    assert packed.shape == ((a.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert_bits_equal(packed, expected_packed)
    assert_bits_equal(absmax, expected_absmax)


@pytest.mark.parametrize("case", CPU_CASES, ids=ids(CPU_CASES))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_dequantize_matches_reference(device, case, double_quant):
    a, blocksize, quant_type = on(device, case)
    packed, qs = qlora.quantize_4bit(a, blocksize, quant_type, double_quant=double_quant)
    poisoned_allocator(a.numel() * 8, device)
    out = qlora.dequantize_4bit(packed, qs)
    expected = ref.dequantize_4bit(packed, qs.absmax, blocksize, quant_type, a.shape, a.dtype, qs.absmax2, qs.code2,
                                   qs.offset)
    assert out.shape == a.shape and out.dtype == a.dtype
    assert_bits_equal(out, expected)


def more_blocks_than_one_grid_pass(device) -> int:
    """On the GPU, twice the blocks of 256 that double_quantize_kernel's grid takes at once (4 CTAs an SM, 8 warps a
    CTA, a block a warp), plus a partial block; on the CPU, a size of the same order."""
    if torch.device(device).type != "cuda":
        return 1_200_001
    return torch.cuda.get_device_properties(device).multi_processor_count * 64 * 256 + 1


# On the GPU the dynamic code is searched by table where its grid strides ("strided": more blocks than one pass),
# the smaller sizes take the binary search. The linear code has a midpoint at 0, which the table cannot carry, so
# it takes the binary search at every size.
@pytest.mark.parametrize("code_name", ["dynamic", "linear"])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 5000, 70_001, "strided"])
def test_double_quantize_matches_reference(device, n, code_name):
    if n == "strided":
        n = more_blocks_than_one_grid_pass(device)
    absmax = (torch.rand(n) * 3 + 0.01).to(device)
    code = qlora.dynamic_map(device=device) if code_name == "dynamic" else torch.linspace(-1, 1, 256, device=device)
    q, absmax2, offset = torch.ops.qlora.double_quantize(absmax, code)
    eq, eabsmax2, eoffset = ref.double_quantize(absmax, code)
    assert_bits_equal(offset, eoffset)
    assert_bits_equal(absmax2, eabsmax2)
    assert_bits_equal(q, eq)
    restored = ref.dequantize_absmax(q, absmax2, code, offset)
    assert (restored - absmax).abs().max() <= absmax2.max() * 0.05  # 8-bit dynamic code: a few % of the block scale


@cuda_only
@pytest.mark.parametrize("case", CPU_CASES, ids=ids(CPU_CASES))
def test_cpu_and_cuda_give_identical_bits(case):
    a, blocksize, quant_type = case
    cpu_packed, cpu_qs = qlora.quantize_4bit(a, blocksize, quant_type)
    gpu_packed, gpu_qs = qlora.quantize_4bit(a.cuda(), blocksize, quant_type)
    assert_bits_equal(gpu_packed.cpu(), cpu_packed)
    for name in ("absmax", "absmax2", "offset"):
        assert_bits_equal(getattr(gpu_qs, name).cpu(), getattr(cpu_qs, name))
    assert_bits_equal(qlora.dequantize_4bit(gpu_packed, gpu_qs).cpu(), qlora.dequantize_4bit(cpu_packed, cpu_qs))


def test_codes_at_and_around_every_threshold(device):
    """Values exactly on a decision threshold go to the lower code; one ulp above, to the upper one."""
    for quant_type, thresholds in [("nf4", codebook.NF4_THRESHOLDS), ("fp4", codebook.FP4_THRESHOLDS)]:
        t = torch.tensor(thresholds)
        probes = torch.cat([t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))])
        if quant_type == "fp4":
            probes = torch.cat([probes, -probes])
        block = torch.cat([torch.tensor([1.0]), probes])  # absmax 1: scaled values equal the probes
        block = torch.nn.functional.pad(block, (0, (-block.numel()) % 64)).to(device)
        packed, _ = torch.ops.qlora.quantize_4bit(block, 64, quant_type)
        assert_bits_equal(packed.cpu(), ref.quantize_4bit(block.cpu(), 64, quant_type)[0])


# ---- statistics --------------------------------------------------------------------------------------

def test_nf4_round_trip_error_matches_known_values(device):
    x = torch.randn(1024, 1024, device=device)
    packed, qs = qlora.quantize_4bit(x, 64, "nf4", double_quant=True)
    err = qlora.dequantize_4bit(packed, qs) - x
    mae = err.abs().mean().item()
    rel = (err.norm() / x.norm()).item()
    assert 0.070 < mae < 0.076, mae  # NF4 at blocksize 64: about 0.073 on N(0, 1)
    assert 0.088 < rel < 0.096, rel  # relative Frobenius error: about 0.092


@pytest.mark.parametrize("blocksize,lo,hi", [(32, 0.060, 0.070), (256, 0.078, 0.090), (4096, 0.088, 0.105)])
def test_error_grows_with_blocksize(device, blocksize, lo, hi):
    x = torch.randn(512, 1024, device=device)
    packed, qs = qlora.quantize_4bit(x, blocksize, "nf4", double_quant=False)
    mae = (qlora.dequantize_4bit(packed, qs) - x).abs().mean().item()
    assert lo < mae < hi, mae


# ---- special values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_zero_blocks_dequantize_to_exact_zeros(device, double_quant):
    x = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    x[2] = 0
    x[5] = 0
    packed, qs = qlora.quantize_4bit(x, 64, "nf4", double_quant=double_quant)
    y = qlora.dequantize_4bit(packed, qs)
    assert torch.all(y[2] == 0) and torch.all(y[5] == 0)
    assert torch.isfinite(y).all()
    assert torch.all(qlora.dequantize_4bit(*qlora.quantize_4bit(torch.zeros(100, device=device))) == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_poison_their_block(device, bad):
    x = torch.randn(4, 64, device=device)
    x[1, 10] = bad
    packed, qs = qlora.quantize_4bit(x, 64, "nf4", double_quant=False)
    y = qlora.dequantize_4bit(packed, qs)
    assert not torch.isfinite(y[1]).any()  # the whole block is non-finite, never silently finite
    assert torch.isfinite(y[[0, 2, 3]]).all()
    # With double quantization the mean of the absmax is non-finite, and so is every block.
    packed, qs = qlora.quantize_4bit(x, 64, "nf4", double_quant=True)
    assert not torch.isfinite(qlora.dequantize_4bit(packed, qs)).any()


def test_subnormal_blocks_match_reference(device):
    """A block whose absmax is so small that 1/absmax overflows takes the general code search."""
    x = torch.randn(4, 64) * 1e-39
    x[1] = torch.randn(64)  # an ordinary block beside them
    x[2, 7] = 0.0
    for quant_type in QUANT_TYPES:
        packed, absmax = torch.ops.qlora.quantize_4bit(x.to(device), 64, quant_type)
        expected_packed, expected_absmax = ref.quantize_4bit(x, 64, quant_type)
        assert_bits_equal(packed.cpu(), expected_packed)
        assert_bits_equal(absmax.cpu(), expected_absmax)


# ---- large tensors -----------------------------------------------------------------------------------

@cuda_only
def test_more_than_2_pow_31_elements():
    n = 2**31 + 3 * 64 + 17
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GB of free GPU memory")
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    tail = 64 * 10_000 + 3 * 64 + 17
    x[:-tail].fill_(0.5)
    x[-tail:] = torch.randn(tail, device="cuda", dtype=torch.bfloat16)
    packed, absmax = torch.ops.qlora.quantize_4bit(x, 64, "nf4")
    assert packed.numel() == (n + 1) // 2 and absmax.numel() == (n + 63) // 64
    ep, ea = ref.quantize_4bit(x[-tail:].cpu(), 64, "nf4")
    assert_bits_equal(packed[-ep.numel():].cpu(), ep)
    assert_bits_equal(absmax[-ea.numel():].cpu(), ea)
    assert torch.all(absmax[:1000] == 0.5)
    y = torch.ops.qlora.dequantize_4bit(packed, absmax, 64, "nf4", [n], torch.bfloat16)
    assert_bits_equal(y[-tail:].cpu(), ref.dequantize_4bit(ep, ea, 64, "nf4", [tail], torch.bfloat16))
    assert torch.all(y[:-tail] == 0.5)


# ---- torch.library integration ---------------------------------------------------------------------

OPCHECK_CASES = [c for c in CPU_CASES if c[1] in (64, 4096) or c[0].dim() != 1]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=ids(OPCHECK_CASES))
def test_opcheck(device, case):
    a, blocksize, quant_type = on(device, case)
    torch.library.opcheck(torch.ops.qlora.quantize_4bit.default, (a, blocksize, quant_type))
    packed, absmax = torch.ops.qlora.quantize_4bit(a, blocksize, quant_type)
    code = qlora.dynamic_map(device=device)
    torch.library.opcheck(torch.ops.qlora.double_quantize.default, (absmax, code))
    q, absmax2, offset = torch.ops.qlora.double_quantize(absmax, code)
    args = (packed, absmax, blocksize, quant_type, list(a.shape), a.dtype)
    torch.library.opcheck(torch.ops.qlora.dequantize_4bit.default, args)
    torch.library.opcheck(torch.ops.qlora.dequantize_4bit.default, (packed, q, blocksize, quant_type, list(a.shape),
                                                                     a.dtype, absmax2, code, offset))


def test_torch_compile_fullgraph(device):
    def round_trip(w):
        packed, qs = qlora.quantize_4bit(w, 64, "nf4", double_quant=True)
        return qlora.dequantize_4bit(packed, qs)

    w = torch.randn(128, 96, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(round_trip, fullgraph=True)
    assert_bits_equal(compiled(w), round_trip(w))


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_inputs_are_refused_with_a_clear_message(device):
    w = torch.randn(64, 64, device=device)
    packed, qs = qlora.quantize_4bit(w, 64, "nf4", double_quant=False)
    dq_packed, dq = qlora.quantize_4bit(w, 64, "nf4", double_quant=True)
    Q, D = torch.ops.qlora.quantize_4bit, torch.ops.qlora.dequantize_4bit
    cases = [
        (lambda: Q(w.int(), 64, "nf4"), TypeError, "A must be float32, float16 or bfloat16"),
        (lambda: Q(w, 48, "nf4"), ValueError, "blocksize must be one of"),
        (lambda: Q(w, 64, "int4"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
        (lambda: D(packed[:-1], qs.absmax, 64, "nf4", [64, 64], torch.float32), ValueError, "packed has 2047 elements"),
        (lambda: D(packed, qs.absmax[:-1], 64, "nf4", [64, 64], torch.float32), ValueError, "absmax has 63 elements"),
        (lambda: D(packed, qs.absmax, 64, "nf4", [64, 64], torch.int32), TypeError, "dtype must be float32"),
        (lambda: D(packed.float(), qs.absmax, 64, "nf4", [64, 64], torch.float32), TypeError, "packed must be Byte"),
        (lambda: D(packed, qs.absmax.double(), 64, "nf4", [64, 64], torch.float32), TypeError, "absmax must be Float"),
        (lambda: D(dq_packed, dq.absmax, 64, "nf4", [64, 64], torch.float32), ValueError, "needs absmax2, code2 and offset"),
        (lambda: D(dq_packed, dq.absmax, 64, "nf4", [64, 64], torch.float32, dq.absmax2, dq.code2[:100], dq.offset),
         ValueError, "code2 has 100 elements"),
        (lambda: D(packed, qs.absmax, 64, "nf4", [64, -64], torch.float32), ValueError, "negative"),
        (lambda: torch.ops.qlora.double_quantize(qs.absmax, dq.code2[:3]), ValueError, "code has 3 elements"),
        (lambda: qlora.quantize_4bit(w, blocksize=100), ValueError, "blocksize must be one of"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(")):
            call()


@cuda_only
def test_device_mismatch_is_refused():
    w = torch.randn(64, 64, device="cuda")
    packed, qs = qlora.quantize_4bit(w, 64, "nf4", double_quant=False)
    with pytest.raises(RuntimeError, match="absmax is on cpu but packed is on cuda"):
        torch.ops.qlora.dequantize_4bit(packed, qs.absmax.cpu(), 64, "nf4", [64, 64], torch.float32)


# ---- QuantState and bitsandbytes' serialized form -----------------------------------------------------

@pytest.mark.parametrize("packed_form", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quant_state_dict_round_trip(packed_form, double_quant):
    w = torch.randn(100, 70, dtype=torch.bfloat16)
    packed, qs = qlora.quantize_4bit(w, 128, "fp4", double_quant=double_quant)
    d = qs.as_dict(packed=packed_form)
    if packed_form:
        assert set(d) >= {"absmax", "quant_map", "quant_state.bitsandbytes__fp4"}
        assert all(isinstance(v, torch.Tensor) for v in d.values())
        d = {f"weight.{k}": v for k, v in d.items()}  # as a Linear4bit state dict holds them
    back = qlora.QuantState.from_dict(d)
    assert back.shape == qs.shape and back.dtype == qs.dtype and back.blocksize == 128 and back.quant_type == "fp4"
    assert_bits_equal(qlora.dequantize_4bit(packed, back), qlora.dequantize_4bit(packed, qs))


def test_quant_state_refuses_foreign_codebooks():
    _, qs = qlora.quantize_4bit(torch.randn(64, 64))
    d = qs.as_dict()
    d["quant_map"] = d["quant_map"] * 0.5
    with pytest.raises(ValueError, match="quant_map is not the standard nf4 codebook"):
        qlora.QuantState.from_dict(d)
    with pytest.raises(ValueError, match="missing"):
        qlora.QuantState.from_dict({"absmax": qs.absmax})


def test_cpu_kernels_run_on_torchs_threads():
    """ATen's OpenMP backend is header code compiled into the library: built without OpenMP, every CPU kernel ran
    on one thread (a 2048x2048 quantize took 35 ms on two cores either way; with OpenMP, 18 ms on two)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch was built without OpenMP")
    assert _C.openmp()


def test_cpu_results_do_not_depend_on_the_thread_count():
    A = torch.randn(3000, 1000)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            packed, qs = qlora.quantize_4bit(A)
            outs.append((packed, qs.absmax, qs.absmax2, qs.offset, qlora.dequantize_4bit(packed, qs)))
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*outs):
        assert torch.equal(one, many)
