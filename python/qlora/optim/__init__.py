"""Optimizers with fused CUDA/C++ kernels and optimizer states that can page out of GPU memory.

``AdamW`` and ``AdamW8bit`` keep their states in device memory; ``PagedAdamW`` and ``PagedAdamW8bit`` keep
them in CUDA unified memory (:mod:`qlora.optim.paged`), which the driver evicts to the host when the GPU
runs short instead of failing with out-of-memory.
"""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .paged import advise, is_paged, paged_empty, paged_zeros, prefetch

__all__ = ["AdamW", "PagedAdamW", "AdamW8bit", "PagedAdamW8bit", "paged_empty", "paged_zeros", "prefetch",
           "advise", "is_paged"]
