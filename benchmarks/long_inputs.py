"""Long inputs: dense vs sliding-window attention, full forward pass, random weights (timing only).

    .venv/bin/python benchmarks/long_inputs.py --threads 2 [--lengths 1024 2048 4096 8192] [--window 256] [--flex]
                                               [--ffn-chunk 1024] [--dtype bfloat16] [--gathered]

Model: the packaged backbone's shape (6 layers, hidden 384, 12 heads of 32) with 8,192 positions and random
weights; accuracy means nothing here. For every length, dense and windowed forwards (window 256 + `[CLS]` global)
run in the same process, alternated, after warm-up; the peak resident memory of each configuration is measured
in a fresh subprocess (so one run's allocations do not hide another's). Prints ratios dense / window.
Every model runs its feed-forward on `--ffn-chunk` tokens at a time (Hugging Face's `chunk_size_feed_forward`,
the same for dense and window; 0 = all tokens at once). `--dtype bfloat16` runs both models in bf16 (worth it on
CPUs with native bf16 matrix instructions). `--gathered` adds the window kernel with its band-view path off (every
block's keys gathered by `index_select`, as training and padded batches run it), timed in the same rotation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from eat import EATConfig, EATForSequenceClassification, modeling_eat  # noqa: E402
from eat.timing import environment, interleaved_latency  # noqa: E402


def make_model(window: int | None, positions: int, backend: str = "blocked",
               ffn_chunk: int = 0, dtype: str = "float32") -> EATForSequenceClassification:
    """A random model of the backbone's shape with `positions` positions (same seed: same weights), in ``dtype``."""
    torch.manual_seed(0)
    config = EATConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=positions, num_labels=2,
                       attention_window=window, attention_backend=backend, chunk_size_feed_forward=ffn_chunk)
    return EATForSequenceClassification(config).eval().to(getattr(torch, dtype))


def _without_band_views(model: EATForSequenceClassification):
    """The same model called with the window kernel's band-view path switched off (keys gathered per block)."""
    def call(inputs):
        saved, modeling_eat._FLASH_CPU = modeling_eat._FLASH_CPU, None
        try:
            return model(inputs)
        finally:
            modeling_eat._FLASH_CPU = saved
    return call


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_child(length: int, window: int | None, positions: int, backend: str, ffn_chunk: int,
                      dtype: str) -> None:
    """Print, as JSON, how far one forward raises resident memory above what the model already holds (MiB).

    The peak is reset after the model is built (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so
    model creation does not mask the forward's own peak."""
    model = make_model(window, positions, backend, ffn_chunk, dtype)
    ids = torch.randint(1000, 2000, (1, length))
    with torch.inference_mode():
        model(ids[:, :8])
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    with torch.inference_mode():
        out = model(ids)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_growth_mib": (peak - baseline) / 1024, "scores": out.work.attention_scores}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flex", action="store_true", help="also time the compiled FlexAttention backend")
    parser.add_argument("--ffn-chunk", type=int, default=1024,
                        help="feed-forward tokens per call, dense and window alike (0: all at once)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--gathered", action="store_true",
                        help="also time the window kernel with every block's keys gathered (band views off)")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory columns (no timing)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    positions = max(args.lengths)
    if args.child:
        length, window, backend = json.loads(args.child)
        peak_memory_child(length, window, positions, backend, args.ffn_chunk, args.dtype)
        return
    models = {"dense": make_model(None, positions, ffn_chunk=args.ffn_chunk, dtype=args.dtype),
              "window": make_model(args.window, positions, ffn_chunk=args.ffn_chunk, dtype=args.dtype)}
    if args.flex:
        models["flex"] = make_model(args.window, positions, "flex", args.ffn_chunk, args.dtype)
    if args.gathered:
        models["gathered"] = _without_band_views(models["window"])
    if args.memory_only:
        models = {}
    env = environment()
    lines = ["# Long inputs: full forward, 6 layers x 384 hidden, 12 heads, random weights, batch 1",
             f"cpu: {env['cpu']}, threads: {env['threads']}, torch {env['torch']}, commit {env['git_commit']}, "
             f"{args.dtype}, window {args.window} + [CLS] global, feed-forward chunk {args.ffn_chunk or 'none'}, "
             f"{args.repeats} timed repeats after 1 warm-up",
             f"{'tokens':>7} {'dense ms':>9} {'window ms':>10} {'speedup':>8} {'flex ms':>8} {'flex speedup':>13} "
             f"{'dense MiB':>10} {'window MiB':>11} {'dense scores':>13} {'window scores':>14}"]
    for length in args.lengths:
        inputs = [torch.randint(1000, 2000, (1, length)) for _ in range(args.repeats)]
        stats = interleaved_latency(models, inputs, warmup=1) if models else {}  # flex compiles in its warm-up
        memory = {}
        for name, window in (("dense", None), ("window", args.window)):
            child = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--lengths",
                                    *map(str, args.lengths), "--ffn-chunk", str(args.ffn_chunk), "--dtype", args.dtype,
                                    "--child", json.dumps([length, window, "blocked"])],
                                   capture_output=True, text=True, check=True)
            memory[name] = json.loads(child.stdout.strip().splitlines()[-1])
        flex = (f"{stats['flex'].p50_ms:>8.1f} {stats['dense'].p50_ms / stats['flex'].p50_ms:>12.2f}x"
                if "flex" in stats else f"{'-':>8} {'-':>13}")
        timing = (f"{stats['dense'].p50_ms:>9.1f} {stats['window'].p50_ms:>10.1f} "
                  f"{stats['dense'].p50_ms / stats['window'].p50_ms:>7.2f}x" if stats else f"{'-':>9} {'-':>10} {'-':>8}")
        lines.append(f"{length:>7} {timing} {flex} "
                     f"{memory['dense']['peak_growth_mib']:>10.0f} {memory['window']['peak_growth_mib']:>11.0f} "
                     f"{memory['dense']['scores']:>13,} {memory['window']['scores']:>14,}")
        if "gathered" in stats:
            lines[-1] += (f"   gathered keys {stats['gathered'].p50_ms:.1f} ms "
                          f"({stats['dense'].p50_ms / stats['gathered'].p50_ms:.2f}x)")
        print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
