"""Timing, device ceilings and reporting shared by every bench/bench_<stem>.py module.

Each module defines ``run(ctx: Context) -> list[Row]``; ``python -m bench`` runs them all, prints one
table and writes JSON and a PNG plot.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


@dataclasses.dataclass
class Row:
    bench: str            # module stem, e.g. "quantize_4bit"
    case: str             # what is measured, e.g. "dequantize nf4+dq"
    shape: str            # e.g. "8192x28672"
    impl: str             # "qlora", "bitsandbytes", "torch bf16", ...
    us: float             # median time in microseconds
    bytes: float = 0.0    # fewest bytes the op must move (read + write)
    flops: float = 0.0
    note: str = ""
    gpu_us: float = 0.0   # the GPU's time alone (gpu_alone_us), where measured; 0 where not

    @property
    def host_bound(self) -> bool:
        """do_bench's median is mostly the host's: the GPU alone takes under 1/1.15 of it."""
        return self.gpu_us > 0 and self.us > HOST_BOUND_RATIO * self.gpu_us

    @property
    def gbps(self) -> float:
        return self.bytes / self.us / 1e3 if self.us else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / self.us / 1e6 if self.us else 0.0


@dataclasses.dataclass
class Context:
    device: torch.device
    quick: bool                     # small sizes (CPU, or a smoke run)
    bnb: Optional[object]           # the bitsandbytes module when importable on this device
    copy_gbps: float                # measured device-to-device copy bandwidth, bytes read + written
    matmul_tflops: float            # measured bf16 matmul rate

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _import_bnb():
    try:
        import bitsandbytes  # noqa: F401
        return bitsandbytes
    except Exception:  # not installed, or installed without a usable native library
        return None


def rotating(make_inputs: Callable[[], tuple], bytes_per_set: float, min_total: float = 2.5 * 60e6, max_sets: int = 16):
    """Enough independent input sets that cycling through them never hits a warm L2 (60 MB on H100/H200)."""
    count = max(1, min(max_sets, int(min_total // max(bytes_per_set, 1)) + 1))
    sets = [make_inputs() for _ in range(count)]
    return itertools.cycle(sets).__next__


def time_us(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in µs: CUDA events via triton's do_bench when present, else a host clock."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3
        except ImportError:
            return _time_events(fn)
    fn()
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


HOST_BOUND_RATIO = 1.15
GPU_ALONE_BELOW_US = 500.0  # longer calls leave the host time to enqueue the next one: not measured
_FLUSH_BYTES = 256 << 20    # as triton's do_bench


def gpu_alone_us(fn: Callable[[], object], device: torch.device, reps: int = 15) -> float:
    """Median GPU time of fn() with the host out of the way: before each call a ~1 ms sleep kernel gives the host
    a head start, so every kernel of the call is queued before the GPU reaches the first (do_bench times the gaps
    too, which are the host's enqueue time where that exceeds the GPU's work: a short op of several launches).
    L2 is emptied before each call as do_bench does."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    fn()
    pairs = []
    for _ in range(reps):
        torch.cuda._sleep(2_000_000)
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3


def with_gpu_alone(rows: Sequence[Row], fns: Sequence[Callable[[], object]], device: torch.device) -> list[Row]:
    """rows with gpu_us filled in where do_bench read less than GPU_ALONE_BELOW_US (CUDA only)."""
    if device.type != "cuda":
        return list(rows)
    return [dataclasses.replace(r, gpu_us=gpu_alone_us(fn, device)) if r.us < GPU_ALONE_BELOW_US else r
            for r, fn in zip(rows, fns)]


def time_both_orders(fns: Sequence[Callable[[], object]], device: torch.device,
                     names: Sequence[str]) -> list[Optional[float]]:
    """time_us of each fn, timed in order and again in reverse, the two medians averaged: a GPU whose clocks drift
    under sustained load (seen on the H200 as two runs of one code path 15 % apart, first and last of a group)
    then favours no position in the group. None for a fn that raised (reported by its name, so one broken row
    does not end the run)."""
    times: list[list[float]] = [[] for _ in fns]
    failed: set[int] = set()
    for order in (range(len(fns)), reversed(range(len(fns)))):
        for i in order:
            if i in failed:
                continue
            try:
                times[i].append(time_us(fns[i], device))
            except Exception as exc:
                print(f"[{names[i]}] failed: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                failed.add(i)
    return [None if i in failed else statistics.fmean(t) for i, t in enumerate(times)]


def _time_events(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3


@functools.lru_cache(maxsize=None)
def measure_ceilings(device_str: str) -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) measured on this device now."""
    device = torch.device(device_str)
    if device.type != "cuda":
        return 0.0, 0.0
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), device)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_us = time_us(lambda: a @ b, device)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return 2 * 2**30 / copy_us / 1e3, 2 * 8192**3 / mm_us / 1e6


def make_context(device: str, quick: bool) -> Context:
    dev = torch.device(device)
    copy_gbps, mm_tflops = measure_ceilings(str(dev))
    return Context(dev, quick, _import_bnb() if dev.type == "cuda" else None, copy_gbps, mm_tflops)


def environment(ctx: Context) -> dict:
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
           "device": str(ctx.device), "copy_GBps": round(ctx.copy_gbps, 1), "bf16_matmul_TFLOPs": round(ctx.matmul_tflops, 1)}
    if ctx.cuda:
        env["gpu"] = torch.cuda.get_device_name(ctx.device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    if ctx.bnb is not None:
        env["bitsandbytes"] = ctx.bnb.__version__
    return env


def device_name(env: dict) -> str:
    """The GPU's name in an environment() dict, else the CPU's."""
    return env.get("gpu", env.get("cpu"))


def format_table(rows: Sequence[Row], ctx: Context) -> str:
    """One line per case and shape: each implementation's µs, qlora's bandwidth and its speed-up over the others."""
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.bench, r.case, r.shape), {})[r.impl] = r
    impls = list(dict.fromkeys(r.impl for r in rows))
    head = f"{'case':34} {'shape':18}" + "".join(f"{i[:16]:>17}" for i in impls) + f"{'GB/s':>9}{'of copy':>9}  ratios"
    lines = [head, "-" * len(head)]
    for (bench, case, shape), by_impl in groups.items():
        cells = "".join(f"{by_impl[i].us:>15.1f}µs" if i in by_impl else f"{'':>17}" for i in impls)
        ours = by_impl.get("qlora")
        gbps = f"{ours.gbps:>9.0f}" if ours and ours.bytes else f"{'':>9}"
        frac = f"{ours.gbps / ctx.copy_gbps:>8.0%} " if ours and ours.bytes and ctx.copy_gbps else f"{'':>9}"
        ratios = "  ".join(f"{i}/qlora={by_impl[i].us / ours.us:.2f}x" for i in by_impl if ours and i != "qlora")
        host = ", ".join(f"{i} {r.gpu_us:.1f}" for i, r in by_impl.items() if r.host_bound)
        host = f"  host-bound, GPU alone µs: {host}" if host else ""
        lines.append(f"{case[:34]:34} {shape[:18]:18}{cells}{gbps}{frac}  {ratios}{host}")
    if any(r.host_bound for r in rows):
        lines.append(f"host-bound: do_bench's median over {HOST_BOUND_RATIO}x the GPU's time alone (bench.common."
                     "gpu_alone_us); the gap is the host's enqueue time, which do_bench counts")
    return "\n".join(lines)


def write_reports(rows: Sequence[Row], ctx: Context, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(ctx)
    payload = {"environment": env,
               "rows": [dict(dataclasses.asdict(r), gbps=r.gbps, tflops=r.tflops) for r in rows]}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    plot(rows, device_name(env), out_dir / "results.png")


def read_rows(path: Path) -> tuple[list[Row], dict]:
    """The rows and environment of a results.json that write_reports wrote."""
    payload = json.loads(Path(path).read_text())
    fields = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in fields}) for r in payload["rows"]], payload["environment"]


def plot(rows: Sequence[Row], device_name: str, path: Path) -> None:
    """One panel per benchmark: µs of each implementation side by side per case and shape (log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    benches = list(dict.fromkeys(r.bench for r in rows))
    cases = {b: len({(r.case, r.shape) for r in rows if r.bench == b}) for b in benches}
    many = {b: cases[b] > 8 for b in benches}
    heights = [5.5 if many[b] else 3.2 for b in benches]
    fig, axes = plt.subplots(len(benches), 1, figsize=(max(11, 0.25 * max(cases.values())), sum(heights)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, bench in zip(axes[:, 0], benches):
        sub = [r for r in rows if r.bench == bench]
        sep = " " if many[bench] else "\n"  # many cases: one-line labels, turned upright
        labels = list(dict.fromkeys(f"{r.case}{sep}{r.shape}" for r in sub))
        impls = list(dict.fromkeys(r.impl for r in sub))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for j, label in enumerate(labels):
                hit = [r for r in sub if r.impl == impl and f"{r.case}{sep}{r.shape}" == label]
                if hit:
                    xs.append(j + k * width)
                    ys.append(hit[0].us)
            # tab20 beyond ten: matplotlib's default cycle repeats its ten colours, and the linear + LoRA rows have more
            ax.bar(xs, ys, width, label=impl, color=plt.get_cmap("tab10" if len(impls) <= 10 else "tab20")(k % 20))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7,
                      rotation=90 if many[bench] else 0)
        ax.set_xlim(-0.5, len(labels))
        ax.set_yscale("log")
        ax.set_ylabel("µs (log)")
        ax.set_title(f"{bench} on {device_name}", fontsize=9)
        ax.legend(fontsize=7, ncol=2 if many[bench] else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
