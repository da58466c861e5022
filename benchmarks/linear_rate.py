"""How fast this CPU runs the model's linear layers (fp32 GFLOP/s), for the long-input account of target 5.

A windowed model and a dense one share every linear layer, so the window's speedup at 4,096 tokens is capped by
how much of the dense forward is *not* linear work. If the model's own shapes already run at the rate of a large
matrix product, no kernel choice makes that shared part cheaper, and the cap is the machine's, not the code's.

    python benchmarks/linear_rate.py --threads 2 [--out benchmarks/results/linear_rate.txt]

Times `F.linear` (weights as the model holds them, bias included) at the backbone's shapes for 1,024-token
feed-forward chunks and 4,096-token projections, and one large 4,096 x 2,048 x 2,048 product for comparison;
median of 30 calls after 3 warm-up calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from eat.timing import environment  # noqa: E402

# (rows, in features, out features, what it is): the 6 x 384 backbone (intermediate 1,536)
SHAPES = ((4096, 384, 384, "q/k/v/output projection, 4,096 tokens"),
          (1024, 384, 1536, "feed-forward up, 1,024-token chunk"),
          (1024, 1536, 384, "feed-forward down, 1,024-token chunk"),
          (4096, 2048, 2048, "large product, for comparison"))


def linear_rate(rows: int, fan_in: int, fan_out: int, repeats: int = 30) -> tuple[float, float]:
    """(median milliseconds, GFLOP/s) of one fp32 `F.linear` of (rows, fan_in) by (fan_out, fan_in)."""
    x, weight, bias = torch.randn(rows, fan_in), torch.randn(fan_out, fan_in), torch.randn(fan_out)
    for _ in range(3):
        F.linear(x, weight, bias)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, weight, bias)
        times.append(time.perf_counter() - start)
    median = sorted(times)[repeats // 2]
    return median * 1e3, 2 * rows * fan_in * fan_out / median / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    lines = ["# fp32 linear layers at the backbone's shapes (median of 30 calls)",
             f"cpu: {env['cpu']}, threads: {env['threads']}, torch {env['torch']}",
             f"{'rows x in x out':>20} {'ms':>8} {'GFLOP/s':>8}  shape"]
    for rows, fan_in, fan_out, what in SHAPES:
        ms, rate = linear_rate(rows, fan_in, fan_out)
        lines.append(f"{f'{rows} x {fan_in} x {fan_out}':>20} {ms:>8.2f} {rate:>8.0f}  {what}")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
