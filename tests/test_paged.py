"""Paged tensors (CUDA unified memory) and the paged optimizers under GPU memory pressure."""

from __future__ import annotations

import functools
import gc
import warnings

import pytest
import torch

import qlora  # noqa: F401
from qlora.optim import AdamW, PagedAdamW, PagedAdamW8bit, advise, is_paged, paged_empty, paged_zeros, prefetch

from conftest import cuda_only

GiB = 2**30


@functools.lru_cache(maxsize=None)
def _pageable() -> bool:
    """Whether this GPU pages unified memory; a paged_empty that falls back must say so in a warning.

    Cached: the warning is issued once per process, so only the first call can see it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = paged_empty((1024,), device="cuda")
    if is_paged(t):
        return True
    assert any("concurrent managed access" in str(w.message) for w in caught), \
        "paged_empty returned device memory without warning that the GPU cannot page"
    return False


def test_paged_empty_shape_dtype_device(device):
    t = paged_zeros((3, 5), torch.bfloat16, device)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.device.type == device.type
    assert torch.equal(t, torch.zeros(3, 5, dtype=torch.bfloat16, device=device))
    assert paged_empty((0,), device=device).numel() == 0
    if device.type == "cpu":
        assert not is_paged(t)
    prefetch(t)               # no-ops on the CPU and on non-paged tensors
    prefetch(t, to_device=False)
    advise(t, "host")
    assert not is_paged(torch.zeros(4, device=device))


def test_bad_paged_arguments(device):
    with pytest.raises(ValueError, match="location must be 'device', 'host' or 'none', got 'gpu'"):
        advise(torch.zeros(4, device=device), "gpu")
    if device.type == "cuda":
        with pytest.raises((RuntimeError, ValueError), match="negative"):
            paged_empty((-1, 3), device=device)


def test_opcheck_paged_ops(device):
    t = torch.randn(300, device=device)
    torch.library.opcheck(torch.ops.qlora.paged_prefetch.default, (t, True))
    torch.library.opcheck(torch.ops.qlora.paged_prefetch.default, (t, False))
    torch.library.opcheck(torch.ops.qlora.paged_advise.default, (t, "none"))
    # An empty tensor's values are arbitrary, so eager and traced outputs cannot be compared.
    torch.library.opcheck(torch.ops.qlora.paged_empty.default, ([4, 7], torch.float32, device),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.qlora.is_paged.default, (t,))


@cuda_only
def test_paged_tensor_round_trips_through_the_host():
    if not _pageable():
        pytest.skip("this GPU cannot page unified memory")
    t = paged_empty((1 << 20,), torch.float32, "cuda")
    assert is_paged(t) and t.is_cuda
    t.copy_(torch.arange(t.numel(), device="cuda", dtype=torch.float32))
    advise(t, "host")
    prefetch(t, to_device=False)
    torch.cuda.synchronize()
    assert float(t.sum()) == float(torch.arange(t.numel(), dtype=torch.float64).sum())  # read on the GPU
    assert torch.equal(t.cpu(), torch.arange(t.numel(), dtype=torch.float32))
    advise(t, "device")
    prefetch(t)
    t.mul_(2)
    advise(t, "none")
    assert torch.equal(t.cpu(), 2 * torch.arange(t.numel(), dtype=torch.float32))
    view = t[10:20]
    assert is_paged(view)
    prefetch(view, to_device=False)   # a view prefetches its whole storage
    assert torch.equal(view.cpu(), 2 * torch.arange(10, 20, dtype=torch.float32))


@cuda_only
def test_paged_memory_is_freed():
    if not _pageable():
        pytest.skip("this GPU cannot page unified memory")
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    nbytes = min(GiB, free_before // 8)
    for _ in range(5):
        t = paged_zeros((nbytes // 4,), torch.float32, "cuda")   # zeroing on the GPU makes the pages resident
        torch.cuda.synchronize()
        del t
        gc.collect()
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info()[0]
    assert free_after > free_before - nbytes // 2, f"{(free_before - free_after) / GiB:.2f} GiB not given back"


@cuda_only
def test_paged_empty_refuses_more_than_the_free_memory():
    if not _pageable():
        pytest.skip("this GPU cannot page unified memory")
    free = torch.cuda.mem_get_info()[0]
    with pytest.raises(torch.OutOfMemoryError, match="mem_get_info"):
        paged_empty((free // 4 + GiB,), torch.float32, "cuda")


@cuda_only
@pytest.mark.parametrize("prefetch_mode", [True, False, "auto"])
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_paged_states_evicted_to_the_host_still_update_exactly(cls, prefetch_mode):
    if not _pageable():
        pytest.skip("this GPU cannot page unified memory")
    shapes = [(1024, 1024), (3000,), (256, 4097)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    paged, plain = cls(params, lr=1e-3, prefetch=prefetch_mode), (AdamW if cls is PagedAdamW else qlora.optim.AdamW8bit)(twins, lr=1e-3)
    for step in range(4):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        paged.step()
        plain.step()
        for p in params:  # push every paged state to the host; the next step must bring it back
            for t in paged._state_tensors(p):
                prefetch(t, to_device=False)
    assert any(is_paged(t) for p in params for t in paged._state_tensors(p))
    assert not any(is_paged(t) for q in twins for t in plain._state_tensors(q))
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, value in paged.state[p].items():
            assert torch.equal(value, plain.state[q][key]), key


def test_prefetch_mode_is_checked():
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="prefetch must be True, False or 'auto'"):
        PagedAdamW([p], prefetch="always")


@cuda_only
def test_paged_optimizer_survives_a_memory_cap_that_the_plain_one_cannot():
    """Cap the caching allocator below model + gradients + device-resident states: the paged optimizer
    trains to the end (its states are unified memory, outside the allocator), the plain one runs out."""
    if not _pageable():
        pytest.skip("this GPU cannot page unified memory")
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    numel = 32 * 2**20                      # 8 tensors of 128 MiB: 1 GiB of parameters, 1 GiB of gradients
    model_bytes = 2 * 8 * numel * 4
    state_bytes = 2 * 8 * numel * 4         # exp_avg and exp_avg_sq
    if free < model_bytes + state_bytes + 2 * GiB:
        pytest.skip(f"needs {(model_bytes + state_bytes + 2 * GiB) / GiB:.1f} GiB free, has {free / GiB:.1f}")
    for cls, should_fit in ((PagedAdamW, True), (AdamW, False)):
        gc.collect()
        torch.cuda.empty_cache()
        cap = torch.cuda.memory_reserved() + model_bytes + GiB // 2   # room for one of the two states at most
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            params = [torch.nn.Parameter(torch.randn(numel, device="cuda")) for _ in range(8)]
            before = params[0].detach()[:1000].clone()
            for p in params:
                p.grad = torch.empty_like(p)
            opt = cls(params, lr=1e-3)
            if should_fit:
                for _ in range(3):
                    for p in params:
                        p.grad.normal_()
                    opt.step()
                torch.cuda.synchronize()
                assert all(is_paged(opt.state[p]["exp_avg"]) for p in params)
                assert torch.isfinite(params[0]).all() and not torch.equal(params[0][:1000], before)
            else:
                with pytest.raises(torch.OutOfMemoryError):
                    for p in params:
                        p.grad.normal_()
                    opt.step()
                    torch.cuda.synchronize()
        finally:
            params = opt = p = None
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
