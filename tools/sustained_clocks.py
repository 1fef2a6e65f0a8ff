"""Whether sustained load slows lora_linear_4bit more than bf16 F.linear: each runs back to back for a second (a
256 MB zero-fill before each call, as do_bench's), timed call by call with CUDA events, while nvidia-smi is asked
for the SM clock, the power draw and the clock-limit reasons about every 50 ms. Prints, per op, the median µs of
the first 5 % of the calls and of the last half, and the median clock and power over the run.

    python tools/sustained_clocks.py [--cases 28672x8192:256,4096x4096:4096] [--seconds 1] [--tensor-core]

--tensor-core adds the op with its tensor-core GEMM forced (path 6), whatever the automatic choice.
"""

import argparse
import statistics
import subprocess
import threading
import time

import torch
import torch.nn.functional as F

import qlora
from time_lora_paths import SCALE, layer  # this folder is on sys.path when run as a script

FIELDS = ["clocks.sm", "power.draw", "clocks_event_reasons.active"]


class Sampler(threading.Thread):
    """Queries nvidia-smi about every 50 ms (one process a query, so no output waits in a buffer) and keeps
    (host time, SM MHz, watts, clock-limit reasons)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.rows, self.query, self.running = [], None, True
        for fields in (FIELDS, FIELDS[:2]):
            query = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
            try:
                if subprocess.run(query, capture_output=True).returncode == 0:
                    self.query = query
                    break
            except FileNotFoundError:
                break

    def run(self):
        while self.running and self.query is not None:
            out = subprocess.run(self.query, capture_output=True, text=True).stdout.strip().split("\n")[0]
            parts = [part.strip() for part in out.split(",")]
            try:
                reasons = parts[2] if len(parts) > 2 else ""
                self.rows.append((time.perf_counter(), float(parts[0]), float(parts[1]), reasons))
            except (ValueError, IndexError):
                pass
            time.sleep(0.05)

    def between(self, t0, t1):
        return [(mhz, watts, reasons) for when, mhz, watts, reasons in self.rows if t0 <= when <= t1]


def sustained(fn, seconds, flush):
    """Per-call µs over about `seconds` of back-to-back calls, and the wall-clock span they ran in."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(5):
        flush.zero_()
        fn()
    torch.cuda.synchronize()
    calls = max(20, int(seconds / ((time.perf_counter() - begin) / 5)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    t0 = time.perf_counter()
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    return [start.elapsed_time(end) * 1e3 for start, end in events], t0, t1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="28672x8192:256,28672x8192:512,4096x4096:4096,28672x8192:4096",
                        help="NxK:M, comma-separated")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--tensor-core", action="store_true", help="also the op on its tensor-core GEMM (path 6)")
    args = parser.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    sampler = Sampler()
    sampler.start()
    time.sleep(0.5)
    try:
        for i, case in enumerate(args.cases.split(",")):
            shape, M = case.split(":")
            N, K = (int(d) for d in shape.split("x"))
            W, packed, qs, A, B = layer(N, K, dev)
            x = torch.randn(int(M), K, device=dev, dtype=torch.bfloat16)
            ops = {"qlora": lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE),
                   "bf16 F.linear": lambda: F.linear(x, W)}
            if args.tensor_core:
                ops["qlora path 6"] = lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE, None, 6)
            for label, fn in list(ops.items())[::1 if i % 2 == 0 else -1]:  # each op first in every other case
                time.sleep(0.5)  # the same idle start for each op
                us, t0, t1 = sustained(fn, args.seconds, flush)
                line = (f"{shape} M={M} {label:14s} calls {len(us):5d}  µs first 5 % "
                        f"{statistics.median(us[:max(1, len(us) // 20)]):8.1f}  last half "
                        f"{statistics.median(us[len(us) // 2:]):8.1f}")
                seen = sampler.between(t0, t1)
                if seen:
                    reasons = sorted({r for _, _, r in seen if r})
                    line += (f"  SM MHz {statistics.median(m for m, _, _ in seen):6.0f}"
                             f"  W {statistics.median(w for _, w, _ in seen):5.0f}  reasons {' '.join(reasons)}")
                print(line, flush=True)
    finally:
        sampler.running = False


if __name__ == "__main__":
    main()
