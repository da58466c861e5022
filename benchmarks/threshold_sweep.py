"""Analysis only: accuracy and mean exit layer of an exit model at many thresholds, on an evaluation split.

Every head is evaluated once per row (one cached pass, `eat.bench.tau_sweep`), then each threshold's decisions are
replayed, so the table is exact and untimed. It answers "could any threshold reach accuracy A by exit layer L?"
(for example target 2: the half-depth model's speed is three layers). It is NOT a way to choose an operating
point: thresholds are chosen on the calibration split by `eat tune`; a point picked from this table would be
picked on dev.

    python benchmarks/threshold_sweep.py --run runs/plain/eat-mean-frozen --task sst2 \
        --out benchmarks/results/threshold_sweep_sst2_plain_mean_frozen.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from eat.bench import tau_sweep  # noqa: E402
from eat.checkpoints import load_classifier, model_folder  # noqa: E402
from eat.configuration_eat import MECHANISMS_OFF  # noqa: E402
from eat.data import encode, load_glue, task_spec  # noqa: E402
from eat.evaluation import classification_metrics, predict_encoded  # noqa: E402
from eat.timing import environment  # noqa: E402

THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
# with three or more classes a head's top probability can be as low as 1 / classes, and MNLI's exits happen there
COARSE_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def default_thresholds(num_labels: int) -> tuple[float, ...]:
    """The fine grid near 1 for every task, preceded for three or more classes by the coarse grid above chance
    (a binary head's top probability is at least 0.5, and SST-2's exits happen near 1)."""
    if num_labels <= 2:
        return THRESHOLDS
    return tuple(t for t in COARSE_THRESHOLDS if t > 1.0 / num_labels) + THRESHOLDS


def sweep_lines(run: Path, task: str, split: str, max_length: int = 128,
                thresholds: tuple[float, ...] | None = None) -> list[str]:
    """The table for one split: everything-off accuracy, then one row per (exit rule, threshold); ``thresholds``
    defaults to :func:`default_thresholds` for the model's number of classes."""
    model_dir = model_folder(run)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_glue(task, split)
    encoded = encode(data, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id or 0
    off = load_classifier(str(model_dir))
    off.config.set_knobs(**MECHANISMS_OFF)
    full = predict_encoded(off, encoded, pad_id=pad_id)
    full_accuracy = classification_metrics(full.labels, full.predictions)["accuracy"]
    model = load_classifier(str(model_dir), knobs={"keep_ratio": 1.0, "exit_layers": "all"})
    thresholds = thresholds or default_thresholds(model.config.num_labels)
    lines = [f"## {task} {split}: {len(encoded.labels)} rows ({data.source}), exits off {full_accuracy:.2f}",
             "| exit rule | threshold | accuracy | vs exits off | mean exit layer |", "|---|---|---|---|---|"]
    for policy in ("confidence", "agreement"):
        for row in tau_sweep(model, encoded, thresholds, policy=policy, pad_id=pad_id):
            lines.append(f"| {policy} | {row['tau']:.3f} | {row['accuracy']:.2f} | "
                         f"{row['accuracy'] - full_accuracy:+.2f} | {row['mean_exit_layer']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="an EAT run folder (with model/)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="thresholds to replay (default: by the number of classes, see default_thresholds)")
    args = parser.parse_args()
    if args.thresholds and not all(0.0 < t <= 1.0 for t in args.thresholds):
        parser.error(f"--thresholds must lie in (0, 1], got {args.thresholds}")
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    lines = [f"# Threshold sweep of {args.run} (analysis only, not a tuning: every threshold on the evaluation "
             f"split), {env['cpu']}, torch {env['torch']}", ""]
    for split in task_spec(args.task).eval_splits:
        lines += sweep_lines(args.run, args.task, split,
                             thresholds=tuple(args.thresholds) if args.thresholds else None) + [""]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
