"""How much of a batch speedup is padding? A tuned point against static at batch N, in two batch orders.

`eat bench` and `eat tune --batch-size N` time batches in arrival order (the order rows come in), which is what a
queue that serves requests as they arrive sees. Then most of a batch can be padding (MNLI at batch 32: more than
half), and an early-exit model gains twice: a row that leaves stops costing, and once the longest rows have left
the rest of the batch is trimmed to the longest row still running. A server that sorts rows by length before
batching ("bucketed") pays little padding, so only the first gain is left. This script times both orders on the
same rows, static and the tuned point side by side (interleaved batch by batch, best of ``--repeats`` passes), and
prints the padding share and the ratio for each, so a batch speedup can be read with or without the padding it
saved.

    python benchmarks/batch_order.py --task mnli --run runs/mnli3k/eat-pair-frozen --static runs/mnli3k/static \
        --tuned results/mnli3k-pair-zen3/tuned_mnli_b32.json --rows 1024 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from eat.bench import batch_forward  # noqa: E402
from eat.checkpoints import load_classifier, model_folder  # noqa: E402
from eat.configuration_eat import MECHANISMS_OFF  # noqa: E402
from eat.data import EncodedDataset, batches, encode, load_glue, padding_share, task_spec  # noqa: E402
from eat.timing import environment, interleaved_throughput  # noqa: E402


def compare_orders(static, tuned, encoded: EncodedDataset, batch_size: int, *, repeats: int = 3,
                   pad_id: int = 0) -> dict[str, dict[str, float]]:
    """{"arrival" | "bucketed": {padding, static_rows_per_s, eat_rows_per_s, speedup}}: the two models timed side
    by side on the same rows cut into batches of ``batch_size`` in arrival order, then sorted by length."""
    results = {}
    for order, bucket in (("arrival", False), ("bucketed", True)):
        batched = list(batches(encoded, batch_size, bucket=bucket, pad_id=pad_id))
        calls = {"static": batch_forward(static), "eat": batch_forward(tuned)}
        timing = interleaved_throughput(calls, batched, len(encoded), repeats=repeats)
        static_rate, eat_rate = timing["static"][0], timing["eat"][0]
        results[order] = {"padding": padding_share(batched), "static_rows_per_s": static_rate,
                          "eat_rows_per_s": eat_rate, "speedup": eat_rate / static_rate}
    return results


def main() -> None:
    """Parse arguments, time both orders, print (and with --out save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--split", help="evaluation split (default: the task's first)")
    parser.add_argument("--run", required=True, help="the EAT run (a folder with model/)")
    parser.add_argument("--static", required=True, help="the static run it is compared with")
    parser.add_argument("--tuned", required=True, type=Path, help="a tuned_<task>[_bN].json from eat tune")
    parser.add_argument("--rows", type=int, help="seeded sample of the split (default: all rows)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.tuned.is_file():
        parser.error(f"--tuned {args.tuned}: no such file (write one with eat tune)")
    try:
        knobs = json.loads(args.tuned.read_text())["knobs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        parser.error(f"--tuned {args.tuned}: not a tuner output (a JSON object with 'knobs', as eat tune writes)")
    split = args.split or task_spec(args.task).eval_splits[0]
    tokenizer = AutoTokenizer.from_pretrained(model_folder(args.run))
    data = load_glue(args.task, split).subset(args.rows, seed=0)
    encoded = encode(data, tokenizer, 128)
    static = load_classifier(str(model_folder(args.static)), knobs=MECHANISMS_OFF)
    tuned = load_classifier(str(model_folder(args.run)), knobs=knobs)
    results = compare_orders(static, tuned, encoded, args.batch_size, repeats=args.repeats,
                             pad_id=tokenizer.pad_token_id or 0)
    env = environment()
    lines = [f"# batch order: {args.task} {split}, {len(encoded)} rows, batch {args.batch_size}, best of "
             f"{args.repeats} interleaved passes; {env['cpu']}, {env['device']}, {env['threads']} threads, torch "
             f"{env['torch']}, commit {env['git_commit']}",
             f"# static {args.static}; tuned point {args.run} {knobs} ({args.tuned})",
             "| batch order | padding | static rows/s | tuned rows/s | speedup |", "|---|---|---|---|---|"]
    for order, row in results.items():
        lines.append(f"| {order} | {100 * row['padding']:.0f}% | {row['static_rows_per_s']:.0f} | "
                     f"{row['eat_rows_per_s']:.0f} | {row['speedup']:.2f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
