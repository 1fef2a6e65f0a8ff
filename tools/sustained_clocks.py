"""Whether sustained load slows lora_linear_4bit more than bf16 F.linear: each runs back to back for a second (a
256 MB zero-fill before each call, as do_bench's), timed call by call with CUDA events, while nvidia-smi samples the
SM clock, the power draw and the clock-limit reasons every 50 ms. Prints, per op, the median µs of the first 5 % of
the calls and of the last half, and the median clock and power over the run.

    python tools/sustained_clocks.py [--cases 28672x8192:256,4096x4096:4096] [--seconds 1]
"""

import argparse
import datetime
import math
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

import qlora

R, SCALE = 16, 2.0
FIELDS = ["timestamp", "clocks.sm", "power.draw", "clocks_event_reasons.active"]


def start_sampler(path):
    """nvidia-smi writing a CSV line every 50 ms, or None without nvidia-smi; drops the reasons field if unknown."""
    for fields in (FIELDS, FIELDS[:3]):
        query = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        try:
            if subprocess.run(query, capture_output=True).returncode != 0:
                continue
        except FileNotFoundError:
            return None
        return subprocess.Popen(query + ["-lms", "50", "-f", path])
    return None


def samples_between(path, t0, t1):
    """[(sm MHz, watts, reasons)] sampled in [t0, t1] (datetimes)."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            try:
                when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
                rows.append((when, float(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else ""))
            except (ValueError, IndexError):
                continue
    return [(mhz, watts, reasons) for when, mhz, watts, reasons in rows if t0 <= when <= t1]


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
    t0 = datetime.datetime.now()
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    t1 = datetime.datetime.now()
    return [start.elapsed_time(end) * 1e3 for start, end in events], t0, t1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="28672x8192:256,28672x8192:512,4096x4096:4096,28672x8192:4096",
                        help="NxK:M, comma-separated")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    log = os.path.join(tempfile.mkdtemp(), "smi.csv")
    sampler = start_sampler(log)
    time.sleep(0.5)
    try:
        for case in args.cases.split(","):
            shape, M = case.split(":")
            N, K = (int(d) for d in shape.split("x"))
            W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            packed, qs = qlora.quantize_4bit(W)
            A = torch.randn(R, K, device=dev, dtype=torch.bfloat16) / math.sqrt(K)
            B = torch.randn(N, R, device=dev, dtype=torch.bfloat16) * 0.01
            x = torch.randn(int(M), K, device=dev, dtype=torch.bfloat16)
            ops = {"qlora": lambda: qlora.lora_linear_4bit(x, packed, qs, None, A, B, SCALE),
                   "bf16 F.linear": lambda: F.linear(x, W)}
            for label, fn in ops.items():
                time.sleep(0.5)  # the same idle start for each op
                us, t0, t1 = sustained(fn, args.seconds, flush)
                line = (f"{shape} M={M} {label:14s} calls {len(us):5d}  µs first 5 % "
                        f"{statistics.median(us[:max(1, len(us) // 20)]):8.1f}  last half "
                        f"{statistics.median(us[len(us) // 2:]):8.1f}")
                if sampler is not None:
                    time.sleep(0.1)  # the sampler's last lines reach the file
                    seen = samples_between(log, t0, t1)
                    if seen:
                        reasons = sorted({r for _, _, r in seen if r})
                        line += (f"  SM MHz {statistics.median(m for m, _, _ in seen):6.0f}"
                                 f"  W {statistics.median(w for _, w, _ in seen):5.0f}  reasons {' '.join(reasons)}")
                print(line, flush=True)
    finally:
        if sampler is not None:
            sampler.terminate()


if __name__ == "__main__":
    main()
