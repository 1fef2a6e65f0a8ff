"""LoRA adapters on disk in PEFT's format, and merging them into a dense model for export.

PEFT's format is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight`` (``lora_A`` is ``[r, in_features]``,
``lora_B`` ``[out_features, r]``). ``peft.PeftModel.from_pretrained`` loads what :func:`save_adapter` writes,
and :func:`load_adapter` loads what PEFT's ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .nn.linear import Linear4bit, LoraLinear4bit

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "merge_model", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _lora_layers(model: nn.Module) -> dict[str, LoraLinear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter of ``model`` under PEFT's keys (contiguous host copies)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; convert it with qlora.prepare_model first")
    out = {}
    for name, layer in layers.items():
        for key, value in layer.adapter_state_dict().items():
            out[f"{_PREFIX}{name}.{key}"] = value.cpu().contiguous()
    return out


def save_adapter(model: nn.Module, directory: Union[str, Path], base_model_name_or_path: Optional[str] = None,
                 task_type: str = "CAUSAL_LM") -> Path:
    """Write the adapters of ``model`` as a PEFT LoRA adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``) into ``directory``; returns the directory.

    All layers must share one rank and alpha (what :func:`qlora.prepare_model` makes); the config lists the
    adapted layers' short names as ``target_modules``.
    """
    from safetensors.torch import save_file
    layers = _lora_layers(model)
    tensors = adapter_state_dict(model)
    ranks = {(m.r, m.lora_alpha, m.lora_dropout) for m in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"save_adapter needs one (r, alpha, dropout) for all layers, found {sorted(ranks)}")
    (r, alpha, dropout), = ranks
    scaling = {m.scaling for m in layers.values()}
    use_rslora = scaling == {alpha / math.sqrt(r)} and scaling != {alpha / r}
    if not use_rslora and scaling != {alpha / r}:
        raise ValueError(f"layers have scalings {sorted(scaling)} that are neither alpha / r nor alpha / sqrt(r)")
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "use_rslora": use_rslora, "use_dora": False, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = directory / ADAPTER_CONFIG
    if not config_path.exists():
        raise ValueError(f"{str(directory)!r} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter peft_type must be LORA, got {config.get('peft_type')!r}")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(key) == bad:
            raise ValueError(f"adapter uses {key}={bad}, which qlora's LoRA layers do not support")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter trains biases (bias={config['bias']!r}); qlora supports bias='none' only")
    if config.get("modules_to_save"):
        raise ValueError(f"adapter has modules_to_save={config['modules_to_save']}; qlora supports LoRA weights only")
    weights = directory / ADAPTER_WEIGHTS
    if weights.exists():
        from safetensors.torch import load_file
        tensors = load_file(str(weights))
    elif (directory / "adapter_model.bin").exists():
        tensors = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{str(directory)!r} has no {ADAPTER_WEIGHTS}")
    return config, tensors


def load_adapter(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Load a PEFT LoRA adapter (written by PEFT or by :func:`save_adapter`) into ``model``, in place.

    Layers named by the adapter that are :class:`~qlora.nn.LoraLinear4bit` get its weights (their rank is
    changed to the adapter's if it differs); :class:`~qlora.nn.Linear4bit` layers get a new adapter. The scaling
    follows the adapter's config (``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``).

    Raises
    ------
    ValueError
        If the adapter names a layer the model lacks or that is not 4-bit, or uses a PEFT feature qlora has not
        (DoRA, trained biases, modules_to_save).
    """
    directory = Path(directory)
    config, tensors = _read_adapter(directory)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if name.endswith(suffix):
                    by_module.setdefault(name[: -len(suffix)], {})[f"{part}.weight"] = value
                    break
            else:
                continue
            break
        else:
            raise ValueError(f"adapter entry {key!r} is not a LoRA weight (lora_A / lora_B)")
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for name, state in by_module.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"adapter has weights for {name!r}, which the model does not have") from exc
        if "lora_A.weight" not in state or "lora_B.weight" not in state:
            raise ValueError(f"adapter for {name!r} lacks lora_A or lora_B")
        r = state["lora_A.weight"].shape[0]
        alpha = float(_pattern_value(alpha_pattern, name, alpha_default))
        if r != int(_pattern_value(rank_pattern, name, r_default)):
            raise ValueError(f"adapter for {name!r} has rank {r} but its config says "
                             f"{_pattern_value(rank_pattern, name, r_default)}")
        if isinstance(layer, LoraLinear4bit):
            if layer.r != r:
                layer = LoraLinear4bit(layer.base, r=r, alpha=alpha, dropout=layer.lora_dropout,
                                       dtype=layer.lora_A.weight.dtype)
                model.set_submodule(name, layer)
        elif isinstance(layer, Linear4bit):
            layer = LoraLinear4bit(layer, r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                                   dtype=torch.float32)
            model.set_submodule(name, layer)
        else:
            raise ValueError(f"adapter layer {name!r} is a {type(layer).__name__} in the model, not a 4-bit layer; "
                             f"convert the model with qlora.prepare_model first")
        layer.load_adapter_state_dict(state)
        layer.lora_alpha = alpha
        layer.scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return model


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key the module name ends with (or matches)."""
    import re
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name) or re.fullmatch(f".*\\.{key}", name):
            return value
    return default


@torch.no_grad()
def merge_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every 4-bit layer by a dense ``nn.Linear`` in ``dtype``, in place: LoRA layers with the adapter
    merged (``dequant(W) + scaling·B·A`` added in float32 and rounded once), plain 4-bit layers dequantized.

    The result is an ordinary model again: a Hugging Face model's ``save_pretrained`` writes it as a dense
    checkpoint that ``from_pretrained`` loads without qlora. Other floating-point parameters are cast to
    ``dtype`` too, and everything is made trainable-free (requires_grad False).
    """
    modules = dict(model.named_modules())
    lora_bases = {f"{name}.base" for name, m in modules.items() if isinstance(m, LoraLinear4bit)}
    replaced = 0
    for name, module in modules.items():
        if isinstance(module, LoraLinear4bit):
            model.set_submodule(name, module.merge(dtype))
            replaced += 1
        elif isinstance(module, Linear4bit) and name not in lora_bases:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.weight.device, dtype=dtype)
            dense.weight.copy_(module.dequantize(torch.float32))
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            model.set_submodule(name, dense)
            replaced += 1
    if replaced == 0:
        raise ValueError(f"{type(model).__name__} has no 4-bit layers to merge")
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "config", None) is not None and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model

