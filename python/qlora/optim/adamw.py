"""AdamW with fused multi-tensor kernels: 32-bit or 8-bit blockwise states, in device or unified memory."""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import chain
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim import Optimizer

from ..codebook import dynamic_map
from . import paged as _paged

__all__ = ["AdamW", "PagedAdamW", "AdamW8bit", "PagedAdamW8bit"]

_BLOCKSIZE = 256              # elements per absmax of the 8-bit states (bitsandbytes' layout)
_PAGED_MIN_NUMEL = 65536      # smaller states stay in device memory: a page is 64 KiB or more anyway
_CHUNK_BYTES = 256 * 2**20    # paged variants update (and prefetch) states in chunks of about this size


class _AdamWBase(Optimizer):
    """Shared machinery of the four AdamW variants; see :class:`AdamW` for the parameters."""

    _paged = False
    _optim_bits = 32

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, min_8bit_size: int = 4096, prefetch: bool | str = "auto"):
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr must be a float or a one-element tensor, got a tensor of {lr.numel()} elements")
        elif not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
        if not (isinstance(prefetch, bool) or prefetch == "auto"):
            raise ValueError(f"prefetch must be True, False or 'auto', got {prefetch!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.prefetch = prefetch
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefetch_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._paged_nbytes: dict[torch.device, int] = {}  # _paged_bytes, cleared when states are made or loaded

    # ---- state ----------------------------------------------------------------------------------------

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self._optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _zeros(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        if self._paged and device.type == "cuda" and numel >= _PAGED_MIN_NUMEL:
            return _paged.paged_zeros(shape, dtype, device)
        return torch.zeros(shape, dtype=dtype, device=device)

    def _names(self, p: torch.Tensor) -> tuple[str, str]:
        return ("exp_avg", "exp_avg_sq") if self._optim_bits == 32 else ("state1", "state2")

    def _init_state(self, p: torch.Tensor) -> dict:
        self._paged_nbytes.clear()
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        first, second = self._names(p)
        if self._uses_8bit(p):
            blocks = -(-p.numel() // _BLOCKSIZE)
            state[first] = self._zeros(p.shape, torch.uint8, p.device)
            state[second] = self._zeros(p.shape, torch.uint8, p.device)
            state["absmax1"] = self._zeros((blocks,), torch.float32, p.device)
            state["absmax2"] = self._zeros((blocks,), torch.float32, p.device)
        else:
            state[first] = self._zeros(p.shape, torch.float32, p.device)
            state[second] = self._zeros(p.shape, torch.float32, p.device)
        return state

    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            self._qmaps[device] = (dynamic_map(True, device=device), dynamic_map(False, device=device))
        return self._qmaps[device]

    def _state_tensors(self, p: torch.Tensor) -> list[torch.Tensor]:
        state = self.state[p]
        return [state[k] for k in ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2") if k in state]

    # ---- step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss.

        Notes
        -----
        Elements whose gradient is NaN or infinite are skipped: their parameter and moments keep their values
        (the step count still advances). The decision is made per element on the device, with no host
        synchronisation.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if len(self.state[p]) == 0:
                self._init_state(p)
        torch._foreach_add_([self.state[p]["step"] for p in params], 1.0)

        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        hyper = dict(lr=0.0 if lr_tensor is not None else float(lr), beta1=group["betas"][0], beta2=group["betas"][1],
                     eps=group["eps"], weight_decay=group["weight_decay"], lr_tensor=lr_tensor)

        # One launch per (device, dtype, state kind), split into chunks only where states are paged.
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype, self._uses_8bit(p))].append(p)
        for (device, _, eight_bit), bucket in buckets.items():
            paged = self._paged and device.type == "cuda"
            chunks = self._chunks(bucket) if paged else [bucket]
            launch = (lambda c: self._launch_8bit(c, hyper)) if eight_bit else (lambda c: self._launch_32bit(c, hyper))
            if paged and self._should_prefetch(device):
                self._pipelined(chunks, launch, device)
            else:
                for chunk in chunks:
                    launch(chunk)

    def _launch_32bit(self, params: list[torch.Tensor], hyper: dict) -> None:
        first, second = self._names(params[0])
        states = [self.state[p] for p in params]
        torch.ops.qlora.adamw_32bit(params, [p.grad for p in params], [s[first] for s in states],
                                    [s[second] for s in states], [s["step"] for s in states], **hyper)

    def _launch_8bit(self, params: list[torch.Tensor], hyper: dict) -> None:
        states = [self.state[p] for p in params]
        qmap1, qmap2 = self._qmap(params[0].device)
        torch.ops.qlora.adamw_8bit_blockwise(
            params, [p.grad for p in params], [s["state1"] for s in states], [s["state2"] for s in states],
            [s["absmax1"] for s in states], [s["absmax2"] for s in states], qmap1, qmap2,
            [s["step"] for s in states], **hyper)

    def _should_prefetch(self, device: torch.device) -> bool:
        """With "auto", only when the GPU's free memory is less than the paged states: the driver moves pages
        to the host only when the GPU runs out of memory, and a prefetch of pages that are already there still
        costs tens of microseconds of host time per tensor. Pages moved out during an earlier peak return on
        demand when the update touches them."""
        if self.prefetch != "auto":
            return bool(self.prefetch)
        free, _ = torch.cuda.mem_get_info(device)
        return free < self._paged_bytes(device)

    def _paged_bytes(self, device: torch.device) -> int:
        """Bytes of this optimizer's states in unified memory on ``device``. Counted once and kept: is_paged asks
        the driver about each tensor, host time that every step would otherwise pay."""
        if device not in self._paged_nbytes:
            self._paged_nbytes[device] = sum(
                t.numel() * t.element_size() for state in self.state.values() for t in state.values()
                if isinstance(t, torch.Tensor) and t.device == device and _paged.is_paged(t))
        return self._paged_nbytes[device]

    def _chunks(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        chunks, current, size = [], [], 0
        for p in params:
            nbytes = sum(t.numel() * t.element_size() for t in self._state_tensors(p))
            if current and size + nbytes > _CHUNK_BYTES:
                chunks.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            chunks.append(current)
        return chunks

    def _pipelined(self, chunks: list, launch: Callable, device: torch.device) -> None:
        """Update chunk i while a side stream prefetches chunk i + 1's states to the GPU.

        The update of a chunk waits only for its own prefetch, so migration overlaps computation; when the
        states are already resident the prefetches are cheap and nothing waits.
        """
        if device not in self._prefetch_streams:
            self._prefetch_streams[device] = torch.cuda.Stream(device)
        side = self._prefetch_streams[device]
        current = torch.cuda.current_stream(device)

        def prefetch(chunk) -> torch.cuda.Event:
            with torch.cuda.stream(side):
                for p in chunk:
                    for t in self._state_tensors(p):
                        torch.ops.qlora.paged_prefetch(t, True)
                event = torch.cuda.Event()
                event.record(side)
            return event

        ready = prefetch(chunks[0])
        for i, chunk in enumerate(chunks):
            this_ready = ready
            if i + 1 < len(chunks):
                ready = prefetch(chunks[i + 1])
            current.wait_event(this_ready)
            launch(chunk)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint from any of the four variants (or from torch.optim.AdamW / bitsandbytes).

        States are copied into this optimizer's own storage: unified memory for the paged variants, device
        memory otherwise, so a checkpoint moves freely between paged and non-paged optimizers. 32-bit states
        load into 32-bit optimizers under either naming (``exp_avg``/``exp_avg_sq`` or bitsandbytes'
        ``state1``/``state2``); 8-bit states load into 8-bit optimizers, and into 32-bit ones by decoding.

        Parameters
        ----------
        state_dict : dict
            As returned by :meth:`state_dict`.
        """
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups but the optimizer has {len(groups)}")
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"parameter group {i} of state_dict has {len(sg['params'])} parameters but the "
                                 f"optimizer's has {len(g['params'])}")
        id_map = dict(zip(chain.from_iterable(sg["params"] for sg in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        new_state: defaultdict = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key in id_map:
                p = id_map[key]
                new_state[p] = self._import_state(p, saved)
            else:
                new_state[key] = saved
        new_groups = [dict(sg, params=g["params"]) for g, sg in zip(groups, saved_groups)]
        for g in new_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"] = g["lr"].clone()
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._paged_nbytes.clear()

    def _import_state(self, p: torch.Tensor, saved: dict) -> dict:
        first, second = self._names(p)
        state = self._init_state(p)
        step = saved.get("step", 0)
        state["step"].copy_(torch.as_tensor(step, dtype=torch.float32).reshape(()))
        m = saved.get("exp_avg", saved.get("state1"))
        v = saved.get("exp_avg_sq", saved.get("state2"))
        if m is None or v is None:
            raise ValueError(f"the saved state of a parameter of shape {tuple(p.shape)} has no moments "
                             f"(keys: {sorted(saved)})")
        eight_bit_saved = m.dtype == torch.uint8
        if eight_bit_saved:
            if "absmax1" not in saved or "absmax2" not in saved:
                raise ValueError("8-bit saved states need absmax1 and absmax2")
            for name, signed in (("qmap1", True), ("qmap2", False)):
                if name in saved and not torch.equal(saved[name].float().cpu(), dynamic_map(signed)):
                    raise ValueError(f"the saved {name} is not the {'signed' if signed else 'unsigned'} dynamic "
                                     f"code this optimizer uses, so the 8-bit states cannot be decoded")
        if self._uses_8bit(p):
            if not eight_bit_saved:
                raise ValueError(f"{type(self).__name__} keeps 8-bit states for a parameter of {p.numel()} elements "
                                 f"(min_8bit_size={self.min_8bit_size}) but the checkpoint has 32-bit states for it")
            for key, src in ((first, m), (second, v), ("absmax1", saved["absmax1"]), ("absmax2", saved["absmax2"])):
                self._copy_into(state[key], src, key)
        else:
            if eight_bit_saved:
                m, v = _decode_8bit(m, saved["absmax1"]), _decode_8bit(v, saved["absmax2"], signed=False)
            self._copy_into(state[first], m, first)
            self._copy_into(state[second], v, second)
        return state

    @staticmethod
    def _copy_into(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if src.numel() != dst.numel():
            raise ValueError(f"saved {name} has {src.numel()} elements but {dst.numel()} are expected")
        dst.copy_(src.reshape(dst.shape))


def _decode_8bit(codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True) -> torch.Tensor:
    code = dynamic_map(signed, device=codes.device)
    scale = absmax.to(codes.device).repeat_interleave(_BLOCKSIZE)[: codes.numel()]
    return (code[codes.reshape(-1).long()] * scale).reshape(codes.shape)


_PARAMS_DOC = """
    Parameters
    ----------
    params : iterable
        Parameters to optimize, or dicts defining parameter groups.
    lr : float or torch.Tensor
        Learning rate; a one-element tensor is read on the device at every step, so schedulers may update it
        in place.
    betas : tuple of float
        Decay rates of the first and second moment.
    eps : float
        Added to the denominator for numerical stability.
    weight_decay : float
        Decoupled weight decay: every step multiplies the parameter by ``1 - lr * weight_decay``.
    min_8bit_size : int
        8-bit variants keep 32-bit states for parameters with fewer elements (bitsandbytes' default, 4096).
    prefetch : bool or "auto"
        Paged variants: True prefetches each chunk of states to the GPU ahead of its update, on a side stream;
        "auto" (default) does so only when the GPU's free memory is below the paged states' size, the case in
        which the driver may have moved them to the host; False never prefetches (pages fault back on demand).

    Notes
    -----
    The update is torch.optim.AdamW's (decoupled weight decay, bias corrections ``1 - beta ** step``), one
    fused launch per device, dtype and state kind, whatever the number of parameters. Parameters and
    gradients may be float32, bfloat16 or float16; states are float32 (``exp_avg``, ``exp_avg_sq``) or, in
    the 8-bit variants, bitsandbytes' blockwise layout (``state1``/``state2`` uint8 codes of the signed and
    unsigned dynamic code, ``absmax1``/``absmax2`` one float32 per 256 elements), so checkpoints of
    bitsandbytes' AdamW8bit load directly. Elements whose gradient is not finite are skipped.
"""


class AdamW(_AdamWBase):
    __doc__ = "AdamW with float32 states in device memory, fused over all parameters." + _PARAMS_DOC


class PagedAdamW(_AdamWBase):
    __doc__ = ("AdamW with float32 states in unified memory, which spill to the host under GPU memory "
               "pressure instead of raising out-of-memory." + _PARAMS_DOC)
    _paged = True


class AdamW8bit(_AdamWBase):
    __doc__ = "AdamW with 8-bit blockwise states (2 bytes per parameter) in device memory." + _PARAMS_DOC
    _optim_bits = 8


class PagedAdamW8bit(_AdamWBase):
    __doc__ = "AdamW with 8-bit blockwise states in unified memory." + _PARAMS_DOC
    _paged = True
    _optim_bits = 8
