"""Fused AdamW: the ops against the pure-PyTorch reference (bit for bit), the optimizers against
torch.optim.AdamW, 8-bit states against 32-bit ones, checkpoints, bad inputs, opcheck."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import pytest
import torch

import qlora
from qlora import reference
from qlora.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit

from conftest import CUDA, cuda_only

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(1,), (3,), (17,), (1000,), (37, 5), (4097,), (3, 256)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
CLASSES = [AdamW, PagedAdamW, AdamW8bit, PagedAdamW8bit]


def _blocks(n):
    return -(-n // 256)


def _adamw_32bit_inputs(device, dtype, sizes=SIZES, step=3.0, nonfinite=False):
    params = [torch.randn(s, device=device).to(dtype) for s in sizes]
    grads = [torch.randn(s, device=device).to(dtype) for s in sizes]
    if nonfinite:
        for g in grads:
            g.view(-1)[:: 7] = float("nan")
            g.view(-1)[3:: 11] = float("inf")
    exp_avgs = [torch.randn(s, device=device) * 0.1 for s in sizes]
    exp_avg_sqs = [torch.rand(s, device=device) * 0.01 for s in sizes]
    steps = [torch.tensor(step + i, device=device) for i in range(len(sizes))]
    return [params, grads, exp_avgs, exp_avg_sqs, steps]


def _state_8bit(sizes, device):
    """8-bit states taken from a couple of real steps, so that codes and absmax are not trivial."""
    code1, code2 = qlora.dynamic_map(True, device=device), qlora.dynamic_map(False, device=device)
    state1 = [torch.zeros(s, dtype=torch.uint8, device=device) for s in sizes]
    state2 = [torch.zeros(s, dtype=torch.uint8, device=device) for s in sizes]
    absmax1 = [torch.zeros(_blocks(torch.Size(s).numel()), device=device) for s in sizes]
    absmax2 = [torch.zeros(_blocks(torch.Size(s).numel()), device=device) for s in sizes]
    params = [torch.randn(s, device=device) for s in sizes]
    for k in (1, 2):
        grads = [torch.randn(s, device=device) for s in sizes]
        steps = [torch.tensor(float(k), device=device) for _ in sizes]
        reference.adamw_8bit_blockwise(params, grads, state1, state2, absmax1, absmax2, code1, code2, steps, **HYPER)
    return state1, state2, absmax1, absmax2, code1, code2


def _adamw_8bit_inputs(device, dtype, sizes=SIZES, nonfinite=False):
    params, grads, _, _, steps = _adamw_32bit_inputs(device, dtype, sizes, nonfinite=nonfinite)
    state1, state2, absmax1, absmax2, code1, code2 = _state_8bit(sizes, device)
    return [params, grads, state1, state2, absmax1, absmax2, code1, code2, steps]


def sample_inputs(op: str, device):
    """(args, kwargs) for every op variant worth checking: each dtype, odd sizes, a tensor lr."""
    make = _adamw_32bit_inputs if op == "adamw_32bit" else _adamw_8bit_inputs
    out = []
    for dtype in DTYPES:
        out.append((make(device, dtype), dict(HYPER)))
    args = make(device, torch.float32)
    out.append((args, dict(HYPER, lr=0.0, lr_tensor=torch.tensor(3e-3, device=device))))
    out.append((make(device, torch.bfloat16, nonfinite=True), dict(HYPER, weight_decay=0.0)))
    out.append((make(device, torch.float32, sizes=[(0,), (5,)]), dict(HYPER)))
    return out


def _clone(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args]


def _assert_bits_equal(actual, expected):
    for a, e in zip(actual, expected):
        if isinstance(a, list):
            _assert_bits_equal(a, e)
        else:
            assert a.dtype == e.dtype and a.shape == e.shape
            assert torch.equal(a, e) or torch.equal(a.view(torch.uint8), e.view(torch.uint8)), \
                f"max difference {(a.float() - e.float()).abs().max().item()}"


# ---- the ops against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("op", ["adamw_32bit", "adamw_8bit_blockwise"])
def test_op_matches_reference_bit_for_bit(op, device):
    for args, kwargs in sample_inputs(op, device):
        expected = _clone(args)
        getattr(torch.ops.qlora, op)(*args, **kwargs)
        getattr(reference, op)(*expected, **kwargs)
        _assert_bits_equal(args, expected)


@pytest.mark.parametrize("op", ["adamw_32bit", "adamw_8bit_blockwise"])
def test_nonfinite_gradients_leave_their_elements_alone(op, device):
    make = _adamw_32bit_inputs if op == "adamw_32bit" else _adamw_8bit_inputs
    args = make(device, torch.float32, sizes=[(4096,)], nonfinite=True)
    before = _clone(args)
    getattr(torch.ops.qlora, op)(*args, **HYPER)
    params, grads = args[0], args[1]
    bad = ~torch.isfinite(grads[0])
    assert bad.any() and (~bad).any()
    assert torch.equal(params[0][bad], before[0][0][bad]), "a parameter with a non-finite gradient changed"
    assert (params[0][~bad] != before[0][0][~bad]).float().mean() > 0.99, "finite elements did not update"
    for state in args[2:]:
        if isinstance(state, list):
            assert all(torch.isfinite(s.float()).all() for s in state)
    if op == "adamw_32bit":
        for new, old in ((args[2], before[2]), (args[3], before[3])):
            assert torch.equal(new[0][bad], old[0][bad])


@pytest.mark.parametrize("codes", ["scaled", "linear"])
def test_8bit_op_with_other_codes_matches_reference(codes, device):
    # The kernels search codes through a table built from them; scaled dynamic codes still fit it, while a
    # linear signed code (a midpoint at zero) does not and keeps the binary search. Both must agree with it.
    signed, unsigned = qlora.dynamic_map(True, device=device), qlora.dynamic_map(False, device=device)
    if codes == "scaled":
        code1, code2 = signed * 0.75, unsigned * 0.75
    else:
        code1, code2 = torch.linspace(-1, 1, 256, device=device), torch.linspace(0, 1, 256, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        args = _adamw_8bit_inputs(device, dtype, nonfinite=dtype == torch.bfloat16)
        args[6], args[7] = code1, code2
        expected = _clone(args)
        torch.ops.qlora.adamw_8bit_blockwise(*args, **HYPER)
        reference.adamw_8bit_blockwise(*expected, **HYPER)
        _assert_bits_equal(args, expected)


def test_8bit_op_with_special_states_matches_reference(device):
    # NaN, infinite and vanishing moments send NaN, infinite and zero scaled values to the code search.
    args = _adamw_8bit_inputs(device, torch.float32, sizes=[(1280,)])
    grads, absmax1, absmax2 = args[1][0], args[4][0], args[5][0]
    absmax1[0] = float("nan")               # every first moment of block 0 decodes to NaN
    absmax2[1] = float("inf")               # second moments of block 1: inf, or NaN for code 0
    grads[512:768] = 0.0                    # block 2: moments so small that 1 / absmax overflows
    absmax1[2], absmax2[2] = 1e-39, 1e-39
    grads[768:1024:3] = 1e30                # block 3: g * g overflows
    expected = _clone(args)
    torch.ops.qlora.adamw_8bit_blockwise(*args, **HYPER)
    reference.adamw_8bit_blockwise(*expected, **HYPER)
    _assert_bits_equal(args, expected)


def test_dynamic_codes_of_the_cpp_tests_are_the_dynamic_map():
    # csrc/tests/test_code_8bit_table.cpp proves the table search exact on these copies of the codes.
    text = (Path(__file__).resolve().parents[1] / "csrc" / "tests" / "dynamic_codes.h").read_text()
    tables = dict(re.findall(r"constexpr float (\w+)\[256\] = \{(.*?)\};", text, flags=re.S))
    for name, signed in (("kDynamicSigned", True), ("kDynamicUnsigned", False)):
        values = [float.fromhex(v.strip().rstrip("f")) for v in tables[name].split(",") if v.strip()]
        assert torch.equal(torch.tensor(values), qlora.dynamic_map(signed)), name


def test_many_tensors_in_one_call(device):
    # Sizes straddle the 2048-element work units and 256-element blocks of the CUDA kernels, with empty
    # tensors and a misaligned view among them, so that the walk over the descriptor array is exercised.
    sizes = [(n,) for n in (0, 1, 255, 256, 257, 2047, 2048, 2049, 0, 6000, 31, 70000)] * 3
    args = _adamw_32bit_inputs(device, torch.float32, sizes=sizes)
    base = torch.randn(1001, device=device)
    args[0].append(base[1:])        # 4-byte aligned only: takes the scalar path
    args[1].append(torch.randn(1000, device=device))
    args[2].append(torch.zeros(1000, device=device))
    args[3].append(torch.zeros(1000, device=device))
    args[4].append(torch.tensor(1.0, device=device))
    expected = _clone(args)
    expected[0][-1] = base[1:].clone()
    torch.ops.qlora.adamw_32bit(*args, **HYPER)
    reference.adamw_32bit(*expected, **HYPER)
    _assert_bits_equal(args, expected)

    args = _adamw_8bit_inputs(device, torch.bfloat16, sizes=sizes)
    expected = _clone(args)
    torch.ops.qlora.adamw_8bit_blockwise(*args, **HYPER)
    reference.adamw_8bit_blockwise(*expected, **HYPER)
    _assert_bits_equal(args, expected)


@cuda_only
@pytest.mark.parametrize("op", ["adamw_32bit", "adamw_8bit_blockwise"])
def test_cpu_and_cuda_agree_bit_for_bit(op):
    for args, kwargs in sample_inputs(op, "cpu"):
        gpu_args = [[t.cuda() for t in a] if isinstance(a, list) else a.cuda() for a in args]
        gpu_kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        getattr(torch.ops.qlora, op)(*args, **kwargs)
        getattr(torch.ops.qlora, op)(*gpu_args, **gpu_kwargs)
        _assert_bits_equal([[t.cpu() for t in a] if isinstance(a, list) else a.cpu() for a in gpu_args], args)


@pytest.mark.parametrize("op", ["adamw_32bit", "adamw_8bit_blockwise"])
def test_opcheck(op, device):
    for args, kwargs in sample_inputs(op, device):
        torch.library.opcheck(getattr(torch.ops.qlora, op).default, args, kwargs)


# ---- the optimizers against torch.optim.AdamW ------------------------------------------------------------

def _model(device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 33), (33,), (5000,), (7, 3, 11)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]


def _grads(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) * scale for p in params]


@pytest.mark.parametrize("cls", [AdamW, PagedAdamW])
def test_matches_torch_adamw_over_25_steps(cls, device):
    ours, theirs = _model(device), _model(device)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1}]  # noqa: E731
    opt = cls(groups(ours), lr=1e-2, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.02)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=5, gamma=0.5)
    for step in range(25):
        for p, q, g in zip(ours, theirs, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(opt.state[p]["step"]) == 25


def test_tensor_lr_follows_a_scheduler(device):
    ours, theirs = _model(device), _model(device)
    opt = AdamW(ours, lr=torch.tensor(1e-2, device=device))
    ref = AdamW(theirs, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (opt, ref)]
    for step in range(6):
        for p, q, g in zip(ours, theirs, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_params_keep_float32_states(dtype, device):
    params = _model(device, dtype)
    opt = AdamW(params, lr=1e-3)
    expected = [p.detach().clone() for p in params]
    m = [torch.zeros(p.shape, device=device) for p in params]
    v = [torch.zeros(p.shape, device=device) for p in params]
    for step in range(1, 4):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        reference.adamw_32bit(expected, grads, m, v, [torch.tensor(float(step))] * len(params), lr=1e-3, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=1e-2)
    for p, e, mm in zip(params, expected, m):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach(), e)
        assert torch.equal(opt.state[p]["exp_avg"], mm)


# ---- 8-bit states against 32-bit ones (bitsandbytes' test protocol and bounds) --------------------------

def _decode(code, codes, absmax):
    """8-bit blockwise states to float32: code value times the block's absmax."""
    return (code[codes.long()].view(-1) * absmax.repeat_interleave(256)[: codes.numel()]).view(codes.shape)


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_stays_close_to_32bit_over_50_steps(cls, dtype, device):
    p32 = torch.nn.Parameter((torch.randn(1000, 257, device=device) * 0.1).to(dtype).float())
    p8 = torch.nn.Parameter(p32.detach().to(dtype))
    ref = torch.optim.AdamW([p32], lr=1e-3, weight_decay=0.0)
    opt = cls([p8], lr=1e-3, weight_decay=0.0)
    code1, code2 = qlora.dynamic_map(True, device=device), qlora.dynamic_map(False, device=device)
    err_bound, rel_bound = (6e-5, 6e-4) if dtype == torch.float32 else (1.7e-4, 1.6e-3)
    for _ in range(50):
        g = torch.randn(p32.shape, device=device).to(dtype) * 0.01
        p32.grad, p8.grad = g.float(), g.clone()
        ref.step()
        opt.step()
        state = opt.state[p8]
        assert state["state1"].dtype == torch.uint8
        m = _decode(code1, state["state1"], state["absmax1"])
        v = _decode(code2, state["state2"], state["absmax2"])
        for ours, theirs in ((m, ref.state[p32]["exp_avg"]), (v, ref.state[p32]["exp_avg_sq"])):
            assert (~torch.isclose(theirs, ours, atol=3e-3, rtol=1e-3)).sum().item() < 20
        err = (p32.detach() - p8.detach().float()).abs()
        assert err.mean() < err_bound
        assert (err / (p32.detach().abs() + 1e-9)).mean() < rel_bound
        # Keep the two runs together so that each step's error is measured, not its accumulation.
        with torch.no_grad():
            p32.copy_(p32.to(dtype).float())
            p8.copy_(p32)
            ref.state[p32]["exp_avg"].copy_(m)
            ref.state[p32]["exp_avg_sq"].copy_(v)


def test_8bit_small_tensors_keep_32bit_states(device):
    small, big = torch.nn.Parameter(torch.randn(100, device=device)), torch.nn.Parameter(torch.randn(5000, device=device))
    opt = AdamW8bit([small, big], min_8bit_size=4096)
    small.grad, big.grad = torch.randn_like(small), torch.randn_like(big)
    opt.step()
    assert opt.state[small]["state1"].dtype == torch.float32 and "absmax1" not in opt.state[small]
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[big]["absmax1"].numel() == _blocks(5000)


# ---- checkpoints ----------------------------------------------------------------------------------------

def _train(opt, params, steps, first_seed):
    for step in range(first_seed, first_seed + steps):
        for p, g in zip(params, _grads(params, step, scale=0.1)):
            p.grad = g
        opt.step()


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("saver, loader", [(AdamW, AdamW), (AdamW, PagedAdamW), (PagedAdamW, AdamW),
                                           (AdamW8bit, AdamW8bit), (AdamW8bit, PagedAdamW8bit),
                                           (PagedAdamW8bit, AdamW8bit), (PagedAdamW, PagedAdamW)])
def test_state_dict_round_trip_resumes_bit_identically(saver, loader, device):
    params = _model(device)
    opt = saver(params, lr=1e-2, weight_decay=0.05)
    _train(opt, params, 3, 0)
    checkpoint = _roundtrip(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    _train(opt, params, 3, 3)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = loader(resumed, lr=123.0)  # hyperparameters come from the checkpoint
    opt2.load_state_dict(checkpoint)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.05
    _train(opt2, resumed, 3, 3)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key
            assert opt2.state[q][key].device == q.device


def test_8bit_checkpoint_loads_into_32bit_optimizer_by_decoding(device):
    params = _model(device)
    opt = AdamW8bit(params)
    _train(opt, params, 2, 0)
    opt32 = AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    opt32.load_state_dict(_roundtrip(opt.state_dict()))
    big = params[2]
    state = opt32.state[opt32.param_groups[0]["params"][2]]
    code1, code2 = qlora.dynamic_map(True, device=device), qlora.dynamic_map(False, device=device)
    assert torch.equal(state["exp_avg"], _decode(code1, opt.state[big]["state1"], opt.state[big]["absmax1"]))
    assert torch.equal(state["exp_avg_sq"], _decode(code2, opt.state[big]["state2"], opt.state[big]["absmax2"]))


# ---- bad inputs -----------------------------------------------------------------------------------------

def _bad_32bit(device, **change):
    args = dict(zip(["params", "grads", "exp_avgs", "exp_avg_sqs", "steps"],
                    _adamw_32bit_inputs(device, torch.float32, sizes=[(10,), (300,)])))
    args.update(HYPER)
    args.update(change)
    return args


def _bad_8bit(device, **change):
    names = ["params", "grads", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2", "steps"]
    args = dict(zip(names, _adamw_8bit_inputs(device, torch.float32, sizes=[(10,), (300,)])))
    args.update(HYPER)
    args.update(change)
    return args


def test_bad_inputs_name_the_argument(device):
    op32, op8 = torch.ops.qlora.adamw_32bit, torch.ops.qlora.adamw_8bit_blockwise
    t = lambda *s, **kw: torch.zeros(*s, device=device, **kw)  # noqa: E731
    cases = [
        (op32, _bad_32bit(device, grads=[t(10)]), "grads has 1 tensors but params has 2"),
        (op32, _bad_32bit(device, exp_avgs=[t(10), t(300, dtype=torch.float16)]), "exp_avgs[1] must be Float"),
        (op32, _bad_32bit(device, exp_avg_sqs=[t(10), t(299)]), "exp_avg_sqs[1] has 299 elements but 300"),
        (op32, _bad_32bit(device, grads=[t(10), t(300, dtype=torch.bfloat16)]), "grads[1] must have its parameter's dtype"),
        (op32, _bad_32bit(device, grads=[t(10), t(3, 100)]), "grads[1] has shape"),
        (op32, _bad_32bit(device, params=[t(10), t(300, dtype=torch.float64)]), "params[1] is Double but params[0] is Float"),
        (op32, _bad_32bit(device, params=[t(10), t(300, 2)[:, 0]], grads=[t(10), t(300)]), "params[1] must be contiguous"),
        (op32, _bad_32bit(device, steps=[t(()), t(2)]), "steps[1] has 2 elements"),
        (op32, _bad_32bit(device, beta1=1.0), "beta1 must be in [0, 1)"),
        (op32, _bad_32bit(device, beta2=-0.1), "beta2 must be in [0, 1)"),
        (op32, _bad_32bit(device, lr=-1.0), "lr must be >= 0"),
        (op32, _bad_32bit(device, eps=-1.0), "eps must be >= 0"),
        (op32, _bad_32bit(device, weight_decay=-1.0), "weight_decay must be >= 0"),
        (op32, _bad_32bit(device, lr_tensor=t(2)), "lr_tensor must hold one value"),
        (op32, _bad_32bit(device, lr_tensor=t((), dtype=torch.int64)), "lr_tensor must be float32 or float64"),
        (op8, _bad_8bit(device, absmax1=[t(1), t(3)]), "absmax1[1] has 3 elements but 2 are expected"),
        (op8, _bad_8bit(device, state2=[t(10, dtype=torch.uint8), t(300)]), "state2[1] must be Byte"),
        (op8, _bad_8bit(device, qmap2=t(255)), "qmap2 has 255 elements but 256"),
        (op8, _bad_8bit(device, state1=[t(10, dtype=torch.uint8)]), "state1 has 1 tensors but params has 2"),
    ]
    for op, kwargs, message in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
            op(**kwargs)
        assert message in str(info.value), f"expected {message!r} in {str(info.value)!r}"


def test_optimizer_rejects_bad_hyperparameters_and_sparse_grads():
    p = torch.nn.Parameter(torch.randn(10))
    for kwargs, message in [(dict(lr=-1.0), "lr must be >= 0"), (dict(betas=(0.9, 1.0)), "betas must be"),
                            (dict(eps=-1e-8), "eps must be >= 0"), (dict(weight_decay=-0.1), "weight_decay must be"),
                            (dict(lr=torch.ones(2)), "one-element tensor")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            AdamW([p], **kwargs)
    opt = AdamW([p])
    p.grad = torch.randn(10).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_load_state_dict_rejects_mismatches():
    params = _model("cpu")
    opt = AdamW(params)
    _train(opt, params, 1, 0)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="has 4 parameters but the optimizer's has 3"):
        AdamW(params[:3]).load_state_dict(sd)
    with pytest.raises(ValueError, match="checkpoint has 32-bit states"):
        AdamW8bit(params).load_state_dict(sd)
    opt8 = AdamW8bit(params)
    _train(opt8, params, 1, 0)
    sd8 = copy.deepcopy(opt8.state_dict())
    key = next(k for k, s in sd8["state"].items() if "absmax1" in s)
    sd8["state"][key]["qmap1"] = torch.linspace(-1, 1, 256)
    with pytest.raises(ValueError, match="qmap1 is not the signed dynamic code"):
        AdamW8bit(params).load_state_dict(sd8)
