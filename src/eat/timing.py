"""Latency and throughput measurement: value objects, environment capture, side-by-side timing.

Rules kept here (see DESIGN.md "How to measure speed honestly"): warm up first; time each call with
``time.perf_counter`` and, on CUDA, synchronise before reading the clock; compare configurations side by side in
one process, interleaved on the same inputs; record threads, device and versions with every figure.
"""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> "LatencyStats":
        """Stats of raw timings in seconds (percentiles by linear interpolation, numpy's default)."""
        if len(samples) == 0:
            raise ValueError("no timings to summarise")
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(count=len(ms), mean_ms=float(ms.mean()), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                   std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, min_ms=float(ms.min()),
                   max_ms=float(ms.max()))

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Fields as a flat dict, names prefixed (for result rows)."""
        return {prefix + key: value for key, value in asdict(self).items()}


def cpu_model() -> str:
    """The CPU as result rows name it: model name, x86 family and model numbers, and the vector ISA torch's kernels
    use, e.g. "AMD EPYC (family 25 model 1, AVX2)". Cloud VMs report the bare name "AMD EPYC" for several
    generations (this project has run on a Zen 4 with AVX-512 BF16 and a Zen 3 with AVX2 only, which time very
    differently), so the name alone cannot tell two machines apart."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = []
    if "cpu family" in fields and "model" in fields:  # x86 only; other architectures name no family
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    details.append(torch.backends.cpu.get_cpu_capability())
    return f"{name} ({', '.join(details)})"


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit (with "+dirty" when the tree has changes), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=cwd, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, timeout=10).stdout.strip()
        return (commit + ("+dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str = "cpu") -> dict[str, Any]:
    """What a measurement ran on: device, threads, CPU/GPU model, torch/transformers versions, commit."""
    import transformers

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else ""
    return {"device": device, "threads": torch.get_num_threads(), "cpu": cpu_model(), "gpu": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "git_commit": git_commit(Path(__file__).parent)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rotated_calls(calls: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], device: str):
    """Yield (input index, name, output, seconds) for every configuration on every input: per input each
    configuration runs once, in an order that rotates from input to input, each call timed alone (synchronised
    on CUDA). The loop both interleaved timers share."""
    names = list(calls)
    for index, item in enumerate(inputs):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            result = calls[name](item)
            _sync(device)
            yield index, name, result, time.perf_counter() - start


def interleaved_latency(calls: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], *, warmup: int = 10,
                        device: str = "cpu", on_result: Callable[[str, int, Any], None] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, LatencyStats]:
    """Time every call on every input, side by side: for each input, each configuration runs once, in an order that
    rotates from input to input (so drift and caching favour nobody). Returns per-configuration latency.

    calls: name -> function(input) (the model call; returns its output). on_result(name, input index, output)
    receives every timed call's output, so accuracy comes from the very same calls that were timed.
    """
    names = list(calls)
    with torch.inference_mode():
        for name in names:  # warm-up: allocator, kernels, lazy caches (fused weights)
            for item in list(inputs[:warmup]) or list(inputs[:1]):
                calls[name](item)
        _sync(device)
        timings: dict[str, list[float]] = {name: [] for name in names}
        for index, name, result, seconds in _rotated_calls(calls, inputs, device):
            timings[name].append(seconds)
            if on_result is not None:
                on_result(name, index, result)
            if progress is not None and name == names[(index - 1) % len(names)]:  # the input's last call
                progress(index + 1, len(inputs))
    return {name: LatencyStats.from_seconds(values) for name, values in timings.items()}


def interleaved_throughput(calls: dict[str, Callable[[Any], Any]], batches: Sequence[Any], rows: int, *,
                           warmup: int = 2, device: str = "cpu",
                           repeats: int = 1) -> dict[str, tuple[float, LatencyStats]]:
    """Rows per second of every call over the same ``batches``, side by side: batch by batch, each configuration
    runs once, in an order that rotates from batch to batch (as :func:`interleaved_latency`), so a slow spell of
    the machine falls on every configuration alike. Timed one configuration after another instead, two points with
    identical work measured 10-20% apart on a shared VM.

    A configuration's pass time is the sum of its own batch times; with ``repeats`` passes, its best pass counts.
    Returns name -> (rows per second, per-batch latency of that best pass).
    """
    names = list(calls)
    with torch.inference_mode():
        for name in names:
            for batch in list(batches[:warmup]):
                calls[name](batch)
        _sync(device)
        best: dict[str, list[float] | None] = {name: None for name in names}
        for _ in range(repeats):
            this_pass: dict[str, list[float]] = {name: [] for name in names}
            for _, name, _, seconds in _rotated_calls(calls, batches, device):
                this_pass[name].append(seconds)
            for name, seconds in this_pass.items():
                if best[name] is None or sum(seconds) < sum(best[name]):
                    best[name] = seconds
    return {name: (rows / sum(seconds), LatencyStats.from_seconds(seconds)) for name, seconds in best.items()}


def throughput(call: Callable[[Any], Any], batches: Sequence[Any], rows: int, *, warmup: int = 2,
               device: str = "cpu", repeats: int = 1) -> tuple[float, LatencyStats]:
    """Rows per second of one call over ``batches`` (each call one batch), and per-batch latency; best of
    ``repeats`` passes. To compare configurations, use :func:`interleaved_throughput`."""
    return interleaved_throughput({"call": call}, batches, rows, warmup=warmup, device=device, repeats=repeats)["call"]


__all__ = ["LatencyStats", "environment", "cpu_model", "git_commit", "interleaved_latency", "interleaved_throughput",
           "throughput"]
