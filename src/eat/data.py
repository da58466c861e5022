"""Data: GLUE SST-2 / QQP / MNLI and user tables -> tokenized, length-bucketed, dynamically padded batches.

Every loader returns a :class:`TextDataset` (a pandas frame with ``text``, optional ``text_pair`` and an integer
``label`` column, plus where it came from). Bad input raises :class:`DataError` with the file and the problem.

GLUE files are found in a local folder (``EAT_DATA_DIR``) in either layout:

- Hugging Face parquet (``train.parquet``, ``validation.parquet``, ``validation_matched.parquet``...);
- original GLUE TSV (``train.tsv``, ``dev.tsv``, ``dev_matched.tsv``...);
- the partial/carved files of ``../shared/data/glue`` are mapped explicitly: MNLI ``train_sample.parquet`` (a 10%
  sample of train) and QQP ``train_carved.parquet`` / ``validation_carved.parquet`` (carved out of QQP dev; when
  the carved train is used, the carved validation is used too, never the full dev it was cut from).

Without a local folder the official splits load through ``datasets`` from the hub (needs internet).
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .tasks import Task, get_task

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data cannot be used; the message names the file and the problem."""


# Tasks are data (eat.tasks): columns, label kind, metrics, GLUE renames and files per split. QQP's carved pair of
# ../shared/data/glue is the one case a rule decides (carved train and carved validation go together).
_CARVED_QQP = {"train": "train_carved.parquet", "validation": "validation_carved.parquet"}


@dataclass
class TextDataset:
    """Rows of ``text`` (+ ``text_pair``) with integer ``label``; ``source`` names the file or hub split."""

    frame: pd.DataFrame
    label_names: tuple[str, ...]
    source: str
    note: str = ""

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def is_regression(self) -> bool:
        """Whether the labels are real values (a regression task), read from the label column's dtype."""
        return self.frame["label"].dtype.kind == "f"

    def subset(self, limit: int | None, seed: int = 0) -> "TextDataset":
        """A seeded random sample of ``limit`` rows (all rows when ``limit`` is None or larger)."""
        if limit is None or limit >= len(self.frame):
            return self
        frame = self.frame.sample(n=limit, random_state=seed).reset_index(drop=True)
        return TextDataset(frame, self.label_names, self.source, (self.note + f"; seeded sample of {limit}").strip("; "))


def data_dir() -> Path | None:
    """The local GLUE folder: ``EAT_DATA_DIR`` if set (it must exist), else None (use the hub)."""
    value = os.environ.get("EAT_DATA_DIR")
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise DataError(f"EAT_DATA_DIR={value}: no such directory")
    return path


def task_spec(task: str) -> Task:
    """The :class:`~eat.tasks.Task` of a sentence-level task name (GLUE); raises DataError for an unknown task or a
    token task (those load through :mod:`eat.ner_data`)."""
    try:
        spec = get_task(task)
    except ValueError as error:
        raise DataError(str(error)) from None
    if spec.level != "sequence":
        raise DataError(f"{task} is a token task (one label per word): it loads through eat.ner_data, not load_glue")
    return spec


def resolve_glue_file(task: str, split: str, root: Path) -> tuple[Path, str]:
    """The local file for a task split and a note on what it is (partial/carved). Raises DataError if absent."""
    task_dir = root / task
    files = task_spec(task).files
    if task == "qqp" and not any((task_dir / name).is_file() for name in files["train"]):
        # No real QQP train here: use the carved pair, never the full dev the carved train was cut from.
        if split in _CARVED_QQP and (task_dir / _CARVED_QQP[split]).is_file():
            return task_dir / _CARVED_QQP[split], "QQP, carved split (train and validation carved out of GLUE dev)"
    candidates = files.get(split)
    if candidates is None:
        raise DataError(f"{task} has no split {split!r}; splits: {', '.join(files)}")
    for name in candidates:
        if (task_dir / name).is_file():
            return task_dir / name, task_spec(task).notes.get(name, "")
    raise DataError(f"{task_dir}: no file for split {split!r} (looked for {', '.join(candidates)})")


def load_glue(task: str, split: str, root: Path | None = None) -> TextDataset:
    """A GLUE split from the local folder (``root`` or ``EAT_DATA_DIR``) or, without one, from the hub."""
    spec = task_spec(task)
    root = root if root is not None else data_dir()
    if root is None:
        return _load_glue_from_hub(spec, split)
    path, note = resolve_glue_file(task, split, root)
    # Official GLUE files are used as published: MNLI's train has a row with an empty hypothesis, which is
    # dropped with a warning (a user's own table gets an error instead, so nothing is silently lost there).
    # GLUE TSV column names (sentence1, gold_label...) are renamed here, for the official files only: a user's
    # own table keeps its column names (--text-column sentence1 must find sentence1)
    frame = read_table(path, glue=True).rename(columns=dict(spec.renames))
    dataset = _frame_to_dataset(frame, str(path), spec.text_column, spec.pair_column, spec.label_column,
                                spec.label_names, drop_empty=True, label_kind=spec.label_kind)
    dataset.note = note
    return dataset


def _load_glue_from_hub(spec: Task, split: str) -> TextDataset:
    try:
        import datasets
    except ImportError as error:
        raise DataError("no local data (EAT_DATA_DIR unset) and the `datasets` package is not installed; "
                        "set EAT_DATA_DIR or `pip install eat[hub]`") from error
    try:
        hub = datasets.load_dataset("nyu-mll/glue", spec.name, split=split)
    except Exception as error:  # noqa: BLE001 - network and hub errors: one message
        raise DataError(f"could not load glue/{spec.name} split {split} from the hub ({error}); "
                        "set EAT_DATA_DIR to a local copy") from error
    frame = hub.to_pandas()
    return _frame_to_dataset(frame, f"hub:nyu-mll/glue/{spec.name}/{split}", spec.text_column, spec.pair_column,
                             spec.label_column, spec.label_names, drop_empty=True, label_kind=spec.label_kind)


def read_table(path: Path, glue: bool = False) -> pd.DataFrame:
    """Read CSV, TSV, JSONL or parquet by extension. Official GLUE TSVs (``glue``) are read with quoting off (their
    texts contain bare `"`); a user's CSV/TSV is read with standard quoting, so a quoted field holding a tab, a comma
    or a newline (what pandas and spreadsheets write) stays one field of one row."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file (give a .csv, .tsv, .jsonl or .parquet file)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl", encoding="utf-8-sig")  # a BOM is no error
        if suffix in (".tsv", ".csv"):
            _check_utf8(path)
            if suffix == ".tsv":
                return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE if glue else csv.QUOTE_MINIMAL,
                                   encoding="utf-8", keep_default_na=False, dtype=str)
            return pd.read_csv(path, encoding="utf-8", keep_default_na=False, dtype=str)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - pandas/pyarrow raise many kinds
        raise DataError(f"{path}: cannot read as {suffix[1:]} ({error})") from error
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (invalid byte at line {line}, offset {error.start})") from None


def load_table(path: str | Path, text_column: str, text_pair_column: str | None, label_column: str,
               label_names: Sequence[str] | None = None, drop_empty: bool = False,
               label_kind: str = "classes") -> TextDataset:
    """A user table (CSV/TSV/JSONL/parquet) as a :class:`TextDataset`.

    ``label_kind="regression"``: the label is a real value on every row (float32), e.g. a similarity score.

    Labels may be integers (ids into ``label_names``) or strings (names in ``label_names``). Without
    ``label_names`` they are inferred: sorted unique strings, or ``0..max`` for integers. Rows with an empty text
    raise :class:`DataError`, or with ``drop_empty`` are dropped with one warning naming the file and the rows.
    """
    frame = read_table(Path(path))  # the user's own column names, never GLUE's renames
    return _frame_to_dataset(frame, str(path), text_column, text_pair_column, label_column, label_names, drop_empty,
                             label_kind)


def _frame_to_dataset(frame: pd.DataFrame, source: str, text_column: str, text_pair_column: str | None,
                      label_column: str, label_names: Sequence[str] | None, drop_empty: bool = False,
                      label_kind: str = "classes") -> TextDataset:
    for column in (text_column, text_pair_column, label_column):
        if column is not None and column not in frame.columns:
            raise DataError(f"{source}: no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise DataError(f"{source}: no rows")
    if drop_empty:
        frame = _drop_empty_texts(frame, source, [c for c in (text_column, text_pair_column) if c is not None])
    out = pd.DataFrame({"text": _texts(frame[text_column], source, text_column)})
    if text_pair_column is not None:
        out["text_pair"] = _texts(frame[text_pair_column], source, text_pair_column)
    if label_kind == "regression":  # one real value per row; the single output is named after the column
        out["label"] = _real_labels(frame[label_column], source, label_column)
        return TextDataset(out, tuple(label_names or (label_column,))[:1], source)
    labels, names = _labels(frame[label_column], source, label_column, label_names)
    out["label"] = labels
    return TextDataset(out, tuple(names), source)


def _real_labels(column: pd.Series, source: str, name: str) -> np.ndarray:
    """A regression label column as float32 (N,); DataError naming the rows that are blank or not a finite number."""
    values = pd.to_numeric(column.astype("string").str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = [int(i) for i in np.flatnonzero(~np.isfinite(values))]
    if bad:
        examples = ", ".join(f"row {r}: {column.iloc[r]!r}" for r in bad[:5])
        raise DataError(f"{source}: column {name!r} has {len(bad)} label(s) that are not numbers ({examples}; row "
                        "numbers count from 0, header excluded); a regression label is a real value on every row")
    return values.astype(np.float32)


def _empty_mask(column: pd.Series) -> pd.Series:
    values = column.astype("string")
    return values.isna() | (values.str.strip() == "")


def _drop_empty_texts(frame: pd.DataFrame, source: str, columns: list[str]) -> pd.DataFrame:
    """``frame`` without rows whose text columns are empty; one warning with the count and the first rows."""
    empty = pd.Series(False, index=frame.index)
    for column in columns:
        empty |= _empty_mask(frame[column])
    if not bool(empty.any()):
        return frame
    rows = [int(i) for i in frame.index[empty.to_numpy()][:5]]
    logger.warning("%s: dropped %d row(s) with an empty text, e.g. rows %s (row numbers count from 0)",
                   source, int(empty.sum()), rows)
    if bool(empty.all()):
        raise DataError(f"{source}: every row has an empty text")
    return frame.loc[~empty.to_numpy()].reset_index(drop=True)


def _texts(column: pd.Series, source: str, name: str) -> list[str]:
    values = column.astype("string")
    empty = _empty_mask(column)
    if bool(empty.any()):
        rows = [int(i) for i in empty[empty].index[:5]]
        raise DataError(f"{source}: column {name!r} has {int(empty.sum())} empty text(s), e.g. at rows {rows} "
                        "(row numbers count from 0, header excluded); remove or fill them")
    return values.tolist()


def _label_value(value) -> int | str | None:
    """One raw label cell as an int (integers, integral floats, digit strings), a stripped string, or None for a
    blank or null cell."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)  # a JSONL/parquet integer column that pandas read as float
    text = str(value).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _rows_text(rows: list[int]) -> str:
    return f"{rows[:5]}" + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def _labels(column: pd.Series, source: str, name: str, label_names: Sequence[str] | None):
    """Integer label ids for a label column, and the label names.

    Every cell must hold a label: a blank or null cell is an error naming the rows (it would otherwise turn the
    column into strings and shift every class). Labels are either all integers or all strings; a mix (``neg`` and
    ``0``) is an error. Without ``label_names`` they are inferred: integers ``0..k-1`` are ids (names ``"0"``...),
    other integers (``1, 2``) and strings are names, sorted. With ``label_names`` (an evaluation table, or a GLUE
    task), integer labels are ids unless the names are themselves integers (a user's inferred names), in which case
    they are matched by name; a label outside the names is an error naming it."""
    raw = column.tolist()
    values = [_label_value(v) for v in raw]
    blank = [row for row, v in enumerate(values) if v is None]
    if blank:
        raise DataError(f"{source}: column {name!r} has {len(blank)} blank or null label(s) at rows "
                        f"{_rows_text(blank)} (row numbers count from 0, header excluded); every row needs a label")
    ints = [row for row, v in enumerate(values) if isinstance(v, int)]
    if ints and len(ints) < len(values):
        texts = [row for row, v in enumerate(values) if not isinstance(v, int)]
        raise DataError(f"{source}: column {name!r} mixes integer labels ({len(ints)} rows, e.g. row {ints[0]}: "
                        f"{values[ints[0]]!r}) and text labels ({len(texts)} rows, e.g. row {texts[0]}: "
                        f"{values[texts[0]]!r}); use one kind")
    as_int = bool(ints)
    if label_names is None:
        unique = sorted(set(values))
        if as_int and unique == list(range(len(unique))):
            label_names = [str(i) for i in unique]
        else:
            label_names = [str(v) for v in unique]
    names = tuple(str(n) for n in label_names)
    index = {n: i for i, n in enumerate(names)}
    # integer labels are ids into the names, except when the names are integers themselves (then, by name)
    by_name = not as_int or all(isinstance(_label_value(n), int) for n in names)
    labels, bad = [], []
    for row, value in enumerate(values):
        if by_name:
            label = index.get(str(value), -1)
        else:
            label = value if 0 <= value < len(names) else -1
        if label < 0:
            bad.append((row, raw[row]))
        labels.append(label)
    if bad:
        unknown = sorted({str(_label_value(v)) for _, v in bad})
        examples = ", ".join(f"row {r}: {v!r}" for r, v in bad[:5])
        raise DataError(f"{source}: column {name!r} has {len(bad)} label(s) outside the task's labels "
                        f"{list(names)}: {unknown[:10]} ({examples}); a label the model was not trained on cannot "
                        "be scored")
    return labels, names


# --------------------------------------------------------------------------------------------- tokenization


@dataclass
class EncodedDataset:
    """Token ids per row (no padding), labels, and how many rows were truncated."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def encode(dataset: TextDataset, tokenizer, max_length: int) -> EncodedDataset:
    """Tokenize with truncation to ``max_length``; warn once with the count of truncated rows."""
    frame = dataset.frame
    pairs = frame["text_pair"].tolist() if "text_pair" in frame.columns else None
    full = tokenizer(frame["text"].tolist(), pairs, truncation=False, add_special_tokens=True)
    lengths = [len(ids) for ids in full["input_ids"]]
    truncated = sum(length > max_length for length in lengths)
    if truncated:
        logger.warning("%s: %d of %d rows are longer than %d tokens and were truncated", dataset.source, truncated,
                       len(lengths), max_length)
        full = tokenizer(frame["text"].tolist(), pairs, truncation=True, max_length=max_length)
    ids = full["input_ids"]
    types = full.get("token_type_ids") or [[0] * len(row) for row in ids]
    return EncodedDataset(ids, types, frame["label"].tolist(), truncated, [len(row) for row in ids])


def batch_order(lengths: Sequence[int], batch_size: int, *, shuffle: bool = False, seed: int = 0,
                bucket: bool = True) -> list[list[int]]:
    """Row numbers of every batch. ``bucket`` groups rows of similar length (less padding): for training, rows are
    shuffled, cut into pools of 50 batches, sorted by length inside a pool, and the batches shuffled; for
    evaluation, rows are sorted by length."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        pool = batch_size * 50 if shuffle else len(order)
        order = [i for start in range(0, len(order), pool)
                 for i in sorted(order[start:start + pool], key=lambda r: lengths[r])]
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle and bucket:
        rng.shuffle(chunks)
    return chunks


def batches(encoded: EncodedDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            bucket: bool = True, pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Dynamically padded batches in :func:`batch_order`. Each batch carries ``index`` (row numbers) to restore
    the order."""
    for chunk in batch_order(encoded.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket):
        yield collate(encoded, chunk, pad_id)


def padding_share(batched: Sequence[dict[str, torch.Tensor]]) -> float:
    """Share of the token positions of ``batched`` (dicts with an ``attention_mask`` (B, n)) that are padding: in
    arrival order often half of them, length-sorted a few percent (a static model pays for every one)."""
    real = sum(int(batch["attention_mask"].sum()) for batch in batched)
    total = sum(batch["attention_mask"].numel() for batch in batched)
    return 1.0 - real / total if total else 0.0


def collate(encoded: EncodedDataset, rows: Sequence[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad the given rows to their longest: input_ids, attention_mask, token_type_ids, labels, index."""
    width = max(encoded.lengths[r] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = encoded.lengths[r]
        ids[i, :n] = torch.tensor(encoded.input_ids[r])
        types[i, :n] = torch.tensor(encoded.token_type_ids[r])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": torch.tensor([encoded.labels[r] for r in rows]), "index": torch.tensor(list(rows))}


def carve_calibration(dataset: TextDataset, fraction: float = 0.1, seed: int = 0,
                      max_rows: int | None = 2000) -> tuple[TextDataset, TextDataset]:
    """Split a training set into (train, calibration): a seeded held-out slice for choosing operating points,
    so thresholds are never tuned on the dev set."""
    frame = dataset.frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    size = max(1, int(len(frame) * fraction))
    if max_rows is not None:
        size = min(size, max_rows)
    calibration = TextDataset(frame.iloc[:size].reset_index(drop=True), dataset.label_names, dataset.source,
                              f"calibration slice ({size} rows, seed {seed}) of {dataset.source}")
    train = TextDataset(frame.iloc[size:].reset_index(drop=True), dataset.label_names, dataset.source, dataset.note)
    return train, calibration


def carve_sentence_calibration(dataset: TextDataset, sentences: int, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """Split a training set whose rows include phrases of other rows (SST-2: every parse-tree phrase of a
    sentence is its own row) into (train, calibration) by whole sentences.

    Calibration: ``sentences`` seeded-random rows that are whole sentences, i.e. whose text is not part of any
    longer row. Train: every row except those sentences and every row whose text occurs inside one of them (their
    phrases, plus the odd short phrase such as "the film" that also occurs there by chance: a few rows more held
    out, never leaked). Why: dev sentences are whole sentences, about twice as long as the average phrase, and a
    calibration slice of random phrases (whose parent sentences were trained on) is easier and shorter than dev,
    so operating points tuned on it exit too late or too early for dev."""
    if "text_pair" in dataset.frame.columns:
        raise DataError(f"{dataset.source}: sentence calibration is for single-text tasks whose rows include "
                        "phrases of other rows (SST-2); this one has text pairs, use row calibration")
    texts = dataset.frame["text"].astype(str).str.strip()
    # one string with a separator no text contains, so a match never spans two rows
    every_text = "\n" + "\n".join(texts) + "\n"
    copies = texts.value_counts()
    order = np.random.default_rng(seed).permutation(len(texts))
    chosen: list[int] = []
    for row in order:
        text = texts.iloc[row]
        # a whole sentence occurs only as itself (and its exact duplicates), never inside a longer row
        if text and every_text.count(text) == copies[text]:
            chosen.append(int(row))
            if len(chosen) == sentences:
                break
    if len(chosen) < sentences:
        raise DataError(f"{dataset.source}: asked for {sentences} calibration sentences, found only {len(chosen)} "
                        "rows that are not part of a longer row")
    chosen_texts = "\n".join(texts.iloc[chosen])
    held_out = texts.map(lambda text: text in chosen_texts).to_numpy()  # the sentences themselves, and their phrases
    frame = dataset.frame
    calibration = TextDataset(frame.iloc[chosen].reset_index(drop=True), dataset.label_names, dataset.source,
                              f"calibration slice ({sentences} whole sentences, seed {seed}) of {dataset.source}")
    held = f"{int(held_out.sum())} rows held out (calibration sentences and their phrases)"
    note = (dataset.note + "; " + held).strip("; ")
    train = TextDataset(frame[~held_out].sample(frac=1.0, random_state=seed).reset_index(drop=True),
                        dataset.label_names, dataset.source, note)
    return train, calibration


__all__ = ["DataError", "Task", "TextDataset", "EncodedDataset", "data_dir", "task_spec",
           "resolve_glue_file", "load_glue", "load_table", "read_table", "encode", "batches", "batch_order", "collate",
           "padding_share",
           "carve_calibration", "carve_sentence_calibration"]
