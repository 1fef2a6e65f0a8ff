"""Where the time of one end-to-end training step goes (Llama-3-8B layer shapes, as bench/bench_e2e.py).

    python tools/profile_e2e.py [layers] [impl ...]     # impl: qlora, bf16 (default: both), layers default 4

Prints every step's wall time, then the CUDA kernels of two profiled steps by total time.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import bench_e2e as e2e

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
impls = sys.argv[2:] or ["qlora", "bf16"]
device = torch.device("cuda")
config = e2e._config(layers, quick=False)
builders = {"qlora": lambda d: e2e._build_qlora(d, device), "bf16": lambda d: e2e._build_bf16_lora(d, device)}


def step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


with tempfile.TemporaryDirectory(prefix="qlora-profile-") as tmp:
    e2e._write_random_model(config, Path(tmp), device)
    for impl in impls:
        torch.cuda.reset_peak_memory_stats(device)
        model, opt = builders[impl](Path(tmp))
        model.train()
        ids = torch.randint(0, config.vocab_size, (1, 2048), device=device)
        times = []
        for _ in range(8):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, opt, ids)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"{impl} L={layers}: step ms " + " ".join(f"{t:.1f}" for t in times)
              + f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step(model, opt, ids)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60), flush=True)
        del model, opt
        e2e._free(device)
