"""Linear4bit (a frozen 4-bit nn.Linear) and LoraLinear4bit (the same with a trainable LoRA adapter)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .. import _C
from ..lora_linear import PATH_AUTO
from ..quantization import QuantState, dequantize_4bit, quantize_4bit, row_order, tile_order

__all__ = ["Linear4bit", "LoraLinear4bit", "tile_order_", "tile_order_pays"]


def _tile_order_fits(out_features: int, in_features: int) -> bool:
    """Whether a weight's shape is whole tiles (qlora/tile_order.h: 16 rows by 64 columns)."""
    return out_features % 16 == 0 and in_features % 64 == 0


def tile_order_pays(device: torch.device, out_features: int, in_features: int, blocksize: int,
                    compute_dtype: Optional[torch.dtype]) -> bool:
    """Whether a 4-bit weight on ``device`` is faster in tile order (:func:`qlora.tile_order`): where the kernels
    that read it natively run (the tiled small-M GEMV and the tensor-core GEMM: an sm_90 GPU, a library built with
    sm_90a code, bfloat16, blocksize 64, out_features % 16 == 0, in_features % 64 == 0). Elsewhere the small-M path
    would read a row-major copy on every call."""
    return (device.type == "cuda" and compute_dtype == torch.bfloat16 and blocksize == 64
            and _tile_order_fits(out_features, in_features) and _C.sm90a()
            and torch.cuda.get_device_capability(device) == (9, 0))


def _as_dtype(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """t in dtype (None: as it is), without a ``.to()`` call where it already is: that call costs host time on
    every forward even when it returns t."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (NF4 or FP4, bitsandbytes' format).

    The packed weight and its quantization statistics are buffers: they move with ``.to()`` and are saved in
    the state dict, but are never trained. The bias, when there is one, is a frozen parameter.

    Parameters
    ----------
    packed : Tensor
        uint8 packed codes from :func:`qlora.quantize_4bit` of a ``[out_features, in_features]`` weight.
    quant_state : QuantState
    bias : Tensor, optional
    compute_dtype : torch.dtype, optional
        dtype the input is cast to (and the output has); None keeps the input's dtype.
    """

    def __init__(self, packed: torch.Tensor, quant_state: QuantState, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        qs = quant_state
        if len(qs.shape) != 2:
            raise ValueError(f"quant_state.shape must be [out_features, in_features], got {list(qs.shape)}")
        self.out_features, self.in_features = int(qs.shape[0]), int(qs.shape[1])
        self.blocksize, self.quant_type, self.weight_dtype = qs.blocksize, qs.quant_type, qs.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", qs.absmax)
        self.register_buffer("absmax2", qs.absmax2)
        self.register_buffer("code2", qs.code2)
        self.register_buffer("offset", qs.offset)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
            bias = bias.detach().to(compute_dtype or bias.dtype)
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, device=None,
                    tile_order: Optional[bool] = None) -> "Linear4bit":
        """Quantize an ``nn.Linear`` (on ``device`` if given, else where its weight is).

        compute_dtype defaults to the linear layer's weight dtype. tile_order: hold the packed weight in tile order
        (:meth:`tile_order_`); None does where :func:`tile_order_pays`.
        """
        w = linear.weight.detach()
        if device is not None:
            w = w.to(device)
        packed, qs = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach().to(w.device).clone()
        return cls(packed, qs, bias, compute_dtype or w.dtype)._take_order(tile_order)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, Any], compute_dtype: Optional[torch.dtype] = None,
                            device=None, tile_order: Optional[bool] = None) -> "Linear4bit":
        """Build from the state dict of a bitsandbytes ``Linear4bit`` (keys ``weight``, ``weight.absmax``,
        ``weight.quant_state.bitsandbytes__nf4``, ..., optionally ``bias``), without importing bitsandbytes.
        tile_order as in :meth:`from_linear`."""
        if "weight" not in state_dict:
            raise ValueError("state_dict has no 'weight' entry (the packed 4-bit codes)")
        packed = state_dict["weight"]
        device = device if device is not None else packed.device
        qs = QuantState.from_dict({k: v for k, v in state_dict.items() if k.startswith("weight.")}, device=device)
        packed = packed.to(device=device, dtype=torch.uint8).reshape(-1, 1)
        bias = state_dict.get("bias")
        bias = None if bias is None else bias.to(device)
        return cls(packed, qs, bias, compute_dtype or qs.dtype)._take_order(tile_order)

    def _take_order(self, tile_order: Optional[bool]) -> "Linear4bit":
        if tile_order is None:
            tile_order = tile_order_pays(self.weight.device, self.out_features, self.in_features, self.blocksize,
                                         self.compute_dtype)
        return self.tile_order_() if tile_order else self

    @property
    def quant_state(self) -> QuantState:
        return QuantState(self.absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                          self.blocksize, self.quant_type, self.absmax2, self.code2, self.offset)

    @property
    def tile_ordered(self) -> bool:
        """Whether the packed weight is held in tile order (:meth:`tile_order_`)."""
        return self._buffers["weight"].dim() == 3

    def tile_order_(self) -> "Linear4bit":
        """Hold the packed weight in tile order (:func:`qlora.tile_order`) from now on; returns the module.

        The op reads it faster where few rows of x meet a large weight (decoding: the tiled small-M GEMV up to 8
        rows) and in its tensor-core GEMM; the large-M path's dequantization reads it natively too.
        The state dict keeps bitsandbytes' row-major bytes either way, and loading one converts it. Needs
        out_features % 16 == 0 and in_features % 64 == 0. :meth:`from_linear` takes it where
        :func:`tile_order_pays`.
        """
        if not self.tile_ordered:
            self.weight = tile_order(self.weight, self.quant_state)
        return self

    def row_order_(self) -> "Linear4bit":
        """Hold the packed weight in bitsandbytes' row-major order again; returns the module."""
        if self.tile_ordered:
            self.weight = row_order(self.weight)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tile_ordered:
            destination[prefix + "weight"] = row_order(self.weight)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if self.tile_ordered and key in state_dict and state_dict[key].dim() != 3:
            state_dict[key] = tile_order(state_dict[key].to(self.weight.device), self.quant_state)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight as a dense ``[out_features, in_features]`` tensor (for inspection and merging)."""
        w = dequantize_4bit(self.weight, self.quant_state)
        return _as_dtype(w, dtype)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return _as_dtype(x, self.compute_dtype)

    def _bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        return None if self.bias is None else _as_dtype(self.bias, dtype)

    def _weight_args(self) -> tuple:
        """The weight as torch.ops.qlora.lora_linear_4bit's arguments, read at each call (``.to()`` and
        ``load_state_dict`` replace the buffers); cheaper than building a QuantState per forward. The buffers come
        from the module's buffer dict: five ``nn.Module.__getattr__`` calls took 3 µs of host time a forward."""
        b = self._buffers
        return (b["weight"], b["absmax"], self.blocksize, self.quant_type, [self.out_features, self.in_features],
                b["absmax2"], b["code2"], b["offset"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._cast(x)
        return torch.ops.qlora.lora_linear_4bit(x, *self._weight_args(), self._bias(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax2 is not None}, compute_dtype={self.compute_dtype}"
                + (", tile_ordered=True" if self.tile_ordered else ""))


class LoraLinear4bit(nn.Module):
    """A frozen 4-bit linear layer plus a trainable LoRA adapter: ``y = base(x) + (alpha / r)·B·A·dropout(x)``.

    ``lora_A`` and ``lora_B`` are bias-free ``nn.Linear`` modules, so the adapter's state dict keys
    (``lora_A.weight``, ``lora_B.weight``) and initialization match PEFT: A is kaiming-uniform with
    ``a = sqrt(5)``, B is zero, so a fresh adapter leaves the layer's output unchanged.

    Parameters
    ----------
    base : Linear4bit
    r : int
        Adapter rank.
    alpha : float
        Scaling numerator; the adapter's output is scaled by ``alpha / r``.
    dropout : float
        Dropout probability on the adapter's input (training mode only).
    dtype : torch.dtype, optional
        dtype of the adapter weights; defaults to the base's compute dtype (float32 when it has none).
    """

    def __init__(self, base: Linear4bit, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be at least 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = r, alpha, alpha / r, float(dropout)
        dtype = dtype or base.compute_dtype or torch.float32
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                    blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, device=None,
                    tile_order: Optional[bool] = None) -> "LoraLinear4bit":
        """Quantize ``linear`` into a :class:`Linear4bit` (tile_order as there) and attach a fresh adapter."""
        base = Linear4bit.from_linear(linear, blocksize, quant_type, double_quant, compute_dtype, device, tile_order)
        return cls(base, r, alpha, dropout)

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.base._cast(x)
        dtype = x.dtype
        x_lora = None
        if self.training and self.lora_dropout > 0:
            x_lora = nn.functional.dropout(x, self.lora_dropout, training=True)
        return torch.ops.qlora.lora_linear_4bit(x, *self.base._weight_args(), self.base._bias(dtype),
                                                _as_dtype(self.lora_A.weight, dtype),
                                                _as_dtype(self.lora_B.weight, dtype), self.scaling, x_lora, PATH_AUTO)

    # ---- merging ----------------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r)·B·A`` in float32, ``[out_features, in_features]``."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    @torch.no_grad()
    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A dense ``nn.Linear`` computing the same function: weight ``dequant(W) + (alpha / r)·B·A``, added in
        float32 and rounded once to ``dtype`` (default: the base weight's original dtype)."""
        dtype = dtype or self.base.weight_dtype
        w = self.base.dequantize(torch.float32) + self.delta_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=w.device, dtype=dtype)
        linear.weight.copy_(w)
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear

    @torch.no_grad()
    def merge_into(self, linear: nn.Linear) -> nn.Linear:
        """Add the adapter to a dense layer of the same shape in place (``W += (alpha / r)·B·A``); returns it."""
        self._check_linear(linear)
        linear.weight.copy_(linear.weight.float() + self.delta_weight().to(linear.weight.device))
        return linear

    @torch.no_grad()
    def unmerge_from(self, linear: nn.Linear) -> nn.Linear:
        """Inverse of :meth:`merge_into` (``W -= (alpha / r)·B·A``, up to the rounding of linear's dtype)."""
        self._check_linear(linear)
        linear.weight.copy_(linear.weight.float() - self.delta_weight().to(linear.weight.device))
        return linear

    def _check_linear(self, linear: nn.Linear) -> None:
        if tuple(linear.weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"linear.weight has shape {list(linear.weight.shape)} but the adapter is "
                             f"[{self.out_features}, {self.in_features}]")

    # ---- adapter-only state ---------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable adapter, PEFT-style keys: ``{"lora_A.weight", "lora_B.weight"}`` (detached copies)."""
        return {"lora_A.weight": self.lora_A.weight.detach().clone(),
                "lora_B.weight": self.lora_B.weight.detach().clone()}

    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state_dict` returned (shapes must match)."""
        missing = {"lora_A.weight", "lora_B.weight"} - state_dict.keys()
        if missing:
            raise ValueError(f"adapter state dict is missing {sorted(missing)}")
        with torch.no_grad():
            for name, param in (("lora_A.weight", self.lora_A.weight), ("lora_B.weight", self.lora_B.weight)):
                value = state_dict[name]
                if value.shape != param.shape:
                    raise ValueError(f"{name} has shape {list(value.shape)}, expected {list(param.shape)}")
                param.copy_(value)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}"


def tile_order_(model: nn.Module) -> list[str]:
    """Hold the packed weight of every :class:`Linear4bit` in ``model`` (LoRA bases included) in tile order where its
    shape allows it (out_features % 16 == 0, in_features % 64 == 0), as :meth:`Linear4bit.tile_order_`; returns the
    names of the layers that hold it so."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and _tile_order_fits(module.out_features, module.in_features):
            module.tile_order_()
            names.append(name)
    return names
