"""The ``qlora finetune`` command: the embedded default run, user data files, the saved adapter, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch

import qlora

pytest.importorskip("transformers")
pytest.importorskip("tqdm")
peft = pytest.importorskip("peft")

from qlora import finetune  # noqa: E402
from qlora.tokenizer import ByteTokenizer  # noqa: E402


def test_default_run_lowers_the_loss_and_saves_a_peft_adapter(tmp_path, capsys):
    # The defaults, with fewer steps to keep the test short.
    result = finetune.run(["--output", str(tmp_path / "out"), "--steps", "30", "--no-progress"])
    out = capsys.readouterr().out
    assert len(result.losses) == 30 and all(map(lambda v: v == v, result.losses))
    assert result.optimizer == ("paged_adamw8bit" if torch.cuda.is_available() else "adamw8bit")
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, result.losses
    assert result.eval_after < result.eval_before - 0.5
    assert result.tokens_per_s > 0
    assert f"first {result.first_loss:.4f} -> last {result.last_loss:.4f}" in out
    assert str(result.adapter_dir) in out

    # The adapter is PEFT's format and PEFT loads it onto the saved base model.
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == sorted(qlora.models.LLAMA_TARGET_MODULES)
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base_model")
    merged = peft.PeftModel.from_pretrained(base, adapter)
    lora_b = merged.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # trained, not the zero initialization


def test_parser_defaults_are_the_documented_ones():
    args = finetune.build_parser().parse_args([])
    assert args.model == "embedded" and args.data is None and args.steps == 100 and args.r == 16
    assert args.quant_type == "nf4" and not args.no_double_quant and not args.no_gradient_checkpointing
    assert args.target_modules == "all-linear" and args.optimizer == "auto"
    assert finetune.embedded_corpus_path().is_file()


def test_jsonl_data_and_a_local_model_directory(tmp_path, capsys):
    model, tokenizer = finetune.tiny_llama(seed=1, num_hidden_layers=1)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lines = [json.dumps({"text": f"record {i}: the quick brown fox jumps over the lazy dog."}) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    result = finetune.run(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
                           "--output", str(tmp_path / "out"), "--steps", "12", "--seq-len", "32",
                           "--batch-size", "4", "--lr", "3e-3", "--target-modules", "q_proj,v_proj,down_proj",
                           "--no-progress", "--merge-to", str(tmp_path / "merged")])
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert next(merged.parameters()).dtype == torch.bfloat16
    assert (tmp_path / "merged" / "qlora_tokenizer.json").exists()


def test_load_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nover two lines\n")
    assert finetune.load_texts(tmp_path / "a.txt") == ["plain text\nover two lines\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert finetune.load_texts(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"content": "two"}\n')
    with pytest.raises(ValueError, match="line 2 has no string field \"text\""):
        finetune.load_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        finetune.load_texts(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="too few for --seq-len 512"):
        finetune.TokenData(["short"], ByteTokenizer(), 512)


def test_token_data_windows_and_eval_split():
    data = finetune.TokenData(["abcdefghij" * 30], ByteTokenizer(), seq_len=16, eval_fraction=0.2, seed=3)
    assert data.num_tokens == 302 and data.eval.shape == (3, 16)
    batch = data.batch(5)
    assert batch.shape == (5, 16)
    stream = data.train_stream.tolist()
    for row in batch.tolist():  # each row is a contiguous window of the training stream
        assert any(stream[s: s + 16] == row for s in range(len(stream) - 15))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "-2"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--dropout", "1.5"], "--dropout must be in"),
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--model", "/nonexistent/model"], "not a local model directory"),
    (["--data", "/nonexistent/data.jsonl"], "is not a file"),
    (["--quant-type", "int3"], "invalid choice"),
    (["--device", "tpu"], "--device"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        finetune.run(argv + ["--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_target_modules_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="target_modules"):
        finetune.run(["--target-modules", "nope_proj", "--steps", "1", "--output", str(tmp_path / "o"),
                      "--no-progress"])


def test_qlora_command_dispatch(capsys):
    from qlora.__main__ import main
    assert main(["--help"]) == 0
    assert "finetune" in capsys.readouterr().out
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--help"])
    assert exc.value.code == 0
    assert "--target-modules" in capsys.readouterr().out


def _quality_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "quality_check.py"
    spec = importlib.util.spec_from_file_location("quality_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_check_seeds_and_target(capsys):
    """tools/quality_check.py compares once a seed, judges the mean gap, and its exit status follows the target."""
    quality_check = _quality_check()
    tiny = ["--device", "cpu", "--pretrain-steps", "1", "--steps", "1", "--seq-len", "32", "--batch-size", "2"]
    status = quality_check.main(tiny + ["--seeds", "0", "1", "--tolerance", "1.0"])
    out = capsys.readouterr().out
    gaps = [float(line.rsplit("relative gap ", 1)[1].rstrip("%")) for line in out.splitlines()
            if line.startswith("seed ")]
    assert len(gaps) == 2, out
    summary = out.strip().splitlines()[-1]
    assert "mean over 2 seeds" in summary and summary.endswith("PASS"), summary
    mean = float(summary.split("relative eval-loss gap ")[1].split("%")[0])
    assert mean == pytest.approx(sum(gaps) / 2, abs=0.006)  # each printed to 0.01 %
    assert status == 0
    assert quality_check.main(tiny + ["--seeds", "0", "--tolerance", "-1.0"]) == 1  # no gap is below -100 %
    assert capsys.readouterr().out.strip().endswith("FAIL")
