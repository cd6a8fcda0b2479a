"""The benchmark helpers measure what they claim (the benchmarks themselves are not timed tests)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import cpu_peak_bytes  # noqa: E402

MiB = 2**20


def test_cpu_peak_bytes_counts_the_high_water_mark_of_tensors_made_inside():
    kept = torch.ones(4 * MiB, dtype=torch.uint8)  # alive before: not counted

    def fn():
        a = torch.ones(1 * MiB, dtype=torch.uint8)
        b = torch.ones(2 * MiB, dtype=torch.uint8)  # peak here: a + b = 3 MiB
        del a, b
        c = torch.ones(2 * MiB + MiB // 2, dtype=torch.uint8)  # 2.5 MiB, after the frees
        del c

    peak = cpu_peak_bytes(fn)
    assert peak is not None, "the profiler recorded no memory events"
    assert 3 * MiB <= peak < 3 * MiB + 64 * 1024, peak / MiB
    assert kept.sum() == 4 * MiB


def test_cpu_peak_bytes_sees_autograd_buffers():
    x = torch.randn(256, 512, requires_grad=True)
    w = torch.randn(512, 1024, requires_grad=True)

    def fn():
        (x @ w).relu().sum().backward()

    peak = cpu_peak_bytes(fn)
    # Peak in backward: the gradient of the (256, 1024) product (1 MiB) and those of w (2 MiB) and
    # x (0.5 MiB) are alive at once; the product was freed after the ReLU, the ReLU's saved output
    # once its backward had used it. Counting frees at an op's start would report 2.5 MiB.
    expected = (256 * 1024 + 512 * 1024 + 256 * 512) * 4
    assert expected <= peak < expected + 64 * 1024, (peak / MiB, expected / MiB)
