"""Side-by-side timing of each EAT mechanism on the packaged backbone (batch 1), with work counters.

    .venv/bin/python benchmarks/mechanisms.py --threads 2 [--rows 200] [--out benchmarks/results/mechanisms.txt]
    .venv/bin/python benchmarks/mechanisms.py --threads 2 --shape bert-base   # 12 layers x 768, random weights

Compares, interleaved on the same inputs in one process: Hugging Face `BertForSequenceClassification`, EAT static
(every knob off), EAT with every mechanism enabled but inactive (keep ratio 1, tau above 1, window wider than the
input), each mechanism alone, and all three. Two input regimes: real SST-2 dev sentences (short) and long inputs
(dev sentences concatenated to --long-tokens). Heads are random (the backbone has none): exit thresholds are set
from the heads' own confidence quantiles so that a known share of rows exits early; accuracy means nothing here,
only work and time do. Every figure printed is a ratio to EAT static measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

from eat.checkpoints import default_backbone, load_classifier  # noqa: E402
from eat.data import load_glue  # noqa: E402
from eat.modeling_eat import WorkCounters  # noqa: E402
from eat.timing import environment, interleaved_latency  # noqa: E402


def build_inputs(tokenizer, rows: int, long_tokens: int, seed: int):
    """(short inputs, long inputs): lists of (1, n) id tensors from SST-2 dev."""
    dev = load_glue("sst2", "validation").subset(rows, seed=seed).frame["text"].tolist()
    short = [tokenizer(text, return_tensors="pt")["input_ids"] for text in dev]
    rng = np.random.default_rng(seed)
    long = []
    for _ in range(max(8, rows // 10)):
        text = " ".join(rng.choice(dev, size=80))
        long.append(tokenizer(text, return_tensors="pt", truncation=True, max_length=long_tokens)["input_ids"])
    return short, long


def exit_threshold_for(model, inputs, layer_slot: int = 1, share: float = 0.5) -> float:
    """A tau at which about ``share`` of the inputs leave at or before head ``layer_slot`` (random heads)."""
    confidences = []
    with torch.inference_mode():
        for ids in inputs[:64]:
            out = model(ids, output_exit_logits=True, disable_exit=True)
            confidences.append(out.exit_logits[0, : layer_slot + 1].softmax(-1).amax(-1).max().item())
    return float(np.quantile(confidences, 1 - share))


def random_backbone(folder: Path, layers: int, hidden: int, heads: int, tokenizer) -> str:
    """Save a random BERT of the given shape (same vocabulary) and return its path."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        intermediate_size=4 * hidden, vocab_size=tokenizer.vocab_size)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def run_regime(name: str, inputs, backbone: str, window: int, warmup: int) -> list[str]:
    """Time every configuration on one regime; returns printable lines."""
    torch.manual_seed(0)
    static = load_classifier(backbone, num_labels=2)
    head_state = {k: v for k, v in static.state_dict().items() if not k.startswith("bert.")}
    longest = max(ids.shape[1] for ids in inputs)
    probe = load_classifier(backbone, num_labels=2, knobs={"exit_layers": "all"})
    probe.load_state_dict(head_state, strict=False)
    # half of the rows leave by the head at a third of the depth (layer 2 of 6, layer 4 of 12)
    tau = exit_threshold_for(probe, inputs, layer_slot=probe.config.num_hidden_layers // 3 - 1)
    configs = {
        "eat static": {},
        "eat inactive": {"keep_ratio": 1.0, "exit_layers": "all", "exit_policy": "confidence", "exit_threshold": 1.01,
                         "attention_window": 4 * longest},
        "prune only": {"keep_ratio": [0.9, 0.6]},
        "sparse only": {"attention_window": window},
        "exit only": {"exit_layers": "all", "exit_policy": "confidence", "exit_threshold": tau},
        "all three": {"keep_ratio": [0.9, 0.6], "attention_window": window, "exit_layers": "all",
                      "exit_policy": "confidence", "exit_threshold": tau},
    }
    models = {}
    for label, knobs in configs.items():
        model = load_classifier(backbone, num_labels=2, knobs=knobs)
        model.load_state_dict(head_state, strict=False)  # same final head for every configuration
        for layer, head in model.exit_heads.items():
            head.load_state_dict(probe.exit_heads[layer].state_dict())
        models[label] = model.eval()
    hf = BertForSequenceClassification.from_pretrained(backbone, num_labels=2).eval()
    hf.load_state_dict({k: v for k, v in static.state_dict().items() if not k.startswith("exit_heads")}, strict=False)
    work = {label: WorkCounters() for label in models}
    calls = {"hf bert": lambda ids: hf(input_ids=ids)}
    for label, model in models.items():
        calls[label] = lambda ids, model=model: model(ids)

    def record(label, index, output):
        if label in work:
            work[label].add(output.work)

    stats = interleaved_latency(calls, inputs, warmup=warmup, on_result=record)
    base = stats["eat static"].p50_ms
    lengths = [ids.shape[1] for ids in inputs]
    lines = [f"## {name}: {len(inputs)} inputs, {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), "
             f"window {window}, tau {tau:.3f}",
             f"{'configuration':<14} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'speedup':>8} {'layers/row':>10} "
             f"{'token-layers':>13} {'attn scores':>12}"]
    for label, stat in stats.items():
        counters = work.get(label)
        extra = ("" if counters is None else
                 f" {counters.layers_run / len(inputs):>10.2f} {counters.token_layers:>13,} {counters.attention_scores:>12,}")
        lines.append(f"{label:<14} {stat.p50_ms:>8.2f} {stat.p90_ms:>8.2f} {stat.p99_ms:>8.2f} "
                     f"{base / stat.p50_ms:>7.2f}x{extra}")
    inactive = stats["eat inactive"].p50_ms / base
    lines.append(f"enabled-but-inactive / static p50: {inactive:.3f} (target <= 1.03); "
                 f"static / HF p50: {base / stats['hf bert'].p50_ms:.3f} (target <= 1.00)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=["minilm", "bert-base"], default="minilm",
                        help="minilm: the packaged pretrained backbone; bert-base: 12 x 768 random weights")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if "EAT_DATA_DIR" not in os.environ and (Path(__file__).resolve().parents[2] / "shared/data/glue").is_dir():
        os.environ["EAT_DATA_DIR"] = str(Path(__file__).resolve().parents[2] / "shared/data/glue")
    backbone = default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    short, long = build_inputs(tokenizer, args.rows, args.long_tokens, args.seed)
    shape = "packaged backbone (6 x 384, pretrained; random heads)"
    if args.shape == "bert-base":
        import tempfile

        backbone = random_backbone(Path(tempfile.mkdtemp()), 12, 768, 12, tokenizer)
        shape = "BERT-base shape (12 x 768), RANDOM weights: timing and work only"
    env = environment()
    lines = [f"# EAT mechanisms side by side, batch 1, {shape}",
             f"cpu: {env['cpu']}, threads: {env['threads']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, commit {env['git_commit']}", ""]
    lines += run_regime("SST-2 dev sentences", short, backbone, window=16, warmup=args.warmup) + [""]
    lines += run_regime(f"long inputs ({args.long_tokens} tokens)", long, backbone, window=64, warmup=2)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
