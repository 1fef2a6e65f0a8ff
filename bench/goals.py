"""The speed goals the project set itself, checked against one run's rows: the short table `python -m bench`
prints last. A goal whose rows the run did not measure (CPU runs, --only) is left out."""

from __future__ import annotations

import dataclasses
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

    def value(self, by_impl: dict[str, Row]) -> float | None:
        ours = by_impl.get("qlora")
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


def format_goals(rows: Sequence[Row], goals: Sequence[Goal] = GOALS) -> str:
    """One line per goal the rows measure: the goal, the measured value and whether it is met; "" if none."""
    cases: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        cases.setdefault((r.bench, r.case, r.shape), {})[r.impl] = r
    lines = []
    for goal in goals:
        value = goal.value(cases.get((goal.bench, goal.case, goal.shape), {}))
        if value is not None:
            lines.append(f"{goal.describe():70} {value:9.2f}  {'met' if goal.met(value) else 'MISSED'}")
    if not lines:
        return ""
    met = sum(line.endswith("met") for line in lines)
    return "\n".join([f"goals: {met} of {len(lines)} met", *lines])
