"""End-to-end QLoRA training step on a decoder with Llama-3-8B layer shapes (hidden 4096, intermediate 14336,
32 heads, 8 KV heads, vocab 128256), 2 and 4 layers, sequence 2048, batch 1, LoRA r = 16 on every linear layer,
bf16 compute, gradient checkpointing. Random weights from a LlamaConfig: nothing is downloaded.

Rows (impl), one training step each (forward, backward, optimizer), median over timed steps:
  qlora                  qlora.load_model + qlora.prepare_model (NF4 + double quant), qlora PagedAdamW8bit
  peft+bitsandbytes      transformers BitsAndBytesConfig (NF4 + double quant) + prepare_model_for_kbit_training
                         + PEFT LoRA, bitsandbytes PagedAdamW8bit (only when bitsandbytes is importable)
  peft bf16 LoRA         transformers bf16 model + PEFT LoRA, no quantization, torch fused AdamW
The note gives tokens/s and the peak GPU memory of the whole run (weights, activations, optimizer).
CUDA only; --quick runs a 1024-wide, 2-layer model at sequence 512.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.common import Context, Row

FULL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=128256)
QUICK = dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT = 16, 32, 0.05
WARMUP_STEPS, TIMED_STEPS = 3, 10


def _config(layers: int, quick: bool):
    from transformers import LlamaConfig
    return LlamaConfig(num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False, use_cache=False, **(QUICK if quick else FULL))


def _write_random_model(config, directory: Path, device: torch.device) -> None:
    """A bf16 checkpoint with random weights (made on the GPU, where initialization is fast)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    del model
    _free(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _build_qlora(directory: Path, device: torch.device):
    import qlora
    model = qlora.load_model(directory, dtype=torch.bfloat16, progress=False)  # host memory
    qlora.prepare_model(model, target_modules=TARGETS, r=R, alpha=ALPHA, dropout=DROPOUT,
                        compute_dtype=torch.bfloat16, device=device, gradient_checkpointing=True, progress=False,
                        verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = qlora.optim.PagedAdamW8bit if device.type == "cuda" else qlora.optim.AdamW8bit
    return model, optim(params, lr=2e-4, weight_decay=0.0)


def _peft(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def _build_bnb(directory: Path, device: torch.device, bnb):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from qlora.models import _transformers_dtype_kwarg
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map={"": device.index or 0},
                                                 **_transformers_dtype_kwarg(torch.bfloat16))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = _peft(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)


def _build_bf16_lora(directory: Path, device: torch.device):
    from transformers import AutoModelForCausalLM
    from qlora.models import _transformers_dtype_kwarg, enable_gradient_checkpointing, enable_input_require_grads
    model = AutoModelForCausalLM.from_pretrained(directory, **_transformers_dtype_kwarg(torch.bfloat16)).to(device)
    enable_gradient_checkpointing(model)
    enable_input_require_grads(model)
    model = _peft(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=device.type == "cuda")


def measure(build, device: torch.device, seq_len: int, vocab: int, steps: int = TIMED_STEPS,
            warmup: int = WARMUP_STEPS) -> tuple[float, float, float]:
    """Build a model with ``build()`` and train it; returns (median step seconds, tokens/s, peak GiB).

    The peak counts everything on the GPU from the model's construction on: weights, activations, optimizer.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    model, opt = build()
    model.train()
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        ids = torch.randint(0, vocab, (1, seq_len), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, opt
    _free(device)
    step_s = statistics.median(times)
    return step_s, seq_len / step_s, peak


def run(ctx: Context) -> list[Row]:
    if not ctx.cuda:
        print("[e2e] skipped: needs a CUDA GPU", flush=True)
        return []
    try:
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as exc:
        print(f"[e2e] skipped: {exc}", flush=True)
        return []
    rows: list[Row] = []
    seq_len = 512 if ctx.quick else 2048
    for layers in ((2,) if ctx.quick else (2, 4)):
        config = _config(layers, ctx.quick)
        shape = f"L={layers} h={config.hidden_size} seq={seq_len} b=1"
        impls = [("qlora", lambda d: _build_qlora(d, ctx.device))]
        if ctx.bnb is not None:
            impls.append(("peft+bitsandbytes", lambda d: _build_bnb(d, ctx.device, ctx.bnb)))
        impls.append(("peft bf16 LoRA", lambda d: _build_bf16_lora(d, ctx.device)))
        with tempfile.TemporaryDirectory(prefix="qlora-e2e-") as tmp:
            directory = Path(tmp)
            _write_random_model(config, directory, ctx.device)
            for impl, build in impls:
                try:
                    step_s, tok_s, peak = measure(lambda: build(directory), ctx.device, seq_len, config.vocab_size)
                except Exception as exc:  # one failing implementation must not end the run
                    print(f"[e2e] {impl} {shape} failed: {type(exc).__name__}: {exc}", flush=True)
                    traceback.print_exc()
                    _free(ctx.device)
                    continue
                print(f"[e2e] {impl:18} {shape}: {step_s * 1e3:8.1f} ms/step  {tok_s:9.0f} tokens/s  "
                      f"peak {peak:6.2f} GiB", flush=True)
                rows.append(Row("e2e", "train step (fwd+bwd+optim)", shape, impl, step_s * 1e6,
                                note=f"{tok_s:.0f} tok/s, peak {peak:.2f} GiB"))
    return rows
