"""Shared test fixtures: the devices to run on and fresh seeded randomness per test."""

from __future__ import annotations

import pytest
import torch

import qlora  # noqa: F401  (registers torch.ops.qlora)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or 0xAB bytes for integers) so that elements a kernel forgot to write show up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(0xAB if t.dtype == torch.uint8 else -12345)


def poisoned_allocator(nbytes: int, device):
    """Leave the caching allocator holding a NaN-filled block, so an unwritten output element reads as NaN. The
    cache is emptied first, so the op's first allocation of at most nbytes lands on that block."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        poison_(torch.empty(nbytes // 4 + 1024, dtype=torch.float32, device=device))
