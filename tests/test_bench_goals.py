"""bench/goals.py: the goal lines of a run, from synthetic rows."""

import pytest

from bench.common import Row
from bench.goals import GOALS, Goal, format_goals, plot_goals


def test_goal_lines_say_met_or_missed_from_the_rows():
    rows = [Row("lora_linear", "fwd M=16", "8192x28672", "qlora", 40.0),
            Row("lora_linear", "fwd M=16", "8192x28672", "torch bf16 no-LoRA", 125.0),   # 3.1x: met
            Row("lora_linear", "fwd M=16", "28672x8192", "qlora", 90.0),
            Row("lora_linear", "fwd M=16", "28672x8192", "torch bf16 no-LoRA", 125.0),   # 1.4x: missed
            Row("lora_linear", "fwd M=4096", "4096x4096", "qlora", 210.0),
            Row("lora_linear", "fwd M=4096", "4096x4096", "torch bf16 no-LoRA", 190.0),  # 1.11x the time: missed
            Row("quantize_4bit", "dequantize nf4+dq", "4096x4096", "qlora", 14.0),       # <= 15 µs: met
            Row("quantize_4bit", "dequantize nf4+dq", "28672x8192", "qlora", 150.0, bytes=591e6)]  # 3940 GB/s
    lines = format_goals(rows).splitlines()
    assert lines[0] == "goals: 3 of 5 met"
    verdicts = {line.split(":")[0]: line.split()[-1] for line in lines[1:]}
    assert verdicts == {"dequantize nf4+dq 28672x8192": "met", "dequantize nf4+dq 4096x4096": "met",
                        "fwd M=16 8192x28672": "met", "fwd M=16 28672x8192": "MISSED",
                        "fwd M=4096 4096x4096": "MISSED"}


def test_goals_without_rows_or_baseline_are_left_out():
    assert format_goals([]) == ""
    lone = [Row("lora_linear", "fwd M=1", "8192x28672", "qlora", 70.0)]  # no bf16 row to compare with
    assert format_goals(lone) == ""


def test_limits_are_inclusive():
    at_least = Goal("b", "c", "s", "speedup", 2.0, "base")
    at_most = Goal("b", "c", "s", "slowdown", 1.05, "base")
    assert at_least.met(2.0) and not at_least.met(1.99)
    assert at_most.met(1.05) and not at_most.met(1.051)
    assert all(g.measure in ("us", "gbps", "speedup", "slowdown") for g in GOALS)


def test_goals_plot_is_written_where_a_goal_was_measured(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [Row("lora_linear", "fwd M=16", "8192x28672", "qlora", 40.0),
            Row("lora_linear", "fwd M=16", "8192x28672", "qlora row-major", 45.0),
            Row("lora_linear", "fwd M=16", "8192x28672", "torch bf16 no-LoRA", 125.0)]
    assert plot_goals(rows, "GPU", tmp_path / "goals.png")
    assert (tmp_path / "goals.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_goals(rows[:1], "GPU", tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_attainment_is_one_at_the_limit_and_above_where_the_goal_is_beaten():
    speedup = Goal("b", "c", "s", "speedup", 2.0, "base")
    slowdown = Goal("b", "c", "s", "slowdown", 1.05, "base")
    assert speedup.attainment(2.0) == 1.0 and speedup.attainment(3.0) == 1.5
    assert slowdown.attainment(1.05) == 1.0 and slowdown.attainment(1.0) > 1.0 > slowdown.attainment(1.1)
