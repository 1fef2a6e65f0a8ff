"""Whole models: turn the linear layers of any PyTorch model (Hugging Face causal LMs included) into frozen 4-bit
LoRA layers, load bitsandbytes 4-bit checkpoints without bitsandbytes, and report what it saved."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .nn.linear import Linear4bit, LoraLinear4bit

__all__ = ["prepare_model", "load_model", "model_report", "ModelReport", "enable_input_require_grads",
           "enable_gradient_checkpointing", "find_target_modules"]

#: Hugging Face's names for the attention and MLP projections of Llama, Mistral and Qwen models.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_TargetModules = Union[str, Sequence[str]]


# ---- choosing layers ------------------------------------------------------------------------------------

def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the layers that produce the logits; "all-linear" leaves them out, as PEFT does, because they are
    large, tied to the input embeddings in many models, and adapting them rarely helps."""
    names = {"lm_head"}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        out = get_output()
        if out is not None:
            names |= {name for name, m in model.named_modules() if m is out}
    return names


def _matches(name: str, target_modules: _TargetModules) -> bool:
    if isinstance(target_modules, str):
        # A string other than "all-linear" is a regular expression the whole module name must match (PEFT's rule).
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules: _TargetModules = "all-linear") -> list[str]:
    """Names of the layers :func:`prepare_model` would convert.

    Parameters
    ----------
    model : nn.Module
    target_modules : str or sequence of str
        ``"all-linear"``: every ``nn.Linear`` (and already-quantized :class:`~qlora.nn.Linear4bit`) except the output
        layer (``lm_head``). A sequence: layers whose name is, or ends with ``"."`` plus, one of its entries
        (``["q_proj", "v_proj"]``). Another string: a regular expression the full module name must match.

    Raises
    ------
    ValueError
        If ``target_modules`` is empty or of the wrong type.
    """
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be 'all-linear', a regex or a non-empty list of module names, "
                             f"got {target_modules!r}")
    elif not isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be 'all-linear', a regex or a non-empty list of module names, "
                         f"got {target_modules!r}")
    excluded = _output_layer_names(model) if target_modules == "all-linear" else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Linear4bit)) or isinstance(module, LoraLinear4bit):
            continue
        if target_modules == "all-linear":
            if name not in excluded and name.rsplit(".", 1)[-1] != "lm_head":
                names.append(name)
        elif _matches(name, target_modules):
            names.append(name)
    return names


# ---- conversion -------------------------------------------------------------------------------------------

def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so that reentrant gradient checkpointing
    (``torch.utils.checkpoint(use_reentrant=True)``, the default of older transformers) still sends gradients to
    the adapters although every layer below them is frozen. Same as PEFT's and transformers' helper of this name;
    models without ``get_input_embeddings`` are left alone (non-reentrant checkpointing needs nothing)."""
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
        return
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    if embeddings is not None:
        embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on a Hugging Face model's (non-reentrant) gradient checkpointing and turn off its KV cache, which is
    useless in training and conflicts with checkpointing.

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``; either is used.
    """
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"gradient checkpointing needs a model with gradient_checkpointing_enable "
                         f"(Hugging Face), {type(model).__name__} has none")
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False


def prepare_model(model: nn.Module, target_modules: _TargetModules = "all-linear", r: int = 16, alpha: float = 32.0,
                  dropout: float = 0.05, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: Optional[torch.dtype] = torch.bfloat16, blocksize: int = 64, device=None,
                  adapter_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                  progress: bool = True, verbose: bool = True) -> nn.Module:
    """Turn a model into a QLoRA model in place: chosen linear layers become frozen 4-bit layers with trainable
    LoRA adapters (:class:`qlora.nn.LoraLinear4bit`) and every other parameter is frozen.

    Layers are quantized one at a time: each weight is copied to ``device``, quantized there, and its
    full-precision copy dropped before the next, so a model held in host memory never has more than one layer's
    full-precision weight on the GPU.

    Parameters
    ----------
    model : nn.Module
        Any model; Hugging Face causal LMs (Llama, Mistral, Qwen, ...) included. Layers that are already
        :class:`~qlora.nn.Linear4bit` (from :func:`load_model` of a 4-bit checkpoint) get adapters without being
        quantized again.
    target_modules : str or sequence of str
        Which layers; see :func:`find_target_modules`. Default ``"all-linear"`` (all but ``lm_head``).
    r, alpha, dropout :
        LoRA rank, scaling numerator (the adapter is scaled by ``alpha / r``) and dropout on its input.
    quant_type, double_quant, blocksize :
        4-bit format of the frozen weights (bitsandbytes' defaults for QLoRA: NF4, double quantization, 64).
    compute_dtype : torch.dtype, optional
        dtype the model computes in: the 4-bit layers cast their inputs to it and return it, and every other
        floating-point parameter (embeddings, norms, ``lm_head``) is cast to it too, so that dtypes never mix.
        None: each layer computes in its weight's dtype and nothing is cast.
    device : optional
        Where the quantized layers, and afterwards the rest of the model, go. None: where each weight is.
    adapter_dtype : torch.dtype
        dtype of the LoRA weights. float32 (the default, as in PEFT) keeps small updates from being lost to
        rounding; they are cast to the compute dtype in the forward pass.
    gradient_checkpointing : bool
        Also call ``model.gradient_checkpointing_enable`` (Hugging Face models) with non-reentrant checkpointing.
        Reentrant checkpointing, enabled later by the caller, works too: inputs are made to require grad.
    progress, verbose : bool
        Show a progress bar while quantizing; print the :func:`model_report` afterwards.

    Returns
    -------
    nn.Module
        ``model`` itself, converted.

    Raises
    ------
    ValueError
        If no layer matches ``target_modules``, or an argument is out of range (the message names it).
    """
    if r < 1:
        raise ValueError(f"r must be at least 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if compute_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"compute_dtype must be float32, float16, bfloat16 or None, got {compute_dtype}")
    names = find_target_modules(model, target_modules)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear layer of "
                         f"{type(model).__name__}")
    device = torch.device(device) if device is not None else None

    for p in model.parameters():
        p.requires_grad_(False)
    for name in _progress(names, progress, "quantizing"):
        layer = model.get_submodule(name)
        if isinstance(layer, Linear4bit):
            base = layer if device is None else layer.to(device)
            if compute_dtype is not None:
                base.compute_dtype = compute_dtype
        else:
            base = Linear4bit.from_linear(layer, blocksize=blocksize, quant_type=quant_type,
                                          double_quant=double_quant, compute_dtype=compute_dtype, device=device)
        lora = LoraLinear4bit(base, r=r, alpha=alpha, dropout=dropout, dtype=adapter_dtype)
        model.set_submodule(name, lora)
        del layer  # the full-precision weight goes with the last reference to the layer
    if compute_dtype is not None:
        _cast_dense_parameters_(model, compute_dtype)
    if device is not None:
        model.to(device)
    enable_input_require_grads(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if verbose:
        print(model_report(model))
    return model


def _cast_dense_parameters_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters outside the 4-bit layers and their adapters (embeddings, norms,
    lm_head, untargeted linears) to ``dtype``. The 4-bit layers return their compute dtype, so a model left in
    another dtype would mix them (an attention's query in float32 beside a value in bfloat16, say)."""
    skip = set()
    for m in model.modules():
        if isinstance(m, (Linear4bit, LoraLinear4bit)):
            skip |= {id(p) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in skip and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library; the command line requires it
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)


# ---- report -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelReport:
    """What a QLoRA model holds.

    Attributes
    ----------
    quantized_layers : int
        Number of 4-bit layers (with or without adapter).
    trainable_params, total_params : int
        Parameters that require grad; all parameters, with each 4-bit weight counted at its logical size.
    base_bytes_full, base_bytes_4bit : int
        The 4-bit layers' weights at their original dtype, and as stored (codes and scales).
    adapter_bytes : int
        Memory of the LoRA weights.
    tile_ordered_layers : int
        4-bit layers holding their weight in tile order (:meth:`qlora.nn.Linear4bit.tile_order_`).
    """

    quantized_layers: int
    trainable_params: int
    total_params: int
    base_bytes_full: int
    base_bytes_4bit: int
    adapter_bytes: int
    tile_ordered_layers: int = 0

    @property
    def saved_bytes(self) -> int:
        return self.base_bytes_full - self.base_bytes_4bit

    def __str__(self) -> str:
        order = f" ({self.tile_ordered_layers} in tile order)" if self.tile_ordered_layers else ""
        return (f"qlora: {self.quantized_layers} layers in 4 bits{order}; trainable params: {self.trainable_params:,} of "
                f"{self.total_params:,} ({100 * self.trainable_params / max(self.total_params, 1):.3f}%); "
                f"base weights {_human(self.base_bytes_full)} -> {_human(self.base_bytes_4bit)} "
                f"({_human(self.saved_bytes)} saved), adapters {_human(self.adapter_bytes)}")


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def model_report(model: nn.Module) -> ModelReport:
    """Count the parameters and the memory of a model converted by :func:`prepare_model` or :func:`load_model`."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    full = sum(m.out_features * m.in_features * torch.empty((), dtype=m.weight_dtype).element_size() for m in layers)
    packed = sum(_nbytes(m.weight) + _nbytes(m.absmax) + _nbytes(m.absmax2) + _nbytes(m.code2) + _nbytes(m.offset)
                 for m in layers)
    adapters = [p for m in model.modules() if isinstance(m, LoraLinear4bit)
                for p in (m.lora_A.weight, m.lora_B.weight)]
    params = list(model.parameters())
    return ModelReport(
        quantized_layers=len(layers),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params) + sum(m.out_features * m.in_features for m in layers),
        base_bytes_full=full, base_bytes_4bit=packed, adapter_bytes=sum(_nbytes(p) for p in adapters),
        tile_ordered_layers=sum(m.tile_ordered for m in layers))


# ---- loading ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta():
    """Create modules with their parameters on the meta device (no memory, no init), buffers left real: the
    rotary embeddings' non-persistent buffers are computed in __init__ and are not in checkpoints."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(directory)!r} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


def _transformers_dtype_kwarg(dtype) -> dict:
    import transformers
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_model(model_dir: Union[str, Path], dtype: Optional[torch.dtype] = None, device=None,
               compute_dtype: Optional[torch.dtype] = None, progress: bool = True) -> nn.Module:
    """Load a Hugging Face causal LM from a local directory, without downloads and without bitsandbytes.

    A directory holding a bitsandbytes 4-bit checkpoint (``quantization_config`` with ``load_in_4bit`` in
    config.json; safetensors with ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
    ``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__nf4`` entries) loads its quantized layers
    as frozen :class:`qlora.nn.Linear4bit` layers, which dequantize to exactly bitsandbytes' values. Other
    checkpoints load as usual (in host memory unless ``device`` is given); :func:`prepare_model` then quantizes
    them layer by layer.

    Parameters
    ----------
    model_dir : str or Path
    dtype : torch.dtype, optional
        dtype of the unquantized weights (default: as stored).
    device : optional
        Where to put the model (default: the host).
    compute_dtype : torch.dtype, optional
        Compute dtype of the 4-bit layers (default: the checkpoint's ``bnb_4bit_compute_dtype``, else the
        dtype the weights had before quantization).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"model_dir {str(model_dir)!r} is not a model directory (no config.json)")
    raw = json.loads((model_dir / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        if qc:
            raise ValueError(f"model_dir {str(model_dir)!r} holds a {qc.get('quant_method', 'quantized')} checkpoint "
                             f"that is not bitsandbytes 4-bit; qlora loads only those")
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     **_transformers_dtype_kwarg(dtype or "auto"))
        return model if device is None else model.to(device)

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is built plain; its 4-bit layers are put in below
    if compute_dtype is None and isinstance(qc.get("bnb_4bit_compute_dtype"), str):
        compute_dtype = getattr(torch, qc["bnb_4bit_compute_dtype"].removeprefix("torch."), None)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    tensors = _read_safetensors(model_dir)
    marker = ".weight.quant_state.bitsandbytes__"
    quantized = sorted({k.split(marker)[0] for k in tensors if marker in k})
    target = torch.device(device) if device is not None else torch.device("cpu")
    for name in _progress(quantized, progress, "loading 4-bit layers"):
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"checkpoint has a 4-bit layer {name!r} that the model does not have") from exc
        prefix = name + "."
        state = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        lin4 = Linear4bit.from_bnb_state_dict(state, compute_dtype=compute_dtype, device=target)
        if (lin4.out_features, lin4.in_features) != (layer.out_features, layer.in_features):
            raise ValueError(f"4-bit layer {name!r} is [{lin4.out_features}, {lin4.in_features}] in the checkpoint "
                             f"but [{layer.out_features}, {layer.in_features}] in the model's config")
        lin4.requires_grad_(False)
        model.set_submodule(name, lin4)
    rest = {k: (v if dtype is None or not v.is_floating_point() else v.to(dtype)) for k, v in tensors.items()}
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint entries the model does not have: {result.unexpected_keys[:8]}")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # lm_head shares the (just assigned) input embeddings when the config says so
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"checkpoint lacks weights for {still_meta[:8]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(target)
