"""Tasks as data: what a task's rows hold, what its label is, how it is scored, where its files are.

A :class:`Task` names its text column(s), its label kind (``"classes"`` or ``"regression"``), its label names, its
metrics and the primary metric every tuner, table and plot uses, the column renames of its GLUE TSV layout, and the
files each split is read from (Hugging Face parquet first, then GLUE TSV, then the partial/carved files of
``../shared/data/glue``). :data:`TASKS` holds all of GLUE that has labelled dev data (SST-2, QQP, MNLI, QNLI, RTE,
MRPC, CoLA, STS-B, WNLI) and the token task CoNLL-2003; :func:`user_task` describes a user's own table from flags.

Metrics (:data:`METRICS`) are computed with scikit-learn and scipy and reported in percent (x100), so that "a drop
of 0.5 points" means the same on every task: 0.5 accuracy points, 0.005 Matthews correlation, 0.005 Pearson r.
GLUE's choice per task: CoLA Matthews correlation; STS-B Pearson and Spearman; MRPC and QQP F1 and accuracy; the
rest accuracy. Decisions: QQP's primary metric stays accuracy (its targets and recorded results are in accuracy),
MRPC's is F1 (the figure GLUE quotes first for it); STS-B's is Pearson.

Nothing here reads files: :mod:`eat.data` loads a task's splits, :mod:`eat.ner_data` the token task's, and
``task.runner()`` (:mod:`eat.runners`) does whatever depends on the task's level (rows or words): load, encode,
batch, score, tune, measure.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LABEL_KINDS = ("classes", "regression")
LEVELS = ("sequence", "token")


# ------------------------------------------------------------------------------------------------------ metrics


def _accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return 100.0 * float(accuracy_score(labels, predicted))


def _f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    # binary F1 of class 1 (QQP "duplicate", MRPC "equivalent"), as GLUE reports it
    return 100.0 * float(f1_score(labels, predicted, pos_label=1, average="binary", zero_division=0))


def _matthews(labels: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return 100.0 * float(matthews_corrcoef(labels, predicted))


def _correlation(kind: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def correlation(labels: np.ndarray, predicted: np.ndarray) -> float:
        from scipy.stats import pearsonr, spearmanr

        labels, predicted = np.asarray(labels, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
        # a constant prediction (or label) column has no correlation: scipy returns NaN and warns; 0 is what such
        # a predictor is worth, and keeps tuners comparing numbers
        if len(labels) < 2 or np.ptp(predicted) == 0.0 or np.ptp(labels) == 0.0:
            return 0.0
        value = (pearsonr if kind == "pearson" else spearmanr)(labels, predicted)[0]
        return 100.0 * float(value) if math.isfinite(value) else 0.0

    return correlation


@dataclass(frozen=True)
class Metric:
    """A score of predictions against labels, in percent (higher is better). ``kind``: the label kind it applies to
    (``"token"``: computed by :mod:`eat.token_tasks` over entities, not here)."""

    name: str
    title: str  # how tables and plot axes name it
    kind: str
    function: Callable[[np.ndarray, np.ndarray], float] | None = None

    def __call__(self, labels: Sequence, predicted: Sequence) -> float:
        """The score of ``predicted`` (class ids or real values, (N,)) against ``labels`` (N,), in percent."""
        if self.function is None:
            raise ValueError(f"metric {self.name!r} is computed over entities by eat.token_tasks, not from rows")
        return self.function(np.asarray(labels), np.asarray(predicted))


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", "accuracy", "classes", _accuracy),
    "f1": Metric("f1", "F1", "classes", _f1),
    "matthews": Metric("matthews", "Matthews corr.", "classes", _matthews),
    "pearson": Metric("pearson", "Pearson r", "regression", _correlation("pearson")),
    "spearman": Metric("spearman", "Spearman rho", "regression", _correlation("spearman")),
    "entity_f1": Metric("entity_f1", "entity F1", "token"),
}


def metric(name: str) -> Metric:
    """The :class:`Metric` called ``name``; ValueError naming the known ones (and the closest) otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        hint = difflib.get_close_matches(name, METRICS, n=1)
        raise ValueError(f"unknown metric {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                         f"known: {', '.join(METRICS)}") from None


def metric_title(name: str | None) -> str:
    """How a table names a metric column ("accuracy" for rows that name none: rows written before metrics had
    names)."""
    if not name or name not in METRICS:
        return "accuracy" if not name else str(name)
    return METRICS[name].title


# -------------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A task as data.

    text_column / pair_column: the columns of its files (after ``renames``) that hold the text and the optional
    second text; label_column the label. label_kind: ``"classes"`` (``label_names`` in id order) or
    ``"regression"`` (one real value; ``label_names`` is the single output's name). metrics: every metric reported;
    primary_metric: the one tuners, tables and plots use. files: per split, the candidate file names in the
    task's folder (first found wins). eval_splits: the splits a model is evaluated on. level: ``"sequence"`` (one
    label per row) or ``"token"`` (one per word; loaded by :mod:`eat.ner_data`). notes: per file name, what the
    file is when it is not the official split (``../shared/data/glue``'s samples and carved splits).
    """

    name: str
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    label_kind: str = "classes"
    label_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("accuracy",)
    primary_metric: str = "accuracy"
    renames: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    eval_splits: tuple[str, ...] = ("validation",)
    level: str = "sequence"
    notes: Mapping[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"task {self.name}: label kind {self.label_kind!r}; expected one of {', '.join(LABEL_KINDS)}")
        if self.level not in LEVELS:
            raise ValueError(f"task {self.name}: level {self.level!r}; expected one of {', '.join(LEVELS)}")
        for name in self.metrics:
            kind = metric(name).kind
            expected = "token" if self.level == "token" else self.label_kind
            if kind != expected:
                raise ValueError(f"task {self.name}: metric {name!r} scores {kind} labels, this task has "
                                 f"{expected} labels")
        if self.primary_metric not in self.metrics:
            raise ValueError(f"task {self.name}: primary metric {self.primary_metric!r} is not one of its metrics "
                             f"{list(self.metrics)}")
        if self.label_kind == "regression" and len(self.label_names) != 1:
            raise ValueError(f"task {self.name}: a regression task has one output name, got {self.label_names}")

    # --- views -----------------------------------------------------------------------------------------------
    @property
    def text_columns(self) -> tuple[str, ...]:
        """(text,) or (text, pair)."""
        return (self.text_column,) if self.pair_column is None else (self.text_column, self.pair_column)

    @property
    def is_pair(self) -> bool:
        """Whether a row holds two texts (sentence pairs: entailment, paraphrase, similarity)."""
        return self.pair_column is not None

    @property
    def is_regression(self) -> bool:
        """Whether the label is a real value (one model output)."""
        return self.label_kind == "regression"

    @property
    def num_labels(self) -> int:
        """Model outputs: 1 for regression, else the number of classes (0 when inferred from the data)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def f1(self) -> bool:
        """Whether binary F1 is among the metrics (QQP, MRPC)."""
        return "f1" in self.metrics

    # --- scoring ---------------------------------------------------------------------------------------------
    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs (N, C) as predictions (N,): the class with the highest logit, or the regression value."""
        outputs = np.asarray(outputs)
        if self.is_regression:
            return outputs.reshape(len(outputs), -1)[:, 0]
        return outputs.argmax(-1)

    def score(self, labels: Sequence, predicted: Sequence) -> dict[str, float]:
        """Every metric of the task (percent) for predictions (N,) against labels (N,), the primary one first."""
        order = (self.primary_metric,) + tuple(m for m in self.metrics if m != self.primary_metric)
        return {name: metric(name)(labels, predicted) for name in order}

    def primary(self, labels: Sequence, predicted: Sequence) -> float:
        """The primary metric (percent) of predictions (N,) against labels (N,)."""
        return metric(self.primary_metric)(labels, predicted)

    @property
    def primary_title(self) -> str:
        """How tables name the primary metric ("Matthews corr.", "Pearson r", ...)."""
        return metric_title(self.primary_metric)

    def runner(self):
        """The :class:`~eat.runners.TaskRunner` of this task's level: what loads, encodes, batches, scores, tunes
        and measures its rows (imported on first use: it needs torch)."""
        from .runners import runner_for

        return runner_for(self)

    def summary(self) -> str:
        """One line for help texts: name, texts, labels, metrics."""
        labels = ("a real value" if self.is_regression else
                  f"{len(self.label_names)} classes" if self.label_names else "classes from the data")
        texts = "word tags" if self.level == "token" else ("text pairs" if self.is_pair else "single texts")
        metrics = ", ".join(metric_title(m) + (" (primary)" if m == self.primary_metric and len(self.metrics) > 1
                                               else "") for m in self.metrics)
        return f"{self.name}: {texts}, {labels}; {metrics}"


def _glue(name: str, text: str, pair: str | None, labels: tuple[str, ...], *, metrics=("accuracy",),
          primary: str = "accuracy", kind: str = "classes", renames: Mapping[str, str] | None = None,
          files: Mapping[str, tuple[str, ...]] | None = None, eval_splits=("validation",),
          notes: Mapping[str, str] | None = None, description: str = "") -> Task:
    default_files = {"train": ("train.parquet", "train.tsv"), "validation": ("validation.parquet", "dev.tsv")}
    return Task(name, text, pair, "label", kind, labels, tuple(metrics), primary, dict(renames or {}),
                dict(files or default_files), tuple(eval_splits), "sequence", dict(notes or {}), description)


# GLUE as the Hugging Face `nyu-mll/glue` parquet files have it (column names, label ids); the renames map the
# original GLUE TSV headers onto those names. CoLA's GLUE TSVs have no header row, so CoLA reads parquet only.
TASKS: dict[str, Task] = {
    "sst2": _glue("sst2", "sentence", None, ("negative", "positive"), description="SST-2 sentiment"),
    "qqp": _glue("qqp", "question1", "question2", ("not_duplicate", "duplicate"), metrics=("accuracy", "f1"),
                 renames={"is_duplicate": "label"},
                 notes={"train_carved.parquet": "QQP, carved split (train and validation carved out of GLUE dev)"},
                 description="Quora question pairs: duplicate or not"),
    "mnli": _glue("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                  renames={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
                  files={"train": ("train.parquet", "train.tsv", "train_sample.parquet"),
                         "validation_matched": ("validation_matched.parquet", "dev_matched.tsv"),
                         "validation_mismatched": ("validation_mismatched.parquet", "dev_mismatched.tsv")},
                  eval_splits=("validation_matched", "validation_mismatched"),
                  notes={"train_sample.parquet": "MNLI, 10% train sample"},
                  description="MultiNLI entailment, 3 classes"),
    "qnli": _glue("qnli", "question", "sentence", ("entailment", "not_entailment"),
                  description="question / sentence: does the sentence answer it"),
    "rte": _glue("rte", "sentence1", "sentence2", ("entailment", "not_entailment"),
                 description="recognizing textual entailment"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"), metrics=("f1", "accuracy"),
                  primary="f1", renames={"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"},
                  description="Microsoft paraphrase corpus"),
    "cola": _glue("cola", "sentence", None, ("unacceptable", "acceptable"), metrics=("matthews", "accuracy"),
                  primary="matthews", files={"train": ("train.parquet",), "validation": ("validation.parquet",)},
                  description="linguistic acceptability"),
    "stsb": _glue("stsb", "sentence1", "sentence2", ("similarity",), metrics=("pearson", "spearman"),
                  primary="pearson", kind="regression", renames={"score": "label"},
                  description="semantic similarity, a score from 0 to 5"),
    "wnli": _glue("wnli", "sentence1", "sentence2", ("not_entailment", "entailment"),
                  description="Winograd NLI"),
    "conll2003": Task("conll2003", text_column="tokens", label_column="tags", metrics=("entity_f1",),
                      primary_metric="entity_f1", files={"train": ("eng.train", "train.txt"),
                                                         "validation": ("eng.testa", "valid.txt", "dev.txt"),
                                                         "test": ("eng.testb", "test.txt")},
                      level="token", description="CoNLL-2003 named entities (IOB2 tags per word)"),
}
# the registry's sequence tasks (what `eat run --task all` could mean) and token tasks
SEQUENCE_TASKS = tuple(name for name, task in TASKS.items() if task.level == "sequence")
TOKEN_TASK_NAMES = tuple(name for name, task in TASKS.items() if task.level == "token")
# the user's own token task: tagged sentences from --data-file / --eval-file (CoNLL columns or JSONL), its tags
# from the data; not in TASKS (it has no files of its own)
OWN_TOKEN_TASK = Task("ner", text_column="tokens", label_column="tags", metrics=("entity_f1",),
                      primary_metric="entity_f1", level="token",
                      description="your own tagged sentences (--data-file, --eval-file)")


def is_token_task(name: str) -> bool:
    """Whether a task name is a sequence-labelling task (one label per word): CoNLL-2003 or the user's own "ner".
    The one check of a level by name; everything else asks a :class:`Task` for its ``level`` or runner."""
    return name in TOKEN_TASK_NAMES or name == OWN_TOKEN_TASK.name


def named_task(name: str) -> Task:
    """The :class:`Task` a name stands for without a user's table: a registered task, or the user's own token task
    ("ner"); ValueError naming the known tasks otherwise."""
    if is_token_task(name):
        return TASKS.get(name, OWN_TOKEN_TASK)
    return get_task(name)


def get_task(name: str) -> Task:
    """The registered :class:`Task` called ``name``; ValueError naming the known tasks (and the closest)."""
    try:
        return TASKS[name]
    except KeyError:
        hint = difflib.get_close_matches(name, TASKS, n=1)
        raise ValueError(f"unknown task {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; known: "
                         f"{', '.join(TASKS)} (or pass --data-file for your own)") from None


def resolve_task(name: str, own_table: bool = False, **table: Any) -> Task:
    """The task a run works on: with ``own_table`` (a user's ``--data-file``) the user's table as ``table``
    describes it (:func:`user_task`'s columns, label kind and metrics), else the task the name stands for
    (:func:`named_task`). A token task's own files keep the token task: its tags come from the data."""
    if own_table and not is_token_task(name):
        return user_task(name, **table)
    return named_task(name)


def user_task(name: str, text_column: str = "text", pair_column: str | None = None, label_column: str = "label",
              label_kind: str = "classes", metrics: Sequence[str] | str | None = None,
              label_names: Sequence[str] = ()) -> Task:
    """A user's own table as a task. ``metrics``: a name or names (the first is primary); default accuracy for
    classes, Pearson and Spearman for regression. Label names of classes come from the data (``label_names``)."""
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"--label-kind: expected one of {', '.join(LABEL_KINDS)}, got {label_kind!r}")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not metrics:
        metrics = ("pearson", "spearman") if label_kind == "regression" else ("accuracy",)
    for name in metrics:
        found = metric(name)
        if found.kind != label_kind:
            raise ValueError(f"--metric {name}: scores {found.kind} labels, but --label-kind is {label_kind}")
    names = tuple(label_names) or ((label_column,) if label_kind == "regression" else ())
    return Task(name, text_column, pair_column, label_column, label_kind, names, tuple(metrics), metrics[0],
                description="your own table")


def task_for_model(num_labels: int, name: str = "custom") -> Task:
    """A task for a model whose task is not known: regression (Pearson) for one output, else accuracy."""
    return user_task(name, label_kind="regression" if num_labels == 1 else "classes")


def task_help() -> str:
    """Every known task, one per line (for ``--help`` texts and docs)."""
    return "\n".join(TASKS[name].summary() for name in TASKS)


def result_fields(task: Task, scores: dict[str, float], suffix: str = "") -> dict[str, Any]:
    """The fields a results row carries for a task's scores: ``metric`` (the primary metric's name),
    ``metric_value``, every metric by name, and ``accuracy`` (the column reports read for rows written before
    metrics had names) only when accuracy is one of the task's metrics. ``suffix`` (e.g. ``"_all_rows"``) names
    the value fields of another row set."""
    fields: dict[str, Any] = {} if suffix else {"metric": task.primary_metric}
    fields[f"metric_value{suffix}"] = scores[task.primary_metric]
    for name, value in scores.items():
        fields[f"{name}{suffix}"] = value
    return fields


__all__ = ["Task", "Metric", "METRICS", "TASKS", "SEQUENCE_TASKS", "TOKEN_TASK_NAMES", "OWN_TOKEN_TASK", "LABEL_KINDS",
           "get_task", "named_task", "is_token_task", "resolve_task",
           "user_task", "task_for_model", "task_help", "metric", "metric_title", "result_fields"]
