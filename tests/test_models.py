"""Whole models: prepare_model on a small transformers Llama, bitsandbytes-format checkpoints, PEFT adapters in
both directions, and merging for export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import qlora
from qlora.models import _transformers_dtype_kwarg
from qlora.nn import Linear4bit, LoraLinear4bit

from conftest import CUDA, cuda_only

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 97
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tokens(batch=2, seq=16):
    return torch.randint(0, VOCAB, (batch, seq))


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def dequantized_copy(model: nn.Module, qmodel: nn.Module) -> nn.Module:
    """``model`` with each converted layer's weight replaced by the dequantized 4-bit weight."""
    dense = copy.deepcopy(model)
    for name, m in qmodel.named_modules():
        if isinstance(m, LoraLinear4bit):
            dense.get_submodule(name).weight.data.copy_(m.base.dequantize(torch.float32))
    return dense


def randomize_adapters_(model, std=0.05):
    for m in model.modules():
        if isinstance(m, LoraLinear4bit):
            nn.init.normal_(m.lora_B.weight, std=std)


# ---- prepare_model ------------------------------------------------------------------------------------------

def test_prepare_model_converts_all_linear_but_lm_head_and_stays_close():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    names = linear_names(model)
    assert len(names) == 2 * len(TARGETS)
    weight_errors = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        packed, qs = qlora.quantize_4bit(w)
        weight_errors.append(float((qlora.dequantize_4bit(packed, qs) - w).norm() / w.norm()))

    qlora.prepare_model(model, r=8, dropout=0.0, compute_dtype=torch.float32, progress=False, verbose=False)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoraLinear4bit) and layer.base.quant_type == "nf4" and layer.base.absmax2 is not None
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoraLinear4bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)

    x = tokens()
    with torch.no_grad():
        ours = model(x).logits
        exact = dequantized_copy(ref, model)(x).logits
        full = ref(x).logits
    # Same function as the dense model holding the dequantized weights (fresh adapters add zero) ...
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4)
    # ... and within NF4's error of the unquantized model: the logits' relative error is of the order of the
    # weights' (about 0.1 for NF4 on Gaussian weights), not larger.
    rel = float((ours - full).norm() / full.norm())
    assert 0 < rel < 2 * max(weight_errors), (rel, max(weight_errors))


def test_prepare_model_report_counts_parameters_and_memory(capsys):
    model = tiny_llama()
    dense_total = sum(p.numel() for p in model.parameters())
    numels = [model.get_submodule(n).weight.numel() for n in linear_names(model)]
    linear_numel = sum(numels)
    qlora.prepare_model(model, r=4, compute_dtype=torch.float32, progress=False)
    printed = capsys.readouterr().out
    report = qlora.model_report(model)
    lora_numel = sum(m.r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoraLinear4bit))
    assert report.quantized_layers == 2 * len(TARGETS)
    assert report.trainable_params == lora_numel
    assert report.total_params == dense_total + lora_numel
    assert report.base_bytes_full == 4 * linear_numel
    # Per layer: 4 bits a weight, one uint8 absmax per 64 weights, a float32 scale per 256 absmax, the 256-entry
    # float32 code table of the second level and its offset.
    blocks = [-(-n // 64) for n in numels]
    assert report.base_bytes_4bit == sum((n + 1) // 2 + b + 4 * -(-b // 256) + 4 * 256 + 4
                                         for n, b in zip(numels, blocks))
    assert report.saved_bytes == report.base_bytes_full - report.base_bytes_4bit
    assert report.tile_ordered_layers == 0 and "tile order" not in str(report)
    tiled = qlora.nn.tile_order_(model)
    assert tiled and qlora.model_report(model).tile_ordered_layers == len(tiled)
    assert f"({len(tiled)} in tile order)" in str(qlora.model_report(model))
    assert f"{report.trainable_params:,}" in printed and "saved" in printed


def test_prepare_model_loss_falls_and_only_adapters_change():
    model = tiny_llama()
    qlora.prepare_model(model, r=8, dropout=0.0, compute_dtype=torch.float32, progress=False, verbose=False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = qlora.optim.AdamW8bit(params, lr=1e-2)
    x = tokens(4, 32)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant):
    model = tiny_llama()
    qlora.prepare_model(model, r=4, dropout=0.0, compute_dtype=torch.float32, progress=False, verbose=False)
    randomize_adapters_(model)
    model.train()
    x = tokens()

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    # Reentrant checkpointing (transformers' old default) needs the embeddings' output to require grad, which
    # prepare_model arranges; without it the adapters would get no gradient at all.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.config.use_cache = False
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    first = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert plain[first].abs().sum() > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_prepare_model_bf16_default_on_a_float32_model():
    # The 4-bit layers compute in bfloat16; the rest of the model follows, or attention would mix dtypes.
    model = tiny_llama()
    qlora.prepare_model(model, r=4, progress=False, verbose=False)
    dense = {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert set(dense.values()) == {torch.bfloat16}
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32
    x = tokens()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_proj.lora_B.weight.grad.abs().sum() > 0


def test_prepare_model_target_modules():
    model = tiny_llama()
    qlora.prepare_model(model, target_modules=["q_proj", "v_proj"], r=4, progress=False, verbose=False)
    converted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)}
    assert converted == {"q_proj", "v_proj"}
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)

    model = tiny_llama()
    qlora.prepare_model(model, target_modules=r"model\.layers\.1\.mlp\..*", r=4, progress=False, verbose=False)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear4bit))
    assert converted == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_prepare_model_plain_torch_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = torch.randn(5, 64)
    ref = model(x)
    qlora.prepare_model(model, r=4, compute_dtype=torch.float32, progress=False, verbose=False)
    assert all(isinstance(model[i], LoraLinear4bit) for i in (0, 2))
    out = model(x)
    assert float((out - ref).norm() / ref.norm()) < 0.2
    out.sum().backward()
    assert model[0].lora_A.weight.grad is not None and model[0].base.bias.grad is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["nope"]), "target_modules"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=5), "target_modules"),
    (dict(r=0), "r must be"),
    (dict(dropout=1.0), "dropout"),
    (dict(alpha=0), "alpha"),
    (dict(compute_dtype=torch.int8), "compute_dtype"),
    (dict(quant_type="int4"), "quant_type"),
])
def test_prepare_model_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qlora.prepare_model(tiny_llama(1), progress=False, verbose=False, **kwargs)


@cuda_only
def test_prepare_model_quantizes_layer_by_layer_on_the_gpu():
    torch.manual_seed(0)
    width = 2048
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(6)])  # 16 MiB each in fp32
    layer_bytes = width * width * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    qlora.prepare_model(model, r=8, device="cuda", progress=False, verbose=False)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated() - before
    assert all(m.base.weight.is_cuda for m in model)
    # The converted model plus one layer's full-precision copy (and its quantization temporaries), never two.
    assert peak < (after - before) + 1.6 * layer_bytes, (peak, after - before, layer_bytes)


# ---- bitsandbytes-format checkpoints ------------------------------------------------------------------------

def write_bnb_checkpoint(model: nn.Module, directory, compute_dtype="float32", skip=("lm_head",)):
    """A model directory as transformers + bitsandbytes write it: config.json with a 4-bit quantization_config and
    safetensors whose quantized layers hold weight, weight.absmax, weight.quant_map, weight.nested_absmax,
    weight.nested_quant_map and weight.quant_state.bitsandbytes__nf4. Returns {layer: (packed, QuantState)}."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": list(skip)}
    (directory / "config.json").write_text(json.dumps(cfg))
    tensors, quantized = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip:
            packed, qs = qlora.quantize_4bit(module.weight.detach(), 64, "nf4", double_quant=True)
            quantized[name] = (packed, qs)
            tensors[f"{name}.weight"] = packed
            for key, value in qs.as_dict(packed=True).items():
                tensors[f"{name}.weight.{key}"] = value
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in quantized:
            tensors[key] = value.contiguous()
    safetensors_torch.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return quantized


def test_load_bnb_format_checkpoint_reproduces_dequantized_weights(tmp_path):
    model = tiny_llama()
    quantized = write_bnb_checkpoint(model, tmp_path / "m")
    keys = safetensors_torch.load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    suffixes = {k.split(".weight", 1)[1] for k in keys if k.startswith("model.layers.0.self_attn.q_proj.weight")}
    assert suffixes == {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                        ".quant_state.bitsandbytes__nf4"}

    loaded = qlora.load_model(tmp_path / "m", progress=False)
    for name, (packed, qs) in quantized.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, Linear4bit) and layer.compute_dtype == torch.float32
        assert torch.equal(layer.dequantize(), qlora.dequantize_4bit(packed, qs))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())

    x = tokens()
    reference = qlora.prepare_model(copy.deepcopy(model), dropout=0.0, compute_dtype=torch.float32, progress=False,
                                    verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=0, atol=0)

    # The loaded 4-bit layers take adapters without being quantized again, and train.
    qlora.prepare_model(loaded, r=4, progress=False, verbose=False)
    layer = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, LoraLinear4bit)
    assert torch.equal(layer.base.dequantize(), qlora.dequantize_4bit(*quantized["model.layers.1.mlp.down_proj"]))
    loaded(input_ids=x, labels=x).loss.backward()
    assert layer.lora_A.weight.grad is not None


def test_load_bnb_format_checkpoint_errors(tmp_path):
    model = tiny_llama(1)
    write_bnb_checkpoint(model, tmp_path / "m")
    tensors = safetensors_torch.load_file(str(tmp_path / "m" / "model.safetensors"))
    del tensors["model.norm.weight"]
    safetensors_torch.save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks weights for.*model.norm.weight"):
        qlora.load_model(tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="no config.json"):
        qlora.load_model(tmp_path / "nothing", progress=False)


@cuda_only
def test_load_checkpoint_saved_by_bitsandbytes(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    model = tiny_llama()
    model.save_pretrained(tmp_path / "dense")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config, device_map="cuda")
    theirs.save_pretrained(tmp_path / "bnb")
    ours = qlora.load_model(tmp_path / "bnb", device="cuda", progress=False)
    count = 0
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            expected = bnb.functional.dequantize_4bit(w.data, w.quant_state)
            layer = ours.get_submodule(name)
            assert isinstance(layer, Linear4bit) and layer.compute_dtype == torch.bfloat16
            torch.testing.assert_close(layer.dequantize(), expected, rtol=0, atol=0)
            count += 1
    assert count == 2 * len(TARGETS)


# ---- PEFT adapters ------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def test_adapter_saved_by_qlora_loads_in_peft(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    qlora.prepare_model(model, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, progress=False,
                        verbose=False)
    randomize_adapters_(model)
    qlora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    keys = safetensors_torch.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    peft_model = peft.PeftModel.from_pretrained(dequantized_copy(base, model), tmp_path / "adapter").eval()
    ours = qlora.adapter_state_dict(model)
    theirs = peft.get_peft_model_state_dict(peft_model)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_adapter_saved_by_peft_loads_in_qlora(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    lora_config = peft.LoraConfig(r=6, lora_alpha=12, lora_dropout=0.0, target_modules=list(TARGETS),
                                  task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(base), lora_config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path / "adapter")

    qlora.prepare_model(model, r=16, compute_dtype=torch.float32, progress=False, verbose=False)
    qlora.load_adapter(model, tmp_path / "adapter")
    layer = model.get_submodule("model.layers.1.mlp.gate_proj")
    assert layer.r == 6 and layer.scaling == 2.0
    theirs = peft.get_peft_model_state_dict(peft_model)
    for key, value in qlora.adapter_state_dict(model).items():
        assert torch.equal(value, theirs[key]), key

    # PEFT on the dense model that holds qlora's dequantized weights computes the same function.
    reference = peft.PeftModel.from_pretrained(dequantized_copy(base, model), tmp_path / "adapter").eval()
    model.eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-4, atol=1e-4)


def test_load_adapter_errors(tmp_path):
    model = tiny_llama(1)
    qlora.prepare_model(model, r=4, progress=False, verbose=False)
    qlora.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        qlora.load_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        qlora.load_adapter(model, tmp_path / "missing")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    dense = tiny_llama(1)
    with pytest.raises(ValueError, match="not a 4-bit layer"):
        qlora.load_adapter(dense, tmp_path / "a")
    with pytest.raises(ValueError, match="no LoRA layers"):
        qlora.save_adapter(dense, tmp_path / "b")


# ---- merging and export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_merge_and_export_round_trips_through_save_pretrained(tmp_path, dtype, tol):
    model = tiny_llama()
    qlora.prepare_model(model, r=4, dropout=0.0, compute_dtype=torch.float32, progress=False, verbose=False)
    randomize_adapters_(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
    merged = qlora.merge_model(model, dtype)
    assert not any(isinstance(m, (Linear4bit, LoraLinear4bit)) for m in merged.modules())
    assert all(p.dtype == dtype for p in merged.parameters())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", **_transformers_dtype_kwarg(dtype)).eval()
    with torch.no_grad():
        got = reloaded(x).logits.float()
    # bf16: one rounding of weights and activations (logits here are about 1 in size).
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
