"""Evaluation and prediction: GLUE metrics, per-exit accuracy, exit distribution, tokens kept.

All metrics come from scikit-learn. Per-exit accuracy and threshold sweeps read the logits of every head from one
cached pass (exits disabled): a sample's hidden states never depend on other samples or on exits, so the cache
gives exactly what a run at any threshold would (a test holds this).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from .data import TextDataset, batches, encode
from .modeling_eat import EATForSequenceClassification, WorkCounters
from .tasks import Task, task_for_model


@dataclass
class Predictions:
    """Per-row results of one pass over a dataset, in the dataset's order.

    exit_logits: (N, E, C) every head's logits when the pass cached them (NaN where not evaluated).
    """

    labels: np.ndarray
    logits: np.ndarray  # (N, C) of the head each row left at
    exit_layer: np.ndarray  # (N,)
    tokens_per_layer: np.ndarray  # (N, L)
    input_length: np.ndarray  # (N,)
    exit_layers: tuple[int, ...]
    exit_logits: np.ndarray | None = None
    work: WorkCounters = field(default_factory=WorkCounters)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(-1)

    @property
    def confidence(self) -> np.ndarray:
        probs = _softmax(self.logits)
        return probs.max(-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


@torch.inference_mode()
def predict_encoded(model: EATForSequenceClassification, encoded, *, batch_size: int = 64, device: str = "cpu",
                    cache_exits: bool = False, pad_id: int = 0) -> Predictions:
    """Run the model over encoded rows (length-sorted batches), results restored to row order.

    cache_exits: evaluate every head and never exit (the cache threshold sweeps read).
    """
    model.eval().to(device)
    n = len(encoded)
    num_layers = model.config.num_hidden_layers
    exit_layers = model.config.exit_layer_list
    logits = np.zeros((n, model.config.num_labels), dtype=np.float32)
    exit_layer = np.zeros(n, dtype=np.int64)
    tokens = np.zeros((n, num_layers), dtype=np.int64)
    cached = np.full((n, len(exit_layers), model.config.num_labels), np.nan, dtype=np.float32) if cache_exits else None
    work = WorkCounters()
    for batch in batches(encoded, batch_size, pad_id=pad_id):
        index = batch["index"].numpy()
        out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["token_type_ids"].to(device), output_exit_logits=cache_exits, disable_exit=cache_exits)
        logits[index] = out.logits.float().cpu().numpy()
        exit_layer[index] = out.exit_layer.cpu().numpy()
        tokens[index] = out.tokens_per_layer.cpu().numpy()
        if cached is not None:
            cached[index] = out.exit_logits.float().cpu().numpy()
        work.add(out.work)
    return Predictions(np.asarray(encoded.labels), logits, exit_layer, tokens, np.asarray(encoded.lengths),
                       exit_layers, cached, work)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, f1: bool = False) -> dict[str, float]:
    """Accuracy (and binary F1 of class 1 when asked, as GLUE reports for QQP), in percent."""
    metrics = {"accuracy": 100.0 * accuracy_score(labels, predictions)}
    if f1:
        metrics["f1"] = 100.0 * f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0)
    return metrics


def exits_at_threshold(exit_logits: np.ndarray, exit_layers: tuple[int, ...], policy: str, threshold: float,
                       patience: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Replay early exit on cached head logits (N, E, C): (chosen logits (N, C), exit layer (N,)).

    Same rules as the model: "confidence" exits at the first head with max probability >= threshold, "entropy" at
    the first with entropy <= threshold, "patience" when the last ``patience`` heads agree, "agreement" when they
    agree and the max probability is >= threshold, "none" at the last head. Regression heads ((N, E, 1)): "delta"
    when the last ``patience`` values each moved by less than threshold, "spread" when they lie within a band
    narrower than threshold (:func:`~eat.modeling_eat.exit_decision`).
    """
    N, E, _ = exit_logits.shape
    if policy in ("delta", "spread"):
        values = exit_logits[..., 0]  # (N, E)
        passes = np.zeros((N, E), dtype=bool)
        if policy == "delta":
            streak = np.ones((N, E), dtype=np.int64)
            for e in range(1, E):
                streak[:, e] = np.where(np.abs(values[:, e] - values[:, e - 1]) < threshold, streak[:, e - 1] + 1, 1)
            passes = streak >= patience
        else:
            for e in range(patience - 1, E):
                window = values[:, e - patience + 1:e + 1]  # (N, patience) the last `patience` values
                passes[:, e] = window.max(1) - window.min(1) < threshold
        passes[:, -1] = True
        slot = passes.argmax(1)
        return exit_logits[np.arange(N), slot], np.asarray(exit_layers)[slot]
    probs = _softmax(exit_logits)
    if policy == "confidence":
        passes = probs.max(-1) >= threshold
    elif policy == "entropy":
        passes = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1) <= threshold
    elif policy in ("patience", "agreement"):
        predictions = probs.argmax(-1)
        streak = np.ones((N, E), dtype=np.int64)
        for e in range(1, E):
            streak[:, e] = np.where(predictions[:, e] == predictions[:, e - 1], streak[:, e - 1] + 1, 1)
        passes = streak >= patience
        if policy == "agreement":
            passes &= probs.max(-1) >= threshold
    else:
        passes = np.zeros((N, E), dtype=bool)
    passes[:, -1] = True
    slot = passes.argmax(1)
    return exit_logits[np.arange(N), slot], np.asarray(exit_layers)[slot]


def summarize(predictions: Predictions, f1: bool = False, task: Task | None = None) -> dict[str, Any]:
    """Metrics, exit-layer distribution, mean layers and tokens for one pass; per-exit accuracy when cached.

    With a ``task``: its metrics (the primary one as ``metric`` / ``metric_value`` too) and per-exit primary metric
    (``per_exit_metric``) instead of accuracy and F1."""
    if task is not None:
        predicted = task.predictions(predictions.logits)
        scores = task.score(predictions.labels, predicted)
        summary: dict[str, Any] = {"metric": task.primary_metric, "metric_value": scores[task.primary_metric],
                                   **scores}
    else:
        summary = classification_metrics(predictions.labels, predictions.predictions, f1)
    counts = Counter(predictions.exit_layer.tolist())
    summary["rows"] = int(len(predictions.labels))
    summary["exit_distribution"] = {int(k): int(v) for k, v in sorted(counts.items())}
    summary["mean_exit_layer"] = float(predictions.exit_layer.mean())
    ran = predictions.tokens_per_layer > 0
    summary["mean_tokens_per_layer"] = [float(predictions.tokens_per_layer[:, i][ran[:, i]].mean()) if ran[:, i].any()
                                        else 0.0 for i in range(ran.shape[1])]
    summary["mean_input_tokens"] = float(predictions.input_length.mean())
    summary["token_layers"] = predictions.work.token_layers
    summary["token_layer_fraction"] = float(predictions.tokens_per_layer.sum() /
                                            (predictions.input_length.sum() * ran.shape[1]))
    if predictions.exit_logits is not None and task is not None:
        summary["per_exit_metric"] = {
            int(layer): task.primary(predictions.labels, task.predictions(predictions.exit_logits[:, slot]))
            for slot, layer in enumerate(predictions.exit_layers)}
    elif predictions.exit_logits is not None:
        summary["per_exit_accuracy"] = {
            int(layer): 100.0 * accuracy_score(predictions.labels, predictions.exit_logits[:, slot].argmax(-1))
            for slot, layer in enumerate(predictions.exit_layers)}
    return summary


def evaluate_static_accuracy(model: EATForSequenceClassification, tokenizer, dataset: TextDataset,
                             max_length: int, device: str = "cpu") -> float:
    """Accuracy (%) of the final head with every row running all layers (exits off)."""
    return evaluate_static_score(model, tokenizer, dataset, max_length, device, task_for_model(2))


def evaluate_static_score(model: EATForSequenceClassification, tokenizer, dataset: TextDataset, max_length: int,
                          device: str = "cpu", task: Task | None = None) -> float:
    """The task's primary metric (%) of the final head with every row running all layers (exits off); without a
    task, accuracy (Pearson for a one-output model)."""
    task = task or task_for_model(model.config.num_labels)
    encoded = encode(dataset, tokenizer, max_length)
    policy = model.config.exit_policy
    model.config.exit_policy = "none"
    try:
        predictions = predict_encoded(model, encoded, device=device, pad_id=tokenizer.pad_token_id or 0)
    finally:
        model.config.exit_policy = policy
    return task.primary(predictions.labels, task.predictions(predictions.logits))


def evaluate_run(task: Task, model, tokenizer, model_dir: Path, knobs: dict[str, Any], *, eval_file: str | None = None,
                 limit: int | None = None, max_length: int = 128, batch_size: int = 64, device: str = "cpu",
                 precision: str = "fp32", backend: str = "torch", log=print) -> Path:
    """`eat eval`: the model on every dev split of ``task`` (or the user's ``eval_file``; ``limit``: a seeded
    subset) through the task's runner, each split's lines to ``log``, and the summaries written beside the
    checkpoint as ``eval[-<knobs>][-<backend>-<precision>].json`` and ``.csv``. Returns the JSON's path."""
    import json

    import pandas as pd

    from .results import atomic_write_text

    runner = task.runner()
    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    report: dict[str, Any] = {"checkpoint": str(model_dir), "task": task.name, "knobs": model.config.knobs(),
                              "precision": precision, "backend": backend}
    rows = []
    for split in runner.dev_splits(eval_file):
        data = runner.load_split(split, eval_file=eval_file, label_names=labels).subset(limit)
        summary = runner.evaluate(model, tokenizer, data, max_length=max_length, batch_size=batch_size, device=device)
        summary["source"], summary["note"] = data.source, data.note
        report[split] = summary
        for line in runner.summary_lines(split, summary):
            log(line)
        rows.append({"split": split, **{k: v for k, v in summary.items() if not isinstance(v, (dict, list))}})
    tag = "eval" if not knobs else "eval-" + "-".join(f"{k}={v}" for k, v in sorted(knobs.items())).replace("/", "_")
    if (precision, backend) != ("fp32", "torch"):  # never overwrite the fp32 eager evaluation
        tag += f"-{backend}-{precision}"
    target = model_dir.parent if model_dir.name == "model" else model_dir
    atomic_write_text(target / f"{tag}.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(target / f"{tag}.csv", pd.DataFrame(rows).to_csv(index=False))
    return target / f"{tag}.json"


@torch.inference_mode()
def predict_texts(model: EATForSequenceClassification, tokenizer, texts: list[str], pairs: list[str] | None = None,
                  *, max_length: int = 128, device: str = "cpu") -> list[dict[str, Any]]:
    """Classify raw texts one by one (batch 1, as a latency-sensitive caller would): label, confidence, exit layer
    (a regression model: its ``score`` instead of label and confidence)."""
    if not texts:
        return []
    model.eval().to(device)
    results = []
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise ValueError(f"text {i} is empty")
        encoded = tokenizer(text, pairs[i] if pairs else None, truncation=True, max_length=max_length,
                            return_tensors="pt")
        token_types = encoded.get("token_type_ids")
        out = model(encoded["input_ids"].to(device), None, None if token_types is None else token_types.to(device))
        if model.config.num_labels == 1:  # a regression head: its value, not a class
            results.append({"text": text, "score": float(out.logits[0, 0]), "exit_layer": int(out.exit_layer[0]),
                            "tokens": int(encoded["input_ids"].shape[1])})
            continue
        probs = out.logits.float().softmax(-1)[0]
        label_id = int(probs.argmax())
        results.append({"text": text, "label": model.config.id2label.get(label_id, str(label_id)),
                        "confidence": float(probs[label_id]), "exit_layer": int(out.exit_layer[0]),
                        "tokens": int(encoded["input_ids"].shape[1])})
    return results


__all__ = ["Predictions", "predict_encoded", "classification_metrics", "exits_at_threshold", "summarize",
           "evaluate_static_accuracy", "evaluate_run", "predict_texts"]
