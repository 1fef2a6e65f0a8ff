"""4-bit quantization: the QuantState that describes a packed weight, and the functional API."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import torch

from .codebook import ABSMAX_BLOCKSIZE, BLOCKSIZES, QUANT_TYPES, code_values, dynamic_map

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "tile_order", "row_order"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor.

    Attributes
    ----------
    absmax : Tensor
        One float32 scale per block, or, when double-quantized, one uint8 code per block.
    shape, dtype :
        Shape and dtype of the original tensor (and of its dequantization).
    blocksize : int
        Consecutive elements sharing one absmax (32 ... 4096).
    quant_type : str
        ``"nf4"`` or ``"fp4"``.
    absmax2, code2, offset : Tensor, optional
        Double quantization: absmax = code2[absmax] * absmax2[block // 256] + offset.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def code(self) -> torch.Tensor:
        """The 16 values of the 4-bit codebook."""
        return code_values(self.quant_type, device=self.absmax.device)

    def to(self, device) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, absmax=move(self.absmax), absmax2=move(self.absmax2),
                                   code2=move(self.code2), offset=move(self.offset))

    # ---- bitsandbytes' serialized form --------------------------------------------------------------

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' ``QuantState.as_dict`` form.

        With ``packed=True``, only tensors: the non-tensor items are JSON in a uint8 tensor under
        ``quant_state.bitsandbytes__<quant_type>``, as Linear4bit state dicts (and safetensors files) hold them.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.double_quant:
            d.update({
                "nested_absmax": self.absmax2,
                "nested_blocksize": ABSMAX_BLOCKSIZE,
                "nested_quant_map": self.code2.clone(),
                "nested_dtype": "float32",
                "nested_offset": float(self.offset.item()),
            })
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(json.dumps(others).encode("utf-8")), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, d: dict[str, Any], device=None) -> "QuantState":
        """Inverse of :meth:`as_dict`; also takes state-dict keys with a prefix (``"weight.absmax"``).

        bitsandbytes is not needed. A codebook other than the standard NF4/FP4 one is refused, since the
        kernels cannot decode it.
        """
        items: dict[str, Any] = {}
        packed = []
        for key, value in d.items():
            if "quant_state.bitsandbytes__" in key:
                packed.append(value)
            else:
                items[key.rsplit(".", 1)[-1]] = value
        if len(packed) > 1:
            raise ValueError("expected one packed quant_state.bitsandbytes__* entry, found several")
        if packed:
            items.update(json.loads(bytes(packed[0].cpu().to(torch.uint8).tolist()).decode("utf-8")))
        missing = {"quant_type", "absmax", "blocksize", "dtype", "shape"} - items.keys()
        if missing:
            raise ValueError(f"quant state is missing {sorted(missing)}")
        quant_type = items["quant_type"]
        _check_quant_type(quant_type)
        _check_blocksize(items["blocksize"])
        if "quant_map" in items and not torch.equal(items["quant_map"].cpu().float(), code_values(quant_type)):
            raise ValueError(f"quant_map is not the standard {quant_type} codebook; qlora decodes only that one")
        nested = "nested_absmax" in items
        if nested:
            if int(items.get("nested_blocksize", ABSMAX_BLOCKSIZE)) != ABSMAX_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {ABSMAX_BLOCKSIZE}, got {items['nested_blocksize']}")
            if items.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"nested_dtype must be float32, got {items['nested_dtype']}")
        device = device if device is not None else items["absmax"].device
        return cls(
            absmax=items["absmax"].to(device),
            shape=torch.Size(items["shape"]),
            dtype=getattr(torch, items["dtype"]),
            blocksize=int(items["blocksize"]),
            quant_type=quant_type,
            absmax2=items["nested_absmax"].to(device) if nested else None,
            code2=items["nested_quant_map"].to(device=device, dtype=torch.float32) if nested else None,
            offset=torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=device) if nested else None,
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize a tensor to 4 bits in blocks.

    Parameters
    ----------
    A : Tensor
        float32, float16 or bfloat16, any shape, CPU or CUDA.
    blocksize : int
        Elements per block sharing one absmax: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
    quant_type : str
        ``"nf4"`` (normal float, best for normally distributed weights) or ``"fp4"``.
    double_quant : bool
        Also quantize the absmax to 8 bits in blocks of 256 (saves about 0.37 bits per weight at blocksize 64).

    Returns
    -------
    packed : Tensor
        uint8 ``[(numel + 1) // 2, 1]``, two codes per byte, the first element in the high nibble.
    quant_state : QuantState

    Notes
    -----
    The format is bitsandbytes': either library dequantizes the other's output to identical values.
    A block that holds NaN or ±Inf gets a non-finite absmax and dequantizes to non-finite values; with
    double quantization the mean of the absmax is then non-finite too, so the whole tensor does. All-zero
    blocks dequantize to exact zeros.
    """
    packed, absmax = torch.ops.qlora.quantize_4bit(A, blocksize, quant_type)
    if not double_quant:
        return packed, QuantState(absmax, A.shape, A.dtype, blocksize, quant_type)
    code2 = dynamic_map(signed=True, device=A.device)
    qabsmax, absmax2, offset = torch.ops.qlora.double_quantize(absmax, code2)
    return packed, QuantState(qabsmax, A.shape, A.dtype, blocksize, quant_type, absmax2, code2, offset)


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """Dequantize a packed 4-bit tensor to ``quant_state.shape`` and ``quant_state.dtype`` (one kernel launch,
    double quantization included)."""
    qs = quant_state
    return torch.ops.qlora.dequantize_4bit(packed, qs.absmax, qs.blocksize, qs.quant_type, list(qs.shape), qs.dtype,
                                           qs.absmax2, qs.code2, qs.offset)


def tile_order(packed: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """The bytes of a packed weight ``[out_features, in_features]`` in tile order, ``[out_features / 16,
    in_features / 64, 512]``: the order in which the CUDA tensor-core kernels read a 16-row tile as one run of 512
    bytes. Every op that takes packed bytes takes either order and gives the same values; bitsandbytes' row-major
    order stays the format of checkpoints and of :meth:`QuantState.as_dict` (:func:`row_order` converts back).

    Needs out_features % 16 == 0 and in_features % 64 == 0.
    """
    if len(quant_state.shape) != 2:
        raise ValueError(f"tile order is for a weight [out_features, in_features], got shape {list(quant_state.shape)}")
    return torch.ops.qlora.tile_order_4bit(packed, list(quant_state.shape))


def row_order(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' row-major bytes ``[(numel + 1) // 2, 1]`` of a packed weight in either order (a copy)."""
    return torch.ops.qlora.row_order_4bit(packed)
