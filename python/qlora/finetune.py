"""``qlora finetune``: QLoRA fine-tuning of a causal language model from a local directory on a local text file.

    qlora finetune                                   # embedded demo: tiny Llama + bundled corpus, no download
    qlora finetune --model ./Llama-3-8B --data train.jsonl --steps 1000 --output out
    python -m qlora.finetune --help

The frozen base weights are NF4 with double quantization, every linear layer but ``lm_head`` gets a LoRA adapter,
the optimizer is PagedAdamW8bit on a GPU (AdamW8bit on the CPU, where there is nothing to page to), and gradient
checkpointing is on. The adapter is saved in PEFT's format; ``--merge-to`` also writes a merged dense model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["main", "run", "build_parser", "tiny_llama", "TokenData", "load_texts", "train", "evaluate",
           "FinetuneResult"]

EMBEDDED = "embedded"
DEFAULT_OUTPUT = "qlora-finetune-out"
OPTIMIZERS = ("auto", "paged_adamw8bit", "adamw8bit", "paged_adamw", "adamw")


# ---- the embedded model and corpus --------------------------------------------------------------------------

def tiny_llama_config(vocab_size: int, **overrides):
    """A Llama-architecture config of about 3M parameters: big enough to learn a small corpus, small enough to
    train on a CPU in a minute."""
    from transformers import LlamaConfig
    from .tokenizer import ByteTokenizer
    kw = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=ByteTokenizer.bos_token_id,
              eos_token_id=ByteTokenizer.eos_token_id, pad_token_id=ByteTokenizer.pad_token_id)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """The embedded demo model: a randomly initialized (``seed``) Llama of :func:`tiny_llama_config`, and its
    byte-level tokenizer. Nothing is downloaded."""
    from transformers import LlamaForCausalLM
    from .tokenizer import ByteTokenizer
    tokenizer = ByteTokenizer()
    with _fork_rng(seed):
        model = LlamaForCausalLM(tiny_llama_config(tokenizer.vocab_size, **overrides))
    return model.to(dtype), tokenizer


def embedded_corpus_path() -> Path:
    """The small English corpus shipped with the package (qlora/data/tiny_corpus.txt)."""
    return Path(str(resources.files("qlora") / "data" / "tiny_corpus.txt"))


class _fork_rng:
    """Seed torch's CPU generator inside a block without disturbing the caller's random stream."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


# ---- data ---------------------------------------------------------------------------------------------------

def load_texts(path: Path) -> list[str]:
    """Documents of a data file: the ``"text"`` field of each line of a ``.jsonl`` file, else the whole file as one
    plain-text document."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r} is not a file")
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"--data {str(path)!r} is empty")
        return [text]
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--data {str(path)!r} line {number} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"--data {str(path)!r} line {number} has no string field \"text\"")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"--data {str(path)!r} has no records")
    return texts


class TokenData:
    """A tokenized corpus split into a training stream, from which random windows are drawn, and fixed
    evaluation blocks taken from its end.

    Parameters
    ----------
    texts : list of str
    tokenizer :
        Anything with ``encode(text, add_special_tokens=True)`` and ``eos_token_id``.
    seq_len : int
        Tokens per training sequence.
    eval_fraction : float
        Share of the token stream held out for evaluation (at most ``eval_blocks`` blocks of seq_len).
    seed : int
        Seeds the choice of training windows.
    """

    def __init__(self, texts: Sequence[str], tokenizer, seq_len: int, eval_fraction: float = 0.1,
                 eval_blocks: int = 8, seed: int = 0):
        if seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
        eos = getattr(tokenizer, "eos_token_id", None)
        ids: list[int] = []
        for text in texts:
            ids += list(tokenizer.encode(text, add_special_tokens=True))
            if eos is not None:
                ids.append(eos)
        stream = torch.tensor(ids, dtype=torch.long)
        n_eval = min(int(len(stream) * eval_fraction) // seq_len, eval_blocks) * seq_len
        self.train_stream = stream[: len(stream) - n_eval]
        self.eval = stream[len(stream) - n_eval:].view(-1, seq_len) if n_eval else stream[:0].view(0, seq_len)
        if len(self.train_stream) < seq_len:
            raise ValueError(f"--data has {len(stream)} tokens, too few for --seq-len {seq_len} "
                             f"(with --eval-fraction {eval_fraction}); use a shorter --seq-len or more data")
        self.seq_len = seq_len
        self.num_tokens = len(stream)
        self.max_id = int(stream.max())
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        """``[batch_size, seq_len]`` token ids: windows starting at random offsets of the training stream."""
        starts = torch.randint(0, len(self.train_stream) - self.seq_len + 1, (batch_size,), generator=self.generator)
        return torch.stack([self.train_stream[s: s + self.seq_len] for s in starts.tolist()])


# ---- training -----------------------------------------------------------------------------------------------

def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process' peak RSS
    except ImportError:
        return float("nan")


def make_optimizer(name: str, params, lr: float, weight_decay: float, device: torch.device):
    """qlora's AdamW variant ``name``; ``auto`` is PagedAdamW8bit on CUDA and AdamW8bit elsewhere (paging moves
    optimizer states between GPU and host, which means nothing on a CPU). Returns (optimizer, name used)."""
    from . import optim
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "auto":
        name = "paged_adamw8bit" if device.type == "cuda" else "adamw8bit"
    elif name.startswith("paged_") and device.type != "cuda":
        name = name.removeprefix("paged_")
    cls = {"paged_adamw8bit": optim.PagedAdamW8bit, "adamw8bit": optim.AdamW8bit, "paged_adamw": optim.PagedAdamW,
           "adamw": optim.AdamW}[name]
    return cls(params, lr=lr, weight_decay=weight_decay), name


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, device: torch.device, batch_size: int = 8) -> Optional[float]:
    """Mean next-token loss over the evaluation blocks (None when there are none)."""
    if len(data.eval) == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.eval), batch_size):
        ids = data.eval[i: i + batch_size].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss.detach()) * len(ids)
        count += len(ids)
    model.train(was_training)
    return total / count


def train(model: nn.Module, data: TokenData, steps: int, lr: float, batch_size: int, device: torch.device,
          optimizer: str = "auto", weight_decay: float = 0.0, warmup: int = 0, max_grad_norm: float = 0.3,
          grad_accum: int = 1, progress: bool = True) -> dict:
    """Train the parameters of ``model`` that require grad; returns the per-step losses and throughput.

    Returns
    -------
    dict
        ``losses`` (one per step), ``tokens_per_s``, ``seconds``, ``peak_memory_gib``, ``optimizer``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt, opt_name = make_optimizer(optimizer, params, lr, weight_decay, device)
    model.train()
    losses: list[float] = []
    tokens = 0
    bar = _tqdm(range(steps), progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        step_loss = 0.0
        for _ in range(grad_accum):
            ids = data.batch(batch_size).to(device, non_blocking=True)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / grad_accum).backward()
            step_loss += float(loss.detach()) / grad_accum
            tokens += ids.numel()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        elapsed = time.perf_counter() - start
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"loss={step_loss:.3f} tok/s={tokens / elapsed:,.0f} "
                                f"peak={_peak_memory_gib(device):.2f}GiB")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"losses": losses, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "peak_memory_gib": _peak_memory_gib(device), "optimizer": opt_name, "tokens": tokens}


def _tqdm(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc="finetune", unit="step", dynamic_ncols=True)


# ---- the command --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlora finetune", description="QLoRA fine-tuning of a causal LM: NF4 + double quantization, LoRA on "
        "all linear layers, 8-bit (paged on GPU) AdamW, gradient checkpointing. Without arguments it fine-tunes an "
        "embedded ~3M-parameter Llama on a bundled corpus (no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=EMBEDDED,
                   help="local Hugging Face model directory (plain or bitsandbytes 4-bit checkpoint), or 'embedded'")
    p.add_argument("--data", default=None, help="JSONL file with a \"text\" field per line, or a plain text file "
                   "(default: the bundled corpus)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="folder for the adapter (and the embedded base model)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 128 for the embedded "
                   "model, 512 otherwise)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 for the embedded "
                   "model, whose base is random, 2e-4 otherwise)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=0.3, help="gradient clipping; 0 disables it")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' or comma-separated layer names, e.g. q_proj,v_proj")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax in float32")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--optimizer", default="auto", choices=OPTIMIZERS,
                   help="auto: paged_adamw8bit on GPU, adamw8bit on CPU (paged variants fall back there)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of the data held out for eval loss")
    p.add_argument("--merge-to", default=None, help="also write the merged bf16 model (save_pretrained) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclasses.dataclass
class FinetuneResult:
    losses: list
    eval_before: Optional[float]
    eval_after: Optional[float]
    tokens_per_s: float
    seconds: float
    peak_memory_gib: float
    adapter_dir: Path
    optimizer: str
    device: str

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("steps", "batch_size", "grad_accum", "r"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seq_len is not None and args.seq_len < 2:
        parser.error(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.alpha <= 0:
        parser.error(f"--alpha must be positive, got {args.alpha}")
    if not 0.0 <= args.eval_fraction < 1.0:
        parser.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.model != EMBEDDED and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model!r} is not a local model directory (no config.json); models are never "
                     f"downloaded, pass a directory or 'embedded'")
    if args.data is not None and not Path(args.data).is_file():
        parser.error(f"--data {args.data!r} is not a file")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a device (auto, cpu, cuda or cuda:N)")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device!r} asks for CUDA but no GPU is available")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"--device must be cpu or cuda, got {args.device!r}")


def run(argv: Optional[Sequence[str]] = None) -> FinetuneResult:
    """Parse ``argv`` (``sys.argv[1:]`` when None), fine-tune, save the adapter and print a summary."""
    from . import models, adapters
    from .tokenizer import load_tokenizer

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
                     "float16": torch.float16, "float32": torch.float32}[args.compute_dtype]
    embedded = args.model == EMBEDDED
    seq_len = args.seq_len or (128 if embedded else 512)
    lr = args.lr or (2e-3 if embedded else 2e-4)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    targets = args.target_modules if args.target_modules == "all-linear" else \
        [t.strip() for t in args.target_modules.split(",") if t.strip()]
    output = Path(args.output)
    torch.manual_seed(args.seed)

    if embedded:
        model, tokenizer = tiny_llama(args.seed, dtype=compute_dtype)
        base_dir = output / "base_model"
        model.save_pretrained(base_dir)  # lets PEFT (or qlora) load the adapter on its base later
        tokenizer.save_pretrained(base_dir)
        base_name = str(base_dir)
        print(f"model: embedded tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
              f"saved to {base_dir}")
    else:
        tokenizer = load_tokenizer(args.model)
        model = models.load_model(args.model, dtype=compute_dtype, progress=not args.no_progress)
        base_name = str(Path(args.model).resolve())
        print(f"model: {args.model} ({type(model).__name__})")
    data_path = Path(args.data) if args.data else embedded_corpus_path()
    data = TokenData(load_texts(data_path), tokenizer, seq_len, args.eval_fraction, seed=args.seed)
    vocab = model.get_input_embeddings().num_embeddings
    if data.max_id >= vocab:
        raise SystemExit(f"error: the tokenizer produced id {data.max_id} but the model has only {vocab} embeddings")
    print(f"data: {data_path} ({data.num_tokens:,} tokens, {len(data.eval)} eval blocks of {seq_len})")

    models.prepare_model(model, target_modules=targets, r=args.r, alpha=args.alpha, dropout=args.dropout,
                         quant_type=args.quant_type, double_quant=not args.no_double_quant,
                         compute_dtype=compute_dtype, device=device,
                         gradient_checkpointing=not args.no_gradient_checkpointing, progress=not args.no_progress)
    eval_before = evaluate(model, data, device, args.batch_size)
    stats = train(model, data, args.steps, lr, args.batch_size, device, optimizer=args.optimizer,
                  weight_decay=args.weight_decay, warmup=warmup, max_grad_norm=args.max_grad_norm,
                  grad_accum=args.grad_accum, progress=not args.no_progress)
    eval_after = evaluate(model, data, device, args.batch_size)
    adapter_dir = adapters.save_adapter(model, output / "adapter", base_model_name_or_path=base_name)

    result = FinetuneResult(stats["losses"], eval_before, eval_after, stats["tokens_per_s"], stats["seconds"],
                            stats["peak_memory_gib"], adapter_dir, stats["optimizer"], str(device))
    k = min(10, len(result.losses))
    head, tail = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    print(f"done: {args.steps} steps in {result.seconds:.1f} s on {device} ({result.optimizer}), "
          f"{result.tokens_per_s:,.0f} tokens/s, peak memory {result.peak_memory_gib:.2f} GiB "
          f"({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    print(f"loss: first {result.first_loss:.4f} -> last {result.last_loss:.4f} "
          f"(mean of first/last {k} steps: {head:.4f} -> {tail:.4f})")
    if eval_before is not None:
        print(f"eval loss: {eval_before:.4f} -> {eval_after:.4f}")
    print(f"adapter: {adapter_dir}")
    if args.merge_to:
        merged = adapters.merge_model(model, torch.bfloat16)
        merged.save_pretrained(args.merge_to)
        tokenizer.save_pretrained(args.merge_to)
        print(f"merged bf16 model: {args.merge_to}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
