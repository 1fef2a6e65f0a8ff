"""Paged tensors: CUDA unified memory that the driver moves between the GPU and the host on demand.

A paged tensor is an ordinary CUDA tensor whose pages the driver may evict to host memory when the GPU runs
short, and fault (or prefetch) back when a kernel needs them. Paged optimizer states therefore cannot cause
an out-of-memory error in the caching allocator: under pressure they spill to the host instead.

On a GPU without concurrent managed access (``cudaDevAttrConcurrentManagedAccess``; e.g. Windows or some
virtual machines) unified memory cannot page on demand: :func:`paged_empty` warns once and returns ordinary
device memory, and :func:`is_paged` reports ``False``. On the CPU every function is a plain allocation or a
no-op.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["paged_empty", "paged_zeros", "prefetch", "advise", "is_paged"]

_Device = Union[torch.device, str, int, None]


def _device(device: _Device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def paged_empty(size: Sequence[int], dtype: torch.dtype = torch.float32, device: _Device = None) -> torch.Tensor:
    """An uninitialised tensor in unified memory.

    Parameters
    ----------
    size : sequence of int
        Shape of the tensor.
    dtype : torch.dtype
        Element type.
    device : torch.device, str or int, optional
        The GPU whose memory the pages prefer (default: the current CUDA device, or the CPU without CUDA).

    Returns
    -------
    torch.Tensor
        A CUDA tensor backed by ``cudaMallocManaged`` memory, freed when the tensor is.

    Raises
    ------
    torch.OutOfMemoryError
        If the request exceeds the GPU's free memory as ``torch.cuda.mem_get_info`` reports it: unified memory
        is never allocated beyond that, because oversubscribing a shared GPU can stall it.
    """
    return torch.ops.qlora.paged_empty(list(size), dtype, _device(device))


def paged_zeros(size: Sequence[int], dtype: torch.dtype = torch.float32, device: _Device = None) -> torch.Tensor:
    """:func:`paged_empty` filled with zeros (on the GPU, so the pages start out resident there)."""
    return paged_empty(size, dtype, device).zero_()


def prefetch(t: torch.Tensor, to_device: bool = True) -> None:
    """Migrate a paged tensor to its GPU (or, with ``to_device=False``, to the host).

    The migration is ordered on the current CUDA stream and returns at once; kernels queued after it on that
    stream find the pages in place. Tensors that are not paged are left alone.
    """
    torch.ops.qlora.paged_prefetch(t, to_device)


def advise(t: torch.Tensor, location: str = "device") -> None:
    """Set where a paged tensor's pages prefer to live: ``"device"``, ``"host"``, or ``"none"`` to clear it.

    Preferred pages migrate only under memory pressure (device) or stay on the host and are read over the
    interconnect (host). Tensors that are not paged are left alone.
    """
    torch.ops.qlora.paged_advise(t, location)


def is_paged(t: Optional[torch.Tensor]) -> bool:
    """Whether ``t`` lives in unified memory."""
    return t is not None and t.device.type == "cuda" and bool(torch.ops.qlora.is_paged(t))
