"""Sequence labelling with token-level exits: prediction, entity-level evaluation and the choice of ``tau``.

Words are labelled from their first subword (see :mod:`eat.ner_data`); a sentence split into chunks is put back
together before scoring, so entity F1 is computed on whole sentences exactly as conlleval/seqeval define it.
Work is counted from the model's own counters: ``token_layers`` (tokens updated as queries) against the static
model's ``real tokens x layers``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .modeling_eat import EATForTokenClassification, WorkCounters
from .ner_data import EncodedTagged, TaggedData, collate_tagged, entity_scores, tagged_batches


@dataclass
class TaggedPredictions:
    """Predicted tags and the layer each word's label was read at, per sentence; plus the work done."""

    tags: list[list[str]]
    exit_layers: list[list[int]]
    work: WorkCounters
    real_tokens: int
    num_layers: int
    per_exit_tags: dict[int, list[list[str]]] = field(default_factory=dict)
    chunks: int = 0

    @property
    def token_layer_ratio(self) -> float:
        """Token-layers updated / the static model's (every real token through every layer)."""
        return self.work.token_layers / max(1, self.real_tokens * self.num_layers)


def join_chunks(per_chunk: Sequence[list], chunk_sentence: Sequence[int], sentences: int) -> list[list]:
    """Put per-chunk word lists (tags, exit layers, ...) back together per sentence. ``chunk_sentence[i]`` is the
    sentence of chunk ``i``; the chunks of a sentence are consecutive and in order (see :func:`encode_tagged`)."""
    joined: list[list] = [[] for _ in range(sentences)]
    for chunk, sentence in enumerate(chunk_sentence):
        joined[sentence].extend(per_chunk[chunk])
    return joined


@torch.no_grad()
def predict_tagged(model: EATForTokenClassification, encoded: EncodedTagged, data: TaggedData, *,
                   batch_size: int = 32, device: str = "cpu", pad_id: int = 0, disable_exit: bool = False,
                   per_exit: bool = False) -> TaggedPredictions:
    """Run the model over every chunk and assemble word-level tags per sentence.

    per_exit: also read every exit head on every word (one pass with exits disabled), for per-layer F1."""
    model.eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    chunk_tags: dict[int, list[str]] = {}
    chunk_exits: dict[int, list[int]] = {}
    chunk_heads: dict[int, list[list[str]]] = {}
    work = WorkCounters()
    real = 0
    for batch in tagged_batches(encoded, batch_size, pad_id=pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], word_mask=batch["word_mask"],
                    disable_exit=disable_exit or per_exit, output_exit_logits=per_exit)
        work.add(out.work)
        real += int(batch["attention_mask"].sum())
        predicted = out.logits.nan_to_num(0.0).argmax(-1).cpu()
        exits = out.token_exit_layer.cpu()
        heads = out.exit_logits.nan_to_num(0.0).argmax(-1).cpu() if per_exit else None  # (B, E, n)
        for i, row in enumerate(batch["index"].tolist()):
            words = batch["word_mask"][i].cpu()
            chunk_tags[row] = [names[j] for j in predicted[i][words].tolist()]
            chunk_exits[row] = exits[i][words].tolist()
            if heads is not None:
                chunk_heads[row] = [[names[j] for j in heads[i, e][words].tolist()] for e in range(heads.shape[1])]
    sentences = len(data.sentences)
    rows = range(len(encoded))
    tags = join_chunks([chunk_tags[r] for r in rows], encoded.sentence, sentences)
    exit_layers = join_chunks([chunk_exits[r] for r in rows], encoded.sentence, sentences)
    per_exit_tags = {layer: join_chunks([chunk_heads[r][slot] for r in rows], encoded.sentence, sentences)
                     for slot, layer in enumerate(model.config.exit_layer_list)} if per_exit else {}
    return TaggedPredictions(tags, exit_layers, work, real, model.config.num_hidden_layers, per_exit_tags, len(encoded))


def summarize_tagged(predictions: TaggedPredictions, data: TaggedData) -> dict[str, Any]:
    """Entity precision/recall/F1, per-exit F1 (when read), word exit distribution, work ratios."""
    gold = [sentence.tags for sentence in data.sentences]
    for sentence, (want, got) in enumerate(zip(gold, predictions.tags)):
        if len(want) != len(got):
            raise RuntimeError(f"sentence {sentence}: {len(want)} gold tags but {len(got)} predictions")
    scores = entity_scores(gold, predictions.tags)
    words = Counter(layer for sentence in predictions.exit_layers for layer in sentence)
    total = sum(words.values())
    summary: dict[str, Any] = {
        **scores,
        "sentences": len(gold),
        "words": total,
        "word_exit_distribution": {str(layer): words[layer] / total for layer in sorted(words)},
        "mean_word_exit_layer": sum(layer * count for layer, count in words.items()) / max(1, total),
        "token_layer_ratio": predictions.token_layer_ratio,
        "mean_sentence_layers": predictions.work.layers_run / max(1, predictions.chunks),
        "kv_token_layer_ratio": predictions.work.kv_token_layers / max(1, predictions.real_tokens
                                                                        * predictions.num_layers),
        "work": dict(vars(predictions.work)),
    }
    if predictions.per_exit_tags:
        summary["per_exit_f1"] = {str(layer): entity_scores(gold, tags)["f1"]
                                  for layer, tags in predictions.per_exit_tags.items()}
    return summary


def evaluate_tagged(model: EATForTokenClassification, encoded: EncodedTagged, data: TaggedData, **kwargs) -> dict:
    """:func:`predict_tagged` then :func:`summarize_tagged`."""
    return summarize_tagged(predict_tagged(model, encoded, data, **kwargs), data)


# exit rules tried by :func:`tune_token_exits`: confidence alone; agreement (the last `exit_patience` heads agree
# and the max probability reaches tau), which lets a sentence finish earlier at the same F1; TOKEE's window
# criterion (neighbours confident too); and heads from layer 2 on (layer 1's head is weak on a frozen backbone)
_LATER = [2, 3, 4, 5, 6]
TOKEN_EXIT_GRID = (
    [{"exit_policy": "confidence", "exit_threshold": tau, "token_exit_window": w}
     for tau, w in ((0.99, 0), (0.995, 0), (0.995, 1))]
    + [{"exit_policy": "agreement", "exit_patience": 2, "exit_threshold": tau, "token_exit_window": w}
       for tau, w in ((0.9, 0), (0.95, 0), (0.9, 1), (0.95, 1), (0.98, 1))]
    + [{"exit_policy": "agreement", "exit_patience": 2, "exit_threshold": tau, "token_exit_window": w,
        "exit_layers": _LATER} for tau, w in ((0.95, 0), (0.95, 1))]
    + [{"exit_policy": "agreement", "exit_patience": 3, "exit_threshold": tau} for tau in (0.8, 0.9)])


def tune_token_exits(model: EATForTokenClassification, encoded: EncodedTagged, data: TaggedData, *,
                     max_drop: float, max_work: float = 1.0, grid: Sequence[dict[str, Any]] = TOKEN_EXIT_GRID,
                     device: str = "cpu", pad_id: int = 0,
                     reference_model: EATForTokenClassification | None = None) -> dict[str, Any]:
    """Choose the token exit rule on a calibration split: among the rules whose entity F1 is at most ``max_drop``
    points below the same model with exits off and whose token-layer work is at most ``max_work`` of the static
    model's, the one whose sentences run the fewest layers (what batch-1 latency follows: a sentence stops when
    its last token has left), ties broken by token-layer work. Every rule is a real run (a token's exit changes
    what the others attend to, so one cached pass cannot stand in). Rules need heads at their ``exit_layers``
    (rules naming layers without heads are skipped).

    ``reference_model``: the model whose exits-off F1 the drop counts from, when not ``model`` itself: the int8
    tuner passes the fp32 model, so that the quantization's own cost is inside the allowed drop (as the sentence
    tuner counts from the fp32 reference)."""
    saved = model.config.knobs()
    reference = evaluate_tagged(reference_model if reference_model is not None else model, encoded, data,
                                device=device, pad_id=pad_id, disable_exit=True)
    candidates = []
    try:
        for knobs in grid:
            knobs = {"exit_layers": "all", "token_exit_window": 0, **knobs}
            heads = {str(layer) for layer in model.config.exit_layer_list[:-1]} if knobs["exit_layers"] == "all" \
                else {str(layer) for layer in knobs["exit_layers"] if layer != model.config.num_hidden_layers}
            if not heads <= set(model.exit_heads):
                continue
            model.config.set_knobs(**knobs)
            result = evaluate_tagged(model, encoded, data, device=device, pad_id=pad_id)
            candidates.append({"knobs": dict(knobs), "f1": result["f1"], "token_layer_ratio": result["token_layer_ratio"],
                               "mean_sentence_layers": result["mean_sentence_layers"]})
    finally:
        model.config.set_knobs(**saved)
    fitting = [c for c in candidates if c["f1"] >= reference["f1"] - max_drop and c["token_layer_ratio"] <= max_work]
    if fitting:
        best = min(fitting, key=lambda c: (c["mean_sentence_layers"], c["token_layer_ratio"]))
        criterion = (f"fewest layers per sentence with calibration F1 >= reference - {max_drop} and token-layer "
                     f"work <= {max_work}")
    else:
        best = max(candidates, key=lambda c: c["f1"])
        criterion = "no rule within max_drop and max_work: the most accurate"
    return {"knobs": dict(best["knobs"]), "calibration_f1": best["f1"],
            "reference_f1": reference["f1"], "token_layer_ratio": best["token_layer_ratio"],
            "mean_sentence_layers": best["mean_sentence_layers"], "max_drop": max_drop, "candidates": candidates,
            "criterion": criterion}


@torch.no_grad()
def tag_texts(model: EATForTokenClassification, tokenizer, texts: list[str], *, max_length: int = 128,
              device: str = "cpu") -> list[dict[str, Any]]:
    """Tag raw texts one by one (batch 1): words are the text split on whitespace; each gets a tag, its
    confidence and the layer its label was read at. A text longer than the limit is tagged in chunks."""
    from .ner_data import TaggedSentence, encode_tagged

    model.eval().to(device)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    results = []
    for i, text in enumerate(texts):
        words = text.split()
        if not words:
            raise ValueError(f"text {i} is empty")
        data = TaggedData([TaggedSentence(words, ["O"] * len(words), i + 1)], tuple(names), f"text {i}")
        encoded = encode_tagged(data, tokenizer, max_length)
        tags, confidences, exits = [], [], []
        for chunk in range(len(encoded)):
            batch = collate_tagged(encoded, [chunk], tokenizer.pad_token_id or 0)
            out = model(batch["input_ids"].to(device), None, None, word_mask=batch["word_mask"].to(device))
            probs = out.logits[0].float().softmax(-1)[batch["word_mask"][0].to(device)]  # (words, C)
            tags += [names[j] for j in probs.argmax(-1).tolist()]
            confidences += probs.amax(-1).tolist()
            exits += out.token_exit_layer[0][batch["word_mask"][0].to(device)].tolist()
        results.append({"text": text, "words": words, "tags": tags, "confidence": confidences, "exit_layer": exits})
    return results


__all__ = ["join_chunks", "tag_texts", "TaggedPredictions", "predict_tagged", "summarize_tagged", "evaluate_tagged",
           "tune_token_exits", "TOKEN_EXIT_GRID"]
