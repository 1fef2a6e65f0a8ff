"""qlora: QLoRA fine-tuning on one GPU.

Frozen base weights in 4 bits (NF4 or FP4, bitsandbytes-compatible), trainable LoRA adapters, and
optimizer states that page out of GPU memory. Every kernel is a torch op, ``torch.ops.qlora.*``.
"""

import torch  # noqa: F401  (loads libtorch before the operator library)

from . import _C  # noqa: F401  (registers torch.ops.qlora.*)
from . import _ops  # noqa: F401  (fake kernels)
from .codebook import dynamic_map
from .lora_linear import lora_linear_4bit
from .quantization import QuantState, dequantize_4bit, quantize_4bit, row_order, tile_order
from . import nn  # noqa: E402  (qlora.nn: Linear4bit, LoraLinear4bit)
from . import optim  # noqa: E402  (qlora.optim: fused and paged AdamW)
from .models import ModelReport, load_model, model_report, prepare_model  # noqa: E402
from .adapters import adapter_state_dict, load_adapter, merge_model, save_adapter  # noqa: E402

__version__ = "0.1.0"

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "tile_order", "row_order", "dynamic_map",
           "lora_linear_4bit", "nn", "optim", "prepare_model", "load_model", "model_report", "ModelReport",
           "save_adapter", "load_adapter", "adapter_state_dict", "merge_model"]
