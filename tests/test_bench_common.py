"""bench/common.py: host-bound rows named in the table; the GPU-alone timing leaves out the host's enqueue time."""

import pytest
import torch

from bench.common import Row, format_table, gpu_alone_us, make_context, time_us


def test_host_bound_rows_are_named_in_the_table():
    rows = [Row("lora_linear", "fwd M=256", "4096x4096", "qlora", 35.0, gpu_us=28.0),       # 1.25x: host-bound
            Row("lora_linear", "fwd M=256", "4096x4096", "torch bf16", 84.0, gpu_us=40.0),  # 2.1x: host-bound
            Row("lora_linear", "fwd M=256", "8192x8192", "qlora", 72.0, gpu_us=66.0),       # 1.09x: not
            Row("lora_linear", "fwd M=256", "8192x8192", "torch bf16", 80.0)]               # not measured
    assert [r.host_bound for r in rows] == [True, True, False, False]
    lines = format_table(rows, make_context("cpu", quick=True)).splitlines()
    first = next(line for line in lines if "4096x4096" in line)
    assert first.endswith("host-bound, GPU alone µs: qlora 28.0, torch bf16 40.0")
    assert "host-bound" not in next(line for line in lines if "8192x8192" in line)
    assert lines[-1].startswith("host-bound: do_bench's median over 1.15x")


def test_a_table_without_host_bound_rows_has_no_host_note():
    rows = [Row("quantize_4bit", "dequantize nf4+dq", "4096x4096", "qlora", 16.4, gpu_us=15.9)]
    assert "host-bound" not in format_table(rows, make_context("cpu", quick=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_alone_leaves_out_the_hosts_enqueue_time():
    dev = torch.device("cuda")
    x = torch.zeros(1, device=dev)
    many_tiny = lambda: [x.add_(1) for _ in range(50)]  # noqa: E731  enqueue time far above the GPU's work
    assert gpu_alone_us(many_tiny, dev) < 0.8 * time_us(many_tiny, dev)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    one_long = lambda: a @ a  # noqa: E731  one launch, ~200 µs of work: both timings agree
    assert 0.85 < gpu_alone_us(one_long, dev) / time_us(one_long, dev) < 1.15
