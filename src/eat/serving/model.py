"""The model side of the service: encode request rows, run a batch, hand back each row's answer when it is known.

:class:`Predictor` knows nothing of HTTP or asyncio: ``run(rows, deliver)`` calls ``deliver(indices, answers)``
from the calling thread as answers become final. With a sentence classifier that has exits on, rows that leave
at an early layer are delivered then (the model's ``on_exit`` hook), before the batch's slowest row is done.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Deliver = Callable[[list[int], list[dict[str, Any]]], None]


@dataclass
class EncodedRow:
    """One row of a request, tokenized. input_ids / token_type_ids: the row's tokens (no padding); text (and
    text_pair): what was sent, kept for tagging (which splits the text into words itself)."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    text: str
    text_pair: str | None = None

    @property
    def tokens(self) -> int:
        """Real tokens of the row (what the batch's token cap counts)."""
        return len(self.input_ids)


class Predictor:
    """A loaded model and its tokenizer, answering rows of one kind: ``classify`` (sentence classification) or
    ``tag`` (sequence labelling, tags per whitespace-separated word).

    model: anything called like ``EATForSequenceClassification`` (an ``eat.deploy.InferenceModel`` or the module
    itself); description: what was loaded (checkpoint, knobs, precision, backend), shown by ``/health``.
    """

    def __init__(self, model, tokenizer, *, max_length: int = 128, description: dict[str, Any] | None = None):
        from ..modeling_eat import EATForTokenClassification

        if tokenizer is None:
            raise ValueError("the checkpoint has no tokenizer; a service needs one to read texts")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.config = model.config
        inner = getattr(model, "model", model)
        self.kind = "tag" if (getattr(model, "token_level", False) or isinstance(inner, EATForTokenClassification)) \
            else "classify"
        self.labels = [str(self.config.id2label.get(i, i)) for i in range(self.config.num_labels)]
        self.num_layers = int(self.config.num_hidden_layers)
        self.pad_id = tokenizer.pad_token_id or 0
        self.description = dict(description or {})

    # --- requests ----------------------------------------------------------------------------------------------
    def encode(self, text: str, text_pair: str | None = None) -> EncodedRow:
        """Tokenize one row (truncated to ``max_length`` tokens, as `eat predict` does)."""
        if self.kind == "tag":
            if text_pair is not None:
                raise ValueError("a tagging model reads one text per row, not a pair")
            # the cap counts subwords of the words; tag_texts splits a text longer than max_length into chunks
            ids = self.tokenizer(text.split(), is_split_into_words=True, truncation=True,
                                 max_length=self.max_length)["input_ids"]
            return EncodedRow(list(ids), None, text)
        encoded = self.tokenizer(text, text_pair, truncation=True, max_length=self.max_length)
        types = encoded.get("token_type_ids")
        return EncodedRow(list(encoded["input_ids"]), None if types is None else list(types), text, text_pair)

    # --- batches -----------------------------------------------------------------------------------------------
    def run(self, rows: list[EncodedRow], deliver: Deliver) -> None:
        """Answer ``rows`` (one batch); ``deliver(indices, answers)`` is called once per row, as soon as its answer
        is final. Raises whatever the model raises (the batcher retries rows one by one then)."""
        if self.kind == "tag":
            self._tag(rows, deliver)
        else:
            self._classify(rows, deliver)

    def _classify(self, rows: list[EncodedRow], deliver: Deliver) -> None:
        width = max(row.tokens for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, n) right-padded
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        types = torch.zeros(len(rows), width, dtype=torch.long) if rows[0].token_type_ids is not None else None
        for i, row in enumerate(rows):
            ids[i, :row.tokens] = torch.tensor(row.input_ids)
            mask[i, :row.tokens] = 1
            if types is not None:
                types[i, :row.tokens] = torch.tensor(row.token_type_ids)
        answered = [False] * len(rows)

        def on_exit(layer: int, batch_rows, logits, tokens) -> None:
            # batch_rows (k,) index `rows`; logits (k, C); tokens (k,) real tokens in the exit layer
            indices = batch_rows.tolist()
            deliver(indices, self._answers(rows, indices, logits, [layer] * len(indices), tokens.tolist()))
            for i in indices:
                answered[i] = True

        with torch.inference_mode():
            output = self.model(ids, mask if bool((mask == 0).any()) else None, types, on_exit=on_exit)
        late = [i for i, done in enumerate(answered) if not done]
        if late:  # a model without the hook (or without exit heads): everything is known only now
            kept = output.tokens_per_layer if getattr(output, "tokens_per_layer", None) is not None else None
            exits = output.exit_layer.tolist()
            tokens = [int(kept[i, exits[i] - 1]) if kept is not None else rows[i].tokens for i in late]
            deliver(late, self._answers(rows, late, output.logits[late], [exits[i] for i in late], tokens))

    def _answers(self, rows, indices, logits, layers, tokens) -> list[dict[str, Any]]:
        probabilities = logits.float().softmax(-1).tolist()  # (k, C)
        answers = []
        for i, probs, layer, kept in zip(indices, probabilities, layers, tokens):
            if not all(math.isfinite(p) for p in probs):  # JSON has no NaN; the other rows are still fine
                answers.append({"error": f"model error: non-finite output at layer {int(layer)}"})
                continue
            best = max(range(len(probs)), key=probs.__getitem__)
            answers.append({"label": self.labels[best], "label_id": best, "confidence": probs[best],
                            "probabilities": dict(zip(self.labels, probs)), "exit_layer": int(layer),
                            "tokens": rows[i].tokens, "tokens_kept": int(kept)})
        return answers

    def _tag(self, rows: list[EncodedRow], deliver: Deliver) -> None:
        # Token-level exits decide per token, not per row: each text is tagged by tag_texts (batch 1, chunks
        # for long texts) and answered when done.
        from ..token_tasks import tag_texts

        for i, row in enumerate(rows):
            with torch.inference_mode():
                (result,) = tag_texts(self.model, self.tokenizer, [row.text], max_length=self.max_length)
            result.pop("text", None)
            result["tokens"] = row.tokens
            deliver([i], [result])

    def warmup(self) -> None:
        """Run a few batches (1, 4 and 1 rows) so that the first request does not pay for lazy initialisation."""
        row = self.encode("a warm up sentence for the model")
        for size in (1, 4, 1):
            self.run([row] * size, lambda indices, answers: None)


def load_predictor(checkpoint: str | Path, *, tuned: str | Path | None = None, knobs: dict[str, Any] | None = None,
                   precision: str = "fp32", backend: str = "torch", threads: int | None = None,
                   max_length: int = 128) -> Predictor:
    """Load a run or model folder for serving, with the knobs of ``tuned`` (an `eat tune` file) and ``knobs`` over
    them. Uses :func:`eat.deploy.load_for_inference` (precisions and backends) when that module is present, else
    :func:`eat.checkpoints.load_classifier` (fp32 torch only). Raises CheckpointError / ValueError /
    FileNotFoundError naming the path or option."""
    description = {"checkpoint": str(checkpoint), "tuned": None if tuned is None else str(tuned),
                   "precision": precision, "backend": backend}
    try:
        from ..deploy import load_for_inference
    except ImportError:
        load_for_inference = None
    if load_for_inference is not None:
        model = load_for_inference(checkpoint, knobs=knobs, tuned=tuned, precision=precision, backend=backend,
                                   threads=threads)
        tokenizer = model.tokenizer
    else:
        if precision != "fp32" or backend != "torch":
            raise ValueError(f"--precision {precision} / --backend {backend}: this install has no eat.deploy; "
                             "only fp32 on torch is available")
        model, tokenizer = _load_plain(Path(checkpoint), tuned, knobs, threads)
    predictor = Predictor(model, tokenizer, max_length=max_length, description=description)
    predictor.description["knobs"] = predictor.config.knobs() if hasattr(predictor.config, "knobs") else {}
    return predictor


def _load_plain(checkpoint: Path, tuned, knobs, threads):
    """The fallback loader: load_classifier with the tuned file's knobs (what `eat eval --tuned` reads)."""
    import json

    from transformers import AutoTokenizer

    from ..checkpoints import CheckpointError, load_classifier, model_folder

    if threads:
        torch.set_num_threads(threads)
    merged: dict[str, Any] = {}
    if tuned is not None:
        from ..results import read_tuned_knobs

        merged.update(read_tuned_knobs(tuned))
    merged.update(knobs or {})
    model_dir = model_folder(checkpoint)
    config_file = model_dir / "config.json"
    architectures = json.loads(config_file.read_text()).get("architectures") or [] if config_file.is_file() else []
    model = load_classifier(str(model_dir), knobs=merged,
                            token_level="EATForTokenClassification" in architectures)
    if not (model_dir / "tokenizer_config.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer saved with this checkpoint")
    return model, AutoTokenizer.from_pretrained(str(model_dir))


__all__ = ["EncodedRow", "Predictor", "load_predictor"]
