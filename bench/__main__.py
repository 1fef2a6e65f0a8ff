"""Microbenchmarks: every qlora kernel against PyTorch and bitsandbytes on the same device, in one run.

    python -m bench                      # all benchmarks, CUDA if present, else small CPU sizes
    python -m bench --only quantize_4bit --out bench_results
    python -m bench --replot bench_results/results.json --out bench_results   # the plot again, from the JSON

Prints a table, then the speed goals the run measured (bench/goals.py), and writes results.json,
results.png and, where the run measured a goal, goals.png to --out.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import torch

import bench
from bench.common import device_name, environment, format_table, make_context, plot, read_rows, write_reports
from bench.goals import format_goals, plot_goals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark stems (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (implied on CPU)")
    parser.add_argument("--out", default="bench_results", help="folder for results.json and results.png")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier results.json")
    args = parser.parse_args(argv)
    if args.replot:
        rows, env = read_rows(Path(args.replot))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot(rows, device_name(env), Path(args.out) / "results.png")
        written = [Path(args.out) / "results.png"]
        if plot_goals(rows, device_name(env), Path(args.out) / "goals.png"):
            written.append(Path(args.out) / "goals.png")
        print("written:", ", ".join(map(str, written)))
        return 0

    stems = [m.name.removeprefix("bench_") for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_")]
    wanted = [s for s in args.only.split(",") if s] or stems
    unknown = set(wanted) - set(stems)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; available: {stems}")

    ctx = make_context(args.device, quick=args.quick or args.device == "cpu")
    print("environment:", environment(ctx), flush=True)
    rows = []
    for stem in wanted:
        t0 = time.time()
        module = importlib.import_module(f"bench.bench_{stem}")
        new_rows = module.run(ctx)
        rows += new_rows
        print(f"[{stem}] {len(new_rows)} measurements in {time.time() - t0:.0f} s", flush=True)
        print(format_table(new_rows, ctx), flush=True)
        write_reports(rows, ctx, Path(args.out))  # after each benchmark, so a cut-short run keeps what it measured
    print()
    print(format_table(rows, ctx))
    goals = format_goals(rows)
    written = [Path(args.out) / "results.json", Path(args.out) / "results.png"]
    if goals:
        print("\n" + goals)
        if plot_goals(rows, device_name(environment(ctx)), Path(args.out) / "goals.png"):
            written.append(Path(args.out) / "goals.png")
    print("\nwritten:", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
