"""Quality check: does QLoRA (NF4 + double quantization) fine-tune as well as bf16 LoRA?

No pretrained model can be downloaded here, so the script makes one: the embedded tiny Llama
(qlora.finetune.tiny_llama) is first pretrained with all weights on the first part of the bundled corpus.
Its copy is then fine-tuned twice on the rest, with the same data, steps, seed, rank and optimizer:

  qlora      the base quantized to NF4 + double quant by qlora.prepare_model, LoRA on all linear layers
  bf16 LoRA  the same base in bf16, PEFT LoRA on the same layers, no quantization

and the held-out eval loss of the two is compared (target: QLoRA within 2% of bf16 LoRA).

    python tools/quality_check.py                      # GPU if present, else CPU with small settings
    python tools/quality_check.py --device cpu --pretrain-steps 150 --steps 60
    python tools/quality_check.py --seeds 0 1 2        # the whole comparison once a seed; the target on the mean

A single seed's gap moves by a point or two with anything that changes the rounding of one step (the fine-tuning
overfits the small text), so several seeds say more than one.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: 600 on GPU, 200 on CPU")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: 200 on GPU, 60 on CPU)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one comparison a seed (default: 0)")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed relative eval-loss gap")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    pretrain_steps = args.pretrain_steps or (600 if on_gpu else 200)
    steps = args.steps or (200 if on_gpu else 60)

    gaps = []
    for seed in args.seeds:
        qlora_loss, bf16_loss = compare(args, seed, device, pretrain_steps, steps)
        gaps.append((qlora_loss - bf16_loss) / bf16_loss)
        print(f"seed {seed}: QLoRA NF4+DQ vs bf16 LoRA eval loss: {qlora_loss:.4f} vs {bf16_loss:.4f}, "
              f"relative gap {gaps[-1]:+.2%}", flush=True)
    gap = sum(gaps) / len(gaps)
    ok = gap <= args.tolerance
    over = f"mean over {len(gaps)} seeds " if len(gaps) > 1 else ""
    print(f"QLoRA NF4+DQ vs bf16 LoRA: {over}relative eval-loss gap {gap:+.2%} (target <= {args.tolerance:.0%}): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def compare(args, seed: int, device: torch.device, pretrain_steps: int, steps: int) -> tuple[float, float]:
    """Pretrains the tiny Llama from `seed`, fine-tunes a copy with each method; their eval losses (qlora, bf16)."""
    import qlora
    from qlora import finetune as ft

    dtype = torch.bfloat16

    # Pretraining text and fine-tuning text are different paragraphs of the corpus.
    paragraphs = [line for line in ft.embedded_corpus_path().read_text().splitlines() if line.strip()]
    cut = len(paragraphs) * 2 // 3
    model, tok = ft.tiny_llama(seed)
    pre_data = ft.TokenData(["\n".join(paragraphs[:cut])], tok, args.seq_len, eval_fraction=0.0, seed=seed)
    tune_data = lambda: ft.TokenData(["\n".join(paragraphs[cut:])], tok, args.seq_len,  # noqa: E731
                                     eval_fraction=0.2, seed=seed + 1)

    t0 = time.time()
    model.to(device)
    ft.train(model, pre_data, pretrain_steps, 3e-3, args.batch_size, device, optimizer="adamw", warmup=20,
             max_grad_norm=1.0, progress=False)
    model = model.to(dtype)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    base_eval = ft.evaluate(model, tune_data(), device)
    print(f"pretrained {pretrain_steps} steps in {time.time() - t0:.0f} s; eval loss on the fine-tuning text "
          f"before fine-tuning: {base_eval:.4f}", flush=True)

    results = {}
    for name in ("qlora", "bf16 LoRA"):
        torch.manual_seed(seed)  # the same adapter initialization stream for both
        m = copy.deepcopy(model)
        if name == "qlora":
            qlora.prepare_model(m, r=args.r, alpha=2 * args.r, dropout=0.0, compute_dtype=dtype, device=device,
                                progress=False, verbose=False)
        else:
            from peft import LoraConfig, get_peft_model
            m = get_peft_model(m, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                             target_modules=list(qlora.models.LLAMA_TARGET_MODULES)))
            for n, p_ in m.named_parameters():  # float32 adapters, as qlora keeps them
                if p_.requires_grad:
                    p_.data = p_.data.float()
        data = tune_data()
        before = ft.evaluate(m, data, device)
        t0 = time.time()
        stats = ft.train(m, data, steps, args.lr, args.batch_size, device, optimizer="adamw8bit",
                         warmup=max(1, steps // 20), progress=False)
        after = ft.evaluate(m, data, device)
        results[name] = after
        print(f"{name:10} eval loss {before:.4f} -> {after:.4f}  (train loss {stats['losses'][0]:.4f} -> "
              f"{stats['losses'][-1]:.4f}, {steps} steps in {time.time() - t0:.0f} s)", flush=True)

    return results["qlora"], results["bf16 LoRA"]


if __name__ == "__main__":
    sys.exit(main())
