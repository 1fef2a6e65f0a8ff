"""The speed goals the project set itself, checked against one run's rows: the short table `python -m bench`
prints last. A goal whose rows the run did not measure (CPU runs, --only) is left out."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from bench.common import Row

BF16 = "torch bf16 no-LoRA"  # F.linear alone
BF16_LORA = "torch bf16"     # F.linear + the same LoRA in plain PyTorch


@dataclasses.dataclass(frozen=True)
class Goal:
    bench: str
    case: str
    shape: str
    measure: str          # "us", "gbps", "speedup" (baseline / qlora) or "slowdown" (qlora / baseline)
    limit: float
    baseline: str = ""    # the impl a speedup or slowdown is taken against

    @property
    def at_least(self) -> bool:
        return self.measure in ("gbps", "speedup")

    def describe(self) -> str:
        sign = ">=" if self.at_least else "<="
        what = {"us": "µs", "gbps": "GB/s", "speedup": f"x faster than {self.baseline}",
                "slowdown": f"x the time of {self.baseline}"}[self.measure]
        return f"{self.case} {self.shape}: {what} {sign} {self.limit:g}"

    def value(self, by_impl: dict[str, Row], impl: str = "qlora") -> float | None:
        ours = by_impl.get(impl)
        if ours is None or not ours.us:
            return None
        if self.measure == "us":
            return ours.us
        if self.measure == "gbps":
            return ours.gbps
        base = by_impl.get(self.baseline)
        if base is None or not base.us:
            return None
        return base.us / ours.us if self.measure == "speedup" else ours.us / base.us

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit

    def attainment(self, value: float) -> float:
        """How far value goes towards the goal: 1 exactly meets it, above 1 beats it (value / limit where higher is
        better, limit / value where lower is)."""
        return value / self.limit if self.at_least else self.limit / value


LARGE = ["8192x28672", "28672x8192"]
ALL_SHAPES = ["4096x4096", "8192x8192"] + LARGE
GOALS = [
    Goal("quantize_4bit", "dequantize nf4+dq", "28672x8192", "gbps", 3600),
    Goal("quantize_4bit", "dequantize nf4+dq", "4096x4096", "us", 15),
    Goal("quantize_4bit", "quantize nf4+dq", "28672x8192", "us", 250),
    *[Goal("lora_linear", "fwd M=1", s, "speedup", 3.5, BF16) for s in LARGE],
    Goal("lora_linear", "fwd M=1", "4096x4096", "speedup", 2.0, BF16),
    *[Goal("lora_linear", "fwd M=16", s, "speedup", 3.0, BF16) for s in LARGE],
    *[Goal("lora_linear", "fwd M=256", s, "speedup", 1.0, BF16) for s in ALL_SHAPES],
    *[Goal("lora_linear", "fwd M=4096", s, "slowdown", 1.05, BF16) for s in ALL_SHAPES],
    Goal("lora_linear", "layer fwd+bwd M=4096", "4096x4096", "slowdown", 1.15, BF16_LORA),
]


def _by_case(rows: Sequence[Row]) -> dict[tuple, dict[str, Row]]:
    cases: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        cases.setdefault((r.bench, r.case, r.shape), {})[r.impl] = r
    return cases


def format_goals(rows: Sequence[Row], goals: Sequence[Goal] = GOALS) -> str:
    """One line per goal the rows measure: the goal, the measured value and whether it is met; "" if none."""
    cases = _by_case(rows)
    lines = []
    for goal in goals:
        value = goal.value(cases.get((goal.bench, goal.case, goal.shape), {}))
        if value is not None:
            lines.append(f"{goal.describe():70} {value:9.2f}  {'met' if goal.met(value) else 'MISSED'}")
    if not lines:
        return ""
    met = sum(line.endswith("met") for line in lines)
    return "\n".join([f"goals: {met} of {len(lines)} met", *lines])


# Beside qlora in the goals plot, where the run measured them: the same op on bitsandbytes' byte order, and
# bitsandbytes itself, each taken against the goal as qlora is.
PLOT_CONTEXT = ["qlora row-major", "bitsandbytes"]


def plot_goals(rows: Sequence[Row], device_name: str, path: Path, goals: Sequence[Goal] = GOALS) -> bool:
    """A bar per goal the rows measure: measured / goal (1 = met exactly, right of the line = met), qlora green where
    it meets the goal and red where not, PLOT_CONTEXT beside it in grey. Writes path; False if no goal was measured
    or matplotlib is missing."""
    cases = _by_case(rows)
    measured = []
    for goal in goals:
        by_impl = cases.get((goal.bench, goal.case, goal.shape), {})
        ours = goal.value(by_impl)
        if ours is not None:
            context = {impl: goal.value(by_impl, impl) for impl in PLOT_CONTEXT}
            measured.append((goal, ours, {k: v for k, v in context.items() if v is not None}))
    if not measured:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(measured) + 1.4))
    height = 0.8 / (1 + len(PLOT_CONTEXT))
    greys = ["0.55", "0.8"]
    for i, (goal, ours, context) in enumerate(measured):
        y = len(measured) - 1 - i
        ax.barh(y + height, goal.attainment(ours), height, color="tab:green" if goal.met(ours) else "tab:red",
                label="qlora" if i == 0 else None)
        ax.text(goal.attainment(ours), y + height, f" {ours:.2f}", va="center", fontsize=7)
        for k, impl in enumerate(PLOT_CONTEXT):
            if impl in context:
                ax.barh(y - k * height, goal.attainment(context[impl]), height, color=greys[k],
                        label=impl if impl not in ax.get_legend_handles_labels()[1] else None)
    ax.axvline(1.0, color="black", linewidth=1)
    reach = [goal.attainment(v) for goal, ours, context in measured for v in (ours, *context.values())]
    ax.set_xlim(0, 1.12 * max([1.0, *reach]))
    ax.set_yticks(range(len(measured)), [g.describe() for g, _, _ in reversed(measured)], fontsize=7)
    ax.set_xlabel("measured / goal (1 = met exactly; right of the line: met)")
    met = sum(goal.met(ours) for goal, ours, _ in measured)
    ax.set_title(f"speed goals on {device_name}: {met} of {len(measured)} met", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
