"""A task's rows, whatever their level, behind one interface: ``task.runner()``.

A :class:`~eat.tasks.Task` is data (columns, labels, metrics); its runner does the work that depends on its level:

- :class:`SequenceRunner` (``level="sequence"``): one label per row, read by :mod:`eat.data` (GLUE or the user's
  table), scored by the task's metrics (:mod:`eat.evaluation`);
- :class:`TokenRunner` (``level="token"``): one tag per word, read by :mod:`eat.ner_data` (CoNLL-2003 or the
  user's tagged files), scored by entity F1 (:mod:`eat.token_tasks`).

Training (:mod:`eat.training`), ``eat eval``, ``eat tune``, ``eat bench`` and the main job (:mod:`eat.pipeline`)
call the same methods on either: load a split, encode it, cut padded batches, run the model on one, compute the
loss, score a dev split, tune the exit rule, and keep a point's batch-1 outputs while it is timed
(:meth:`TaskRunner.measurement`, used by :func:`eat.bench.measure_points`). What a level cannot do is a capability
flag on its runner (``supports_precision``, ``supports_all_rows``...), checked once where a command starts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .tasks import Task, result_fields, task_for_model

logger = logging.getLogger("eat.training")  # the carving warnings have always come from the training logger


@dataclass
class TuneRequest:
    """What ``eat tune`` asks of a tuner: exactly one of ``max_drop`` (points of the primary metric) and
    ``latency_budget_ms``; ``batch_size`` > 1 ranks by throughput; ``certify`` bounds the drop at that confidence;
    ``keep_grid`` (None: the tuner's) the keep schedules searched; ``precision`` the tuned model's;
    ``reference_dir`` a run whose outputs the drop counts from (``reference`` as the user named it);
    ``max_work`` (token tasks) the most token-layer work allowed; ``exit_depths`` the depth caps searched
    ("auto", "all", None = no cap, or a list of layers: :func:`eat.bench.tune`)."""

    max_drop: float | None = None
    latency_budget_ms: float | None = None
    batch_size: int = 1
    certify: float | None = None
    keep_grid: list[Any] | None = None
    precision: str = "fp32"
    reference: str | None = None
    reference_dir: str | None = None
    max_work: float = 1.0
    device: str = "cpu"
    backend: str = "torch"  # "onnxruntime": tune the ONNX Runtime runner (sentence tasks)
    exit_depths: list[int] | str | None = "auto"


@dataclass
class TuneOutcome:
    """A tuner's choice: the knobs, what ``tuned_<task>.json`` holds, and lines saying how it was chosen."""

    knobs: dict[str, Any]
    saved: dict[str, Any]
    lines: list[str] = field(default_factory=list)


class TaskRunner:
    """The work on a task's rows that depends on its level (module docstring). Subclasses set the flags and
    implement every method; ``task`` is None only for :class:`SequenceRunner` scoring rows of a model whose task
    is unknown (accuracy, or Pearson for a one-output head)."""

    level: ClassVar[str]
    token_level: ClassVar[bool]  # the model class: EATForTokenClassification
    pooled_exits: ClassVar[bool]  # exit heads read one pooled vector per row (exit_pooling applies)
    sentence_calibration: ClassVar[bool]  # whole sentences can be held out (calibration_unit "sentence")
    supports_teacher: ClassVar[bool]  # distillation from another run's logits (--teacher)
    supports_all_rows: ClassVar[bool]  # eat bench --accuracy-all-rows
    supports_peers: ClassVar[bool]  # peers on other backends / precisions in eat bench and the main job
    supports_sorted_throughput: ClassVar[bool]  # a second throughput pass on length-sorted batches

    def __init__(self, task: Task | None) -> None:
        self.task = task

    @property
    def name(self) -> str:
        """The task's name ("" when unknown)."""
        return self.task.name if self.task is not None else ""

    # --- data -----------------------------------------------------------------------------------------------
    def label_names(self) -> tuple[str, ...]:
        """The labels a model for this task must have (() when they come from the data)."""
        raise NotImplementedError

    def training_data(self, config) -> tuple[Any, Any, dict[str, Any]]:
        """(train, calibration, {eval split: data}) of a :class:`~eat.training.TrainConfig`."""
        raise NotImplementedError

    def dev_splits(self, eval_file: str | None = None) -> tuple[str, ...]:
        """The splits a model is evaluated on: the task's, or "validation" for a user's eval file."""
        return ("validation",) if eval_file is not None or self.task is None else tuple(self.task.eval_splits)

    def load_split(self, split: str, *, eval_file: str | None = None,
                   label_names: Sequence[str] | None = None) -> Any:
        """One split of the task's data, or the user's ``eval_file`` (read with the task's columns and with
        ``label_names``, the trained model's labels)."""
        raise NotImplementedError

    def encode(self, data, tokenizer, max_length: int) -> Any:
        """Token ids (and labels) of ``data`` cut at ``max_length``."""
        raise NotImplementedError

    def batches(self, encoded, batch_size: int, *, shuffle: bool = False, seed: int = 0, bucket: bool = True,
                pad_id: int = 0):
        """Padded batches (dicts of tensors with ``index``) in :func:`eat.data.batch_order`."""
        raise NotImplementedError

    def collate(self, encoded, rows: Sequence[int], pad_id: int = 0) -> dict[str, Any]:
        """The given rows as one padded batch."""
        raise NotImplementedError

    def forward(self, model, batch: dict[str, Any], **options: Any):
        """The model on one padded batch (``options``: e.g. ``output_exit_logits``)."""
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------------------------------
    @property
    def model_class(self):
        """The EAT model class this level trains."""
        from .modeling_eat import EATForSequenceClassification, EATForTokenClassification

        return EATForTokenClassification if self.token_level else EATForSequenceClassification

    def loss(self, exit_logits, labels, weights, distill_weight: float, temperature: float, **extra):
        """The joint multi-exit loss of one batch."""
        raise NotImplementedError

    def head_features(self, model, captured: dict[int, Any], exit_layers: Sequence[int], batch, output):
        """(features (n, E-1, d), teacher logits (n, C), labels (n,)) the exit heads learn from, for one batch of
        a frozen model whose layer outputs ``captured`` holds."""
        raise NotImplementedError

    def check_installed(self) -> None:
        """Raise ValueError naming what is missing to score this task."""

    def dev_score(self, model, tokenizer, data, max_length: int, device: str = "cpu") -> float:
        """The primary metric (%) of the model's final head on ``data``, every row through every layer."""
        raise NotImplementedError

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, data, *, max_length: int, batch_size: int, device: str = "cpu"
                 ) -> dict[str, Any]:
        """Every metric, per-exit scores, exit distribution and work of the model on ``data``."""
        raise NotImplementedError

    def summary_lines(self, split: str, summary: dict[str, Any]) -> list[str]:
        """What ``eat eval`` prints for one split's :meth:`evaluate` summary."""
        raise NotImplementedError

    # --- tuning -----------------------------------------------------------------------------------------------
    def check_tune(self, request: TuneRequest) -> None:
        """Raise ValueError for a request this level's tuner cannot serve (before anything loads)."""
        if (request.max_drop is None) == (request.latency_budget_ms is None):
            raise ValueError("give exactly one of --max-drop or --latency-budget")
        from .deploy import BACKENDS

        if request.backend not in BACKENDS:
            raise ValueError(f"--backend: {' or '.join(BACKENDS)}, not {request.backend!r}")
        if request.backend == "onnxruntime" and request.precision not in ("fp32", "int8"):
            raise ValueError(f"--backend onnxruntime runs fp32 or int8, not {request.precision}")

    def tune(self, model, model_dir: Path, tokenizer, calibration, max_length: int,
             request: TuneRequest) -> TuneOutcome:
        """Choose the exit rule (and keep schedule) on the calibration split."""
        raise NotImplementedError

    # --- measuring --------------------------------------------------------------------------------------------
    def measurement(self, encoded, *, bench, pad_id: int = 0, data=None, f1: bool = False, all_rows=None,
                    examples_dir: Path | None = None) -> "Measurement":
        """What :func:`eat.bench.measure_points` keeps of every point's batch-1 calls and how it scores them
        (``bench``: its :class:`~eat.bench.BenchConfig`)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------- measuring


class Measurement:
    """The level-specific half of one interleaved measuring run (:func:`eat.bench.measure_points` does the
    timing): the batch-1 inputs, the timed calls, what each call's output leaves behind, and the fields of a
    point's results row. Every level keeps each row's tokens per layer and the work counters."""

    def __init__(self, encoded, *, device: str, batch_size: int, pad_id: int) -> None:
        self.encoded, self.device, self.batch_size, self.pad_id = encoded, device, batch_size, pad_id
        self.rows = len(encoded)
        self.tokens: dict[str, np.ndarray] = {}
        self.work: dict[str, Any] = {}

    def start(self, models: dict[str, Any]) -> None:
        """Room for every model's outputs (called once the models are loaded)."""
        from .modeling_eat import WorkCounters

        self.tokens = {name: np.zeros((self.rows, m.config.num_hidden_layers), dtype=np.int64)
                       for name, m in models.items()}
        self.work = {name: WorkCounters() for name in models}

    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with every tensor on the measuring device."""
        return {k: v.to(self.device) for k, v in batch.items()}

    def singles(self) -> list[dict[str, Any]]:
        """Every row as its own batch (batch-1 timing), on the device."""
        raise NotImplementedError

    def batched(self, bucket: bool) -> list[dict[str, Any]]:
        """The rows in batches of ``batch_size``: arrival order, or length-sorted with ``bucket``."""
        raise NotImplementedError

    def call(self, model) -> Callable[[dict[str, Any]], Any]:
        """The timed batch-1 call (no attention mask: one row has no padding)."""
        raise NotImplementedError

    def record(self, name: str, index: int, output) -> None:
        """Keep what the batch-1 call of model ``name`` on row ``index`` returned (outside the timed region)."""
        self.tokens[name][index] = output.tokens_per_layer[0].cpu().numpy()
        self.work[name].add(output.work)

    def batch_call(self, name: str, model) -> Callable[[dict[str, Any]], Any]:
        """The timed call on one padded batch."""
        raise NotImplementedError

    def finish(self, models: dict[str, Any], progress: Callable[[str, int, int], None] | None) -> None:
        """Anything computed once timing is over (untimed)."""

    def mean_tokens_per_layer(self, name: str) -> list[float]:
        """Mean tokens entering each layer over the rows that reached it."""
        tokens = self.tokens[name]
        ran = tokens > 0
        return [float(tokens[:, i][ran[:, i]].mean()) if ran[:, i].any() else 0.0 for i in range(tokens.shape[1])]

    def scores(self, name: str) -> dict[str, Any]:
        """The score fields of a point's row (after its identity fields)."""
        raise NotImplementedError

    def exit_fields(self, name: str, model) -> dict[str, Any]:
        """Exit layers, tokens per layer and token-layer work of a point's row (after its timing fields)."""
        raise NotImplementedError

    def trailing(self, name: str, config_hash: str, run_id: str) -> dict[str, Any]:
        """Fields a point's row ends with (whole-split scores, its examples file)."""
        return {}


class SequenceMeasurement(Measurement):
    """Per row: the logits, exit layer and tokens of the batch-1 call; batch predictions from the timed batch
    calls (``metric_value_batched``); optionally every point's score on the whole split (``all_rows``) and a
    per-row examples CSV."""

    def __init__(self, task: Task | None, task_name: str, encoded, *, device: str, batch_size: int, pad_id: int,
                 f1: bool, all_rows, examples_dir: Path | None) -> None:
        super().__init__(encoded, device=device, batch_size=batch_size, pad_id=pad_id)
        self.task, self.task_name, self.f1 = task, task_name, f1
        self.all_rows, self.examples_dir = all_rows, examples_dir
        self.labels = np.asarray(encoded.labels)
        self.lengths = np.asarray(encoded.lengths)
        self.whole_split: dict[str, dict[str, Any]] = {}

    def start(self, models: dict[str, Any]) -> None:
        """Room for logits, exit layers and batch predictions; the scorer from the models' head when the task is
        not given (see :func:`default_task`)."""
        super().start(models)
        num_labels = next(iter(models.values())).config.num_labels
        if self.task is None:
            self.task = default_task(self.task_name, num_labels)
        self.logits = {name: np.zeros((self.rows, num_labels), dtype=np.float32) for name in models}
        self.exit_layer = {name: np.zeros(self.rows, dtype=np.int64) for name in models}
        self.scorer = self.task if self.task is not None else task_for_model(num_labels)
        self.batch_predictions = {name: np.zeros(self.rows, dtype=np.float32 if self.scorer.is_regression
                                                 else np.int64) for name in models}

    def singles(self) -> list[dict[str, Any]]:
        """Every row as its own batch."""
        from .data import collate

        return [self.on_device(collate(self.encoded, [i], self.pad_id)) for i in range(self.rows)]

    def batched(self, bucket: bool) -> list[dict[str, Any]]:
        """Batches of ``batch_size`` rows."""
        from .data import batches

        return [self.on_device(b) for b in batches(self.encoded, self.batch_size, bucket=bucket, pad_id=self.pad_id)]

    def call(self, model) -> Callable[[dict[str, Any]], Any]:
        """``model(ids, None, token types)``."""
        return lambda b: model(b["input_ids"], None, b["token_type_ids"])

    def record(self, name: str, index: int, output) -> None:
        """The row's logits and exit layer, besides tokens and work."""
        self.logits[name][index] = output.logits[0].float().cpu().numpy()
        self.exit_layer[name][index] = int(output.exit_layer[0])
        super().record(name, index, output)

    def batch_call(self, name: str, model) -> Callable[[dict[str, Any]], Any]:
        """The batch call; it also keeps the batch's predictions (scored as ``metric_value_batched``)."""
        out, scorer = self.batch_predictions[name], self.scorer

        def batch_call(b):
            result = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            out[b["index"].cpu().numpy()] = scorer.predictions(result.logits.float().cpu().numpy())
            return result
        return batch_call

    def finish(self, models: dict[str, Any], progress: Callable[[str, int, int], None] | None) -> None:
        """Every model's scores on the whole split, when ``all_rows`` is given."""
        if self.all_rows is not None:
            self.whole_split = _all_rows_metrics(models, self.all_rows, self.batch_size, self.device, self.f1,
                                                 self.pad_id, progress, self.task)

    def scores(self, name: str) -> dict[str, Any]:
        """The task's metrics (``metric``, ``metric_value``, each by name, ``metric_value_batched``), or without
        a task accuracy (F1 with ``f1``) and ``accuracy_batched``, as rows always had."""
        from .evaluation import classification_metrics

        predictions = self.scorer.predictions(self.logits[name])
        if self.task is not None:
            return {**result_fields(self.task, self.task.score(self.labels, predictions)),
                    "metric_value_batched": self.task.primary(self.labels, self.batch_predictions[name])}
        metrics = classification_metrics(self.labels, predictions, self.f1)
        batch_metrics = classification_metrics(self.labels, self.batch_predictions[name], self.f1)
        return {"accuracy": metrics["accuracy"], **({"f1": metrics["f1"]} if self.f1 else {}),
                "accuracy_batched": batch_metrics["accuracy"]}

    def exit_fields(self, name: str, model) -> dict[str, Any]:
        """Mean exit layer and its distribution over rows; token-layer work from the rows' tokens per layer."""
        exits = self.exit_layer[name]
        num_layers = model.config.num_hidden_layers
        return {"mean_exit_layer": float(exits.mean()),
                "exit_distribution": {int(k): int(v) for k, v in zip(*np.unique(exits, return_counts=True))},
                "mean_tokens_per_layer": self.mean_tokens_per_layer(name),
                "token_layer_fraction": float(self.tokens[name].sum() / (self.lengths.sum() * num_layers))}

    def trailing(self, name: str, config_hash: str, run_id: str) -> dict[str, Any]:
        """Whole-split scores and, with ``examples_dir``, the examples CSV (named by run too: an old table's rows
        keep their own files until replaced)."""
        fields = dict(self.whole_split.get(name, {}))
        if self.examples_dir is not None:
            predictions = self.scorer.predictions(self.logits[name])
            _write_examples(self.examples_dir / f"{config_hash}-{run_id}.csv", self.lengths, self.exit_layer[name],
                            self.tokens[name], _row_correct(self.scorer, self.labels, predictions))
            fields["examples_file"] = f"examples/{config_hash}-{run_id}.csv"
        return fields


class TokenMeasurement(Measurement):
    """Per chunk: the tags and exit layer of every word from the batch-1 call; sentences are put back together
    and scored by entity F1 (the row's ``metric_value``, also in ``accuracy`` for readers of older rows);
    exit layers are per word. A peer (int8, ONNX Runtime) is scored the same way from its own calls."""

    def __init__(self, encoded, data, *, device: str, batch_size: int, pad_id: int) -> None:
        super().__init__(encoded, device=device, batch_size=batch_size, pad_id=pad_id)
        self.data = data
        self.summaries: dict[str, dict[str, Any]] = {}

    def start(self, models: dict[str, Any]) -> None:
        """Room for every chunk's tags and word exit layers."""
        super().start(models)
        self.names = {name: [m.config.id2label[i] for i in range(m.config.num_labels)] for name, m in models.items()}
        self.chunk_tags: dict[str, list] = {name: [None] * self.rows for name in models}
        self.chunk_exits: dict[str, list] = {name: [None] * self.rows for name in models}
        self._singles: list[dict[str, Any]] = []

    def singles(self) -> list[dict[str, Any]]:
        """Every chunk as its own batch."""
        from .ner_data import collate_tagged

        self._singles = [self.on_device(collate_tagged(self.encoded, [i], self.pad_id)) for i in range(self.rows)]
        return self._singles

    def batched(self, bucket: bool) -> list[dict[str, Any]]:
        """Batches of ``batch_size`` chunks."""
        from .ner_data import tagged_batches

        return [self.on_device(b) for b in tagged_batches(self.encoded, self.batch_size, bucket=bucket,
                                                           pad_id=self.pad_id)]

    def call(self, model) -> Callable[[dict[str, Any]], Any]:
        """``model(ids, None, token types, word_mask=...)``."""
        return lambda b: model(b["input_ids"], None, b["token_type_ids"], word_mask=b["word_mask"])

    def record(self, name: str, index: int, output) -> None:
        """The chunk's word tags and word exit layers, besides tokens and work."""
        words = self._singles[index]["word_mask"][0]
        self.chunk_tags[name][index] = [self.names[name][j]
                                        for j in output.logits[0].nan_to_num(0.0).argmax(-1)[words].tolist()]
        self.chunk_exits[name][index] = output.token_exit_layer[0][words].tolist()
        super().record(name, index, output)

    def batch_call(self, name: str, model) -> Callable[[dict[str, Any]], Any]:
        """The batch call (predictions are not kept)."""
        return lambda b: model(b["input_ids"], b["attention_mask"], b["token_type_ids"], word_mask=b["word_mask"])

    def _summary(self, name: str, model) -> dict[str, Any]:
        from .token_tasks import TaggedPredictions, join_chunks, summarize_tagged

        if name not in self.summaries:
            sentences = len(self.data.sentences)
            tags = join_chunks(self.chunk_tags[name], self.encoded.sentence, sentences)
            exits = join_chunks(self.chunk_exits[name], self.encoded.sentence, sentences)
            predictions = TaggedPredictions(tags, exits, self.work[name], int(sum(self.encoded.lengths)),
                                            model.config.num_hidden_layers)
            self.summaries[name] = summarize_tagged(predictions, self.data)
        return self.summaries[name]

    def finish(self, models: dict[str, Any], progress: Callable[[str, int, int], None] | None) -> None:
        """Every point's entity scores over whole sentences."""
        for name, model in models.items():
            self._summary(name, model)

    def scores(self, name: str) -> dict[str, Any]:
        """``metric`` (entity_f1), ``metric_value`` and ``entity_f1`` (the entity F1), ``accuracy`` (the same F1:
        readers of rows written before ``metric_value`` read it), ``entity_precision``, ``entity_recall``. The
        entity precision is not named ``precision``: that field of a row is the numeric precision it ran at
        (fp32, int8), which a peer's row must keep."""
        summary = self.summaries[name]
        return {"metric": "entity_f1", "metric_value": summary["f1"], "entity_f1": summary["f1"],
                "accuracy": summary["f1"], "entity_precision": summary["precision"],
                "entity_recall": summary["recall"]}

    def exit_fields(self, name: str, model) -> dict[str, Any]:
        """Word exit layers; query and key/value-only token-layer work against the static model's."""
        summary = self.summaries[name]
        return {"mean_exit_layer": summary["mean_word_exit_layer"],
                "exit_distribution": {int(k): round(v * summary["words"])
                                      for k, v in summary["word_exit_distribution"].items()},
                "mean_tokens_per_layer": self.mean_tokens_per_layer(name),
                "token_layer_fraction": summary["token_layer_ratio"],
                "kv_token_layer_fraction": summary["kv_token_layer_ratio"]}


def default_task(name: str, num_labels: int) -> Task | None:
    """The task to score a bench's rows with when the caller names none: the registered sequence task ``name``
    when its head matches the model's, else Pearson for a one-output model, else None (accuracy, and F1 when
    asked, as rows always had)."""
    from .tasks import TASKS

    registered = TASKS.get(name)
    if registered is not None and registered.level == "sequence" and registered.num_labels == num_labels:
        return registered
    return task_for_model(1, name) if num_labels == 1 else None


def _row_correct(task: Task, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """(N,) bool per row for the examples file: the right class, or for regression within a tenth of the labels'
    range of the label (0.5 on STS-B's 0-5 scale)."""
    if task.is_regression:
        span = float(np.ptp(labels)) if len(labels) else 0.0
        return np.abs(predictions - labels) <= 0.1 * (span or 1.0)
    return predictions == labels


def _all_rows_metrics(models: dict[str, Any], all_rows, batch_size: int, device: str, f1: bool, pad_id: int,
                      progress: Callable[[str, int, int], None] | None,
                      task: Task | None = None) -> dict[str, dict[str, Any]]:
    """name -> {accuracy_all_rows, f1_all_rows (when f1), rows_all}: every model's predictions on the whole split
    by :func:`~eat.evaluation.predict_encoded` (what `eat eval` runs: length-sorted batches, untimed, per-sample
    exits and pruning as when timed)."""
    from .evaluation import classification_metrics, predict_encoded

    metrics = {}
    for number, (name, model) in enumerate(models.items(), start=1):
        predicted = predict_encoded(model, all_rows, batch_size=batch_size, device=device, pad_id=pad_id)
        if task is not None:
            scores = task.score(predicted.labels, task.predictions(predicted.logits))
            metrics[name] = {**result_fields(task, scores, "_all_rows"), "rows_all": len(all_rows)}
        else:
            scores = classification_metrics(predicted.labels, predicted.logits.argmax(-1), f1)
            metrics[name] = {"accuracy_all_rows": scores["accuracy"], "rows_all": len(all_rows),
                             **({"f1_all_rows": scores["f1"]} if f1 else {})}
        if progress is not None:
            progress("all rows", number, len(models))
    return metrics


def _write_examples(path: Path, lengths, exits, tokens, correct) -> None:
    """One line per row: input tokens, exit layer, whether it was right, tokens entering each layer."""
    import pandas as pd

    from .results import atomic_write_text

    frame = pd.DataFrame({"input_tokens": lengths, "exit_layer": exits, "correct": correct.astype(int)})
    for i in range(tokens.shape[1]):
        frame[f"tokens_l{i + 1}"] = tokens[:, i]
    atomic_write_text(path, frame.to_csv(index=False))


# ---------------------------------------------------------------------------------------------------- levels


class SequenceRunner(TaskRunner):
    """One label per row (GLUE and a user's tables): :mod:`eat.data`, :mod:`eat.evaluation`, :func:`eat.bench.tune`."""

    level = "sequence"
    token_level = False
    pooled_exits = True
    sentence_calibration = True
    supports_teacher = True
    supports_all_rows = True
    supports_peers = True
    supports_sorted_throughput = True

    def label_names(self) -> tuple[str, ...]:
        """The task's label names."""
        return tuple(self.task.label_names) if self.task is not None else ()

    def training_data(self, config):
        """GLUE's train split (or the user's ``data_file``) less the calibration slice, and the dev splits."""
        from .data import DataError, carve_calibration, carve_sentence_calibration, load_glue, load_table

        if config.data_file is not None:
            full = load_table(config.data_file, config.text_column, config.text_pair_column, config.label_column,
                              label_kind=config.label_kind)
            if config.eval_file is None:
                raise DataError("--eval-file is required with --data-file")
            evals = {"validation": load_table(config.eval_file, config.text_column, config.text_pair_column,
                                              config.label_column, label_names=full.label_names,
                                              label_kind=config.label_kind)}
        else:
            full = load_glue(config.task, "train")
            evals = {split: load_glue(config.task, split) for split in self.task.eval_splits}
        if config.calibration_rows == 0:
            # a baseline that is never tuned may train on every row (the split then is empty, and tuning refuses it)
            train, calibration = full, full.subset(0, seed=config.seed)
        elif config.calibration_unit == "sentence":
            train, calibration = carve_sentence_calibration(full, config.calibration_rows, seed=config.seed)
        else:
            train, calibration = carve_calibration(full, max_rows=config.calibration_rows, seed=config.seed,
                                                   fraction=min(0.1, config.calibration_rows / max(len(full), 1)))
            if len(calibration) < config.calibration_rows:  # the slice never takes more than 10% of the rows
                logger.warning("%s: held out %d calibration rows, not %d: at most 10%% of the %d training rows are "
                               "held out", full.source, len(calibration), config.calibration_rows, len(full))
        train = train.subset(config.train_limit, seed=config.seed)
        evals = {name: data.subset(config.eval_limit, seed=config.seed) for name, data in evals.items()}
        return train, calibration, evals

    def load_split(self, split: str, *, eval_file: str | None = None, label_names: Sequence[str] | None = None):
        """A GLUE split, or the user's ``eval_file`` read with the task's columns and label kind."""
        from .data import load_glue, load_table

        if eval_file is None:
            return load_glue(self.task.name, split)
        task = self.task
        return load_table(eval_file, task.text_column, task.pair_column, task.label_column,
                          label_names=None if task.is_regression or label_names is None else tuple(label_names),
                          label_kind=task.label_kind)

    def encode(self, data, tokenizer, max_length: int):
        """:func:`eat.data.encode`."""
        from .data import encode

        return encode(data, tokenizer, max_length)

    def batches(self, encoded, batch_size: int, *, shuffle: bool = False, seed: int = 0, bucket: bool = True,
                pad_id: int = 0):
        """:func:`eat.data.batches`."""
        from .data import batches

        return batches(encoded, batch_size, shuffle=shuffle, seed=seed, bucket=bucket, pad_id=pad_id)

    def collate(self, encoded, rows: Sequence[int], pad_id: int = 0) -> dict[str, Any]:
        """:func:`eat.data.collate`."""
        from .data import collate

        return collate(encoded, rows, pad_id)

    def forward(self, model, batch: dict[str, Any], **options: Any):
        """``model(ids, mask, token types)``."""
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **options)

    def loss(self, exit_logits, labels, weights, distill_weight: float, temperature: float, **extra):
        """:func:`eat.training.multi_exit_loss` (cross-entropy, or MSE for a regression head)."""
        from .training import multi_exit_loss

        return multi_exit_loss(exit_logits, labels, weights, distill_weight, temperature, **extra)

    def head_features(self, model, captured, exit_layers, batch, output):
        """Each exit head's input: the pooled vector of its layer (``exit_pooling``)."""
        import torch

        from .modeling_eat import exit_head_input

        key_mask = batch["attention_mask"].bool()
        features = torch.stack([exit_head_input(captured[layer], model.config.exit_pooling, key_mask,
                                                segments=batch["token_type_ids"]) for layer in exit_layers], dim=1)
        return features, output.logits, batch["labels"]

    def dev_score(self, model, tokenizer, data, max_length: int, device: str = "cpu") -> float:
        """:func:`eat.evaluation.evaluate_static_score` with the task's primary metric."""
        from .evaluation import evaluate_static_score

        return evaluate_static_score(model, tokenizer, data, max_length, device=device, task=self.task)

    def evaluate(self, model, tokenizer, data, *, max_length: int, batch_size: int, device: str = "cpu"):
        """Every metric of the live run (exits as configured) and per-exit primary metric from a cached pass."""
        from .evaluation import predict_encoded, summarize

        encoded = self.encode(data, tokenizer, max_length)
        pad_id = tokenizer.pad_token_id or 0
        live = predict_encoded(model, encoded, batch_size=batch_size, device=device, pad_id=pad_id)
        cached = predict_encoded(model, encoded, batch_size=batch_size, device=device, cache_exits=True,
                                 pad_id=pad_id)
        summary = summarize(live, task=self.task)
        summary["per_exit_metric"] = summarize(cached, task=self.task)["per_exit_metric"]
        return summary

    def summary_lines(self, split: str, summary: dict[str, Any]) -> list[str]:
        """Every metric, mean exit layer, token-layer work, rows; then the per-exit primary metric."""
        metric = "  ".join(f"{name} {summary[name]:.2f}" for name in self.task.metrics)
        per_exit = "  ".join(f"L{k}: {v:.1f}" for k, v in summary["per_exit_metric"].items())
        return [f"{self.name} {split}: {metric}  mean exit layer {summary['mean_exit_layer']:.2f}  "
                f"token-layer fraction {summary['token_layer_fraction']:.3f}  ({summary['rows']} rows)",
                f"  per-exit {self.task.primary_metric}: {per_exit}"]

    def tune(self, model, model_dir: Path, tokenizer, calibration, max_length: int,
             request: TuneRequest) -> TuneOutcome:
        """:func:`eat.bench.tune` on the encoded calibration rows (the model is reloaded per keep schedule)."""
        from .bench import tune

        result = tune(str(model_dir), self.encode(calibration, tokenizer, max_length), max_drop=request.max_drop,
                      latency_budget_ms=request.latency_budget_ms, device=request.device,
                      pad_id=tokenizer.pad_token_id or 0, reference_checkpoint=request.reference_dir,
                      batch_size=request.batch_size, certify=request.certify, task=self.task,
                      precision=request.precision, backend=request.backend, exit_depths=request.exit_depths,
                      **({"keep_grid": request.keep_grid} if request.keep_grid is not None else {}))
        deployed = (request.precision, request.backend) != ("fp32", "torch")
        reference_name = (str(request.reference) if request.reference is not None
                          else "fp32, everything off" if deployed else "everything off")
        lines = [f"chosen on {len(calibration)} calibration rows ({result.criterion}): {result.knobs}",
                 f"calibration {self.task.primary_title} {result.calibration_accuracy:.2f} ({reference_name}: "
                 f"{result.reference_accuracy:.2f})"]
        if result.drop_interval is not None:
            interval = result.drop_interval
            lines.append(f"uncertainty ({interval['method']}, {interval['samples']} resamples): drop "
                         f"{interval['drop']:.2f} points, {interval['confidence']:.0%} upper bound "
                         f"{interval['upper']:.2f}")
        if result.drop_upper_bound is not None:
            lines.append(f"certified: the drop is at most {result.drop_upper_bound:.2f} points with "
                         f"{request.certify:.0%} confidence (the bound of the chosen point, at its share of the error)")
        return TuneOutcome(result.knobs, {**dataclasses.asdict(result), "precision": request.precision,
                                          "backend": request.backend}, lines)

    def measurement(self, encoded, *, bench, pad_id: int = 0, data=None, f1: bool = False, all_rows=None,
                    examples_dir: Path | None = None) -> Measurement:
        """A :class:`SequenceMeasurement` (without a task: :func:`default_task` of ``bench.task``)."""
        return SequenceMeasurement(self.task, bench.task, encoded, device=bench.device, batch_size=bench.batch_size,
                                   pad_id=pad_id, f1=f1, all_rows=all_rows, examples_dir=examples_dir)


class TokenRunner(TaskRunner):
    """One tag per word (CoNLL-2003 and a user's tagged files): :mod:`eat.ner_data`, :mod:`eat.token_tasks`."""

    level = "token"
    token_level = True
    pooled_exits = False  # a token's exit head reads that token
    sentence_calibration = False  # rows are sentences already
    supports_teacher = False
    supports_all_rows = False  # entity F1 is reported on the sentences timed
    # peers load through eat.deploy.load_for_inference like a sentence task's (eat.bench.load_point): the token
    # model runs at int8 and on ONNX Runtime (OrtTokenClassifier) with its token loop intact
    supports_peers = True
    supports_sorted_throughput = False

    def label_names(self) -> tuple[str, ...]:
        """CoNLL-2003's BIO tags; () for a user's files (their tags come from the data)."""
        from .ner_data import CONLL_LABELS

        return CONLL_LABELS if self.name == "conll2003" else ()

    def training_data(self, config):
        """Sentences of CoNLL-2003 or of the user's files, a seeded calibration slice (at most 10%) held out."""
        from .data import DataError
        from .ner_data import load_tagged

        full = load_tagged(config.task, "train", config.data_file)
        if config.data_file is not None and config.eval_file is None:
            raise DataError("--eval-file is required with --data-file")
        evals = {"validation": load_tagged(config.task, "validation", config.eval_file,
                                           label_names=full.label_names if config.eval_file else None)}
        rows = min(config.calibration_rows, len(full) // 10)
        train, calibration = full.split_off(rows, seed=config.seed) if rows else (full, full.subset(0))
        train = train.subset(config.train_limit, seed=config.seed)
        evals = {name: data.subset(config.eval_limit, seed=config.seed) for name, data in evals.items()}
        return train, calibration, evals

    def load_split(self, split: str, *, eval_file: str | None = None, label_names: Sequence[str] | None = None):
        """A CoNLL-2003 split, or the user's ``eval_file`` (its tags checked against ``label_names``)."""
        from .ner_data import load_tagged

        return load_tagged(self.name, split, eval_file,
                           label_names=tuple(label_names) if eval_file and label_names else None)

    def encode(self, data, tokenizer, max_length: int):
        """:func:`eat.ner_data.encode_tagged` (long sentences become chunks)."""
        from .ner_data import encode_tagged

        return encode_tagged(data, tokenizer, max_length)

    def batches(self, encoded, batch_size: int, *, shuffle: bool = False, seed: int = 0, bucket: bool = True,
                pad_id: int = 0):
        """:func:`eat.ner_data.tagged_batches`."""
        from .ner_data import tagged_batches

        return tagged_batches(encoded, batch_size, shuffle=shuffle, seed=seed, bucket=bucket, pad_id=pad_id)

    def collate(self, encoded, rows: Sequence[int], pad_id: int = 0) -> dict[str, Any]:
        """:func:`eat.ner_data.collate_tagged`."""
        from .ner_data import collate_tagged

        return collate_tagged(encoded, rows, pad_id)

    def forward(self, model, batch: dict[str, Any], **options: Any):
        """``model(ids, mask, token types, word_mask=...)``."""
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     word_mask=batch["word_mask"], **options)

    def loss(self, exit_logits, labels, weights, distill_weight: float, temperature: float, **extra):
        """:func:`eat.training.token_multi_exit_loss` over the labelled tokens."""
        from .training import token_multi_exit_loss

        return token_multi_exit_loss(exit_logits, labels, weights, distill_weight, temperature)

    def head_features(self, model, captured, exit_layers, batch, output):
        """Each exit head's input: the labelled tokens' vectors of its layer."""
        import torch

        from .ner_data import IGNORE

        keep = batch["labels"] != IGNORE
        features = torch.stack([captured[layer][keep] for layer in exit_layers], dim=1)
        return features, output.logits[keep], batch["labels"][keep]

    def check_installed(self) -> None:
        """Entity F1 needs seqeval."""
        try:
            import seqeval  # noqa: F401 - entity F1 of the dev split, computed after training
        except ImportError:
            raise ValueError(f"task {self.name}: entity F1 needs seqeval, which is not installed; "
                             "pip install 'eat[ner]' (or seqeval) and run again") from None

    def dev_score(self, model, tokenizer, data, max_length: int, device: str = "cpu") -> float:
        """Entity F1 with exits off."""
        from .token_tasks import evaluate_tagged

        return evaluate_tagged(model, self.encode(data, tokenizer, max_length), data, device=device,
                               pad_id=tokenizer.pad_token_id or 0, disable_exit=True)["f1"]

    def evaluate(self, model, tokenizer, data, *, max_length: int, batch_size: int, device: str = "cpu"):
        """Entity P/R/F1, word exit distribution and token-layer work; per-exit F1 when the model has exit heads."""
        from .token_tasks import predict_tagged, summarize_tagged

        encoded = self.encode(data, tokenizer, max_length)
        pad_id = tokenizer.pad_token_id or 0
        summary = summarize_tagged(predict_tagged(model, encoded, data, batch_size=batch_size, device=device,
                                                  pad_id=pad_id), data)
        if model.exit_heads:
            cached = summarize_tagged(predict_tagged(model, encoded, data, batch_size=batch_size, device=device,
                                                     pad_id=pad_id, per_exit=True), data)
            summary["per_exit_f1"] = cached["per_exit_f1"]
        return summary

    def summary_lines(self, split: str, summary: dict[str, Any]) -> list[str]:
        """Entity F1 (P, R), mean word exit layer, token-layer work, sentences; then per-exit F1."""
        lines = [f"{self.name} {split}: entity F1 {summary['f1']:.2f} (P {summary['precision']:.2f}, R "
                 f"{summary['recall']:.2f})  mean word exit layer {summary['mean_word_exit_layer']:.2f}  token-layer "
                 f"fraction {summary['token_layer_ratio']:.3f}  ({summary['sentences']} sentences)"]
        if "per_exit_f1" in summary:
            lines.append("  per-exit F1: " + "  ".join(f"L{k}: {v:.1f}" for k, v in summary["per_exit_f1"].items()))
        return lines

    def check_tune(self, request: TuneRequest) -> None:
        """The token tuner bounds an entity-F1 drop at batch 1, fp32, against the same model with exits off."""
        super().check_tune(request)
        if request.precision == "bf16":
            raise ValueError("--precision: token tasks are tuned at fp32 or int8")
        if request.backend != "torch":
            raise ValueError("--backend: token tasks are tuned in PyTorch (their int8 model at --precision int8)")
        if request.certify is not None:
            raise ValueError("--certify bounds a sentence-level accuracy drop; token tasks are tuned on entity F1 "
                             "without it")
        if request.max_drop is None:
            raise ValueError("token tasks are tuned by --max-drop (entity F1 points)")
        if request.batch_size != 1:
            raise ValueError("--batch-size: token tasks are tuned for batch 1")
        if request.reference is not None:
            raise ValueError("--reference: a token task's drop counts from the same model with exits off")
        if request.exit_depths not in (None, "auto"):  # "all" would be ignored: refused instead
            raise ValueError("--exit-depths: a token model has no depth cap (its tokens leave one by one)")

    def tune(self, model, model_dir: Path, tokenizer, calibration, max_length: int,
             request: TuneRequest) -> TuneOutcome:
        """:func:`eat.token_tasks.tune_token_exits` on the calibration sentences (every head loaded). At int8 the
        rules run on the int8 model (its exits read its own outputs) and the drop counts from the fp32 model with
        exits off, so the quantization's cost is part of it."""
        from .token_tasks import tune_token_exits

        model.config.set_knobs(exit_layers="all")
        reference = None
        if request.precision != "fp32":
            from .deploy.quantize import apply_precision

            reference, model = model, apply_precision(model, request.precision)  # a quantized copy
        result = tune_token_exits(model, self.encode(calibration, tokenizer, max_length), calibration,
                                  max_drop=request.max_drop, max_work=request.max_work, device=request.device,
                                  pad_id=tokenizer.pad_token_id or 0, reference_model=reference)
        result["precision"] = request.precision
        off = "exits off" if reference is None else "fp32, exits off"
        lines = [f"chosen on {len(calibration)} calibration sentences at {request.precision} "
                 f"({result['criterion']}): {result['knobs']}",
                 f"calibration F1 {result['calibration_f1']:.2f} ({off}: {result['reference_f1']:.2f}), "
                 f"token-layer fraction {result['token_layer_ratio']:.3f}, {result['mean_sentence_layers']:.2f} "
                 "layers per sentence"]
        return TuneOutcome(result["knobs"], result, lines)

    def measurement(self, encoded, *, bench, pad_id: int = 0, data=None, f1: bool = False, all_rows=None,
                    examples_dir: Path | None = None) -> Measurement:
        """A :class:`TokenMeasurement` (``data``: the sentences the chunks came from)."""
        if data is None:
            raise ValueError("measuring a token task needs its sentences (data) to score whole sentences")
        return TokenMeasurement(encoded, data, device=bench.device, batch_size=bench.batch_size, pad_id=pad_id)


# the one place a level picks its runner
RUNNERS: dict[str, type[TaskRunner]] = {"sequence": SequenceRunner, "token": TokenRunner}


def runner_for(task: Task | None) -> TaskRunner:
    """The runner of ``task``'s level (a :class:`SequenceRunner` scoring by the model's head when it is None)."""
    return RUNNERS["sequence" if task is None else task.level](task)


__all__ = ["TaskRunner", "SequenceRunner", "TokenRunner", "RUNNERS", "runner_for", "TuneRequest", "TuneOutcome",
           "Measurement", "SequenceMeasurement", "TokenMeasurement", "default_task"]
