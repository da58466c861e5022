"""Results on disk: CSV and JSONL logs that are appended atomically and never truncated.

Each append rewrites the file to a temporary name and swaps it in with ``os.replace``, so a crash leaves either the
old file or the new one, never half a row. Appends from several processes (``eat bench`` and ``eat tune`` on one
results folder) are serialised by a lock file beside the log (``<stem>.lock``, :mod:`filelock`), so no row is lost;
readers need no lock, since the file they open is always a whole one. A file that cannot be read is never written
over: the caller gets a :class:`ResultsError` naming it. Rows are keyed by ``config_hash`` so reruns skip
configurations already measured.

What a row holds is named once here (:class:`ResultRow`, the column constants such as :data:`B1_P50_MS`, the
point names :data:`STATIC`, :data:`EXITS_OFF`, :data:`TUNED`), and so is where every file of a results folder
lives (:func:`tuned_file`, :func:`sweep_file`, :func:`run_config_file`...): the bench writes them, the report,
the main job's summary and ``benchmarks/targets.py`` read them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from filelock import FileLock


# ------------------------------------------------------------------------------------------------------ rows


class ResultRow(TypedDict, total=False):
    """One line of ``results.jsonl``: one operating point measured in one interleaved run
    (:func:`eat.bench.measure_points` writes it; reports, the main job's summary and ``benchmarks/targets.py``
    read it). Rows stay plain dicts on disk and in memory; this names their keys and types in one place. Keys
    come in this order; rows written by older versions lack some (a reader falls back, e.g. :func:`row_metric`)."""

    # what was measured, and where
    run_id: str  # the interleaved run (ratios are only formed within one)
    task: str
    split: str | None
    point: str  # STATIC, HALF_DEPTH, EXITS_OFF, TUNED, "eat:<mechanisms>", "tau=0.9", ...; peers add ":<backend>"
    role: str  # baseline, ablation, tuned, tau, keep, window
    model: str  # eat, static, half
    checkpoint: str
    layers: int
    backend: str  # torch or onnxruntime (rows since peers)
    precision: str  # fp32, bf16, int8 (token rows written before entity_precision: their entity precision)
    mech_prune: bool
    mech_sparse: bool
    mech_exit: bool
    knobs: dict[str, Any]
    tau: float | None
    rows: int  # rows (chunks for a token task) timed at batch 1, whose outputs are scored
    dataset: str
    seed: int
    batch_size_latency: int
    batch_size_throughput: int
    device: str
    threads: int
    cpu: str
    gpu: str
    torch: str
    transformers: str
    python: str
    git_commit: str
    # scores (percent): the task's primary metric and every other one by name; rows written before metrics had
    # names hold accuracy (and f1) only, a token task's rows entity F1 in ``accuracy``
    metric: str
    metric_value: float
    accuracy: float
    f1: float
    metric_value_batched: float  # from the timed batch calls (accuracy_batched in older rows)
    accuracy_batched: float
    recall: float  # token rows written before entity_recall
    entity_f1: float  # token tasks: entity F1 (also metric_value and accuracy), precision and recall, seqeval's
    entity_precision: float
    entity_recall: float
    # timing: "b1_" + LatencyStats fields (count, mean, p50, p90, p99, std, min, max in ms), batch throughput in
    # arrival order and length-sorted, and "b<N>_batch_" + LatencyStats of the batches
    b1_p50_ms: float
    b1_p90_ms: float
    b1_p99_ms: float
    throughput_rows_per_s: float
    throughput_sorted_rows_per_s: float
    padding_share_arrival: float
    padding_share_sorted: float
    # work
    mean_exit_layer: float
    exit_distribution: dict[int, int]
    mean_tokens_per_layer: list[float]
    token_layer_fraction: float
    kv_token_layer_fraction: float  # token tasks: key/value-only token-layers
    work: dict[str, int]
    timestamp: str
    config_hash: str
    preset: str  # rows of the main job
    # the whole split, when a sample was timed (eat bench --accuracy-all-rows)
    metric_value_all_rows: float
    accuracy_all_rows: float
    f1_all_rows: float
    rows_all: int
    examples_file: str  # examples/<hash>-<run>.csv, per-row exit layer and tokens


# the columns every table and target reads (as :func:`eat.timing.LatencyStats.as_dict` and measure_points name them)
B1_P50_MS = "b1_p50_ms"
THROUGHPUT = "throughput_rows_per_s"
THROUGHPUT_SORTED = "throughput_sorted_rows_per_s"

# the points every comparison is made between (eat.bench builds them; reports, summaries and targets read them)
STATIC = "static"  # the static model (the reference of every speedup)
HALF_DEPTH = "half-depth"  # the static model with every other layer
EXITS_OFF = "eat:none"  # the EAT model with every mechanism off
TUNED = "eat:tuned"  # the point `eat tune` chose for batch 1


def tuned_point_name(batch_size: int = 1) -> str:
    """The results-log name of a tuned point: ``eat:tuned`` (batch-1 objective) or ``eat:tuned-bN`` (throughput at
    batch N)."""
    return TUNED if batch_size == 1 else f"{TUNED}-b{batch_size}"


# --------------------------------------------------------------------------------------------------- files


def tuned_file(folder: str | Path, task: str, batch_size: int = 1, precision: str = "fp32",
               backend: str = "torch") -> Path:
    """Where `eat tune` (and the main job) save a tuned point: ``tuned_<task>.json`` (batch-1 objective) or
    ``tuned_<task>_bN.json``; a tuner of another precision or backend adds it (``tuned_<task>_int8.json``,
    ``tuned_<task>_ort-int8.json``), so the fp32 choice is never replaced."""
    suffix = _tuned_suffix(precision, backend)
    return Path(folder) / (f"tuned_{task}{suffix}.json" if batch_size == 1
                           else f"tuned_{task}_b{batch_size}{suffix}.json")


def _tuned_suffix(precision: str, backend: str) -> str:
    """The file-name suffix of a tuner's point: "" (fp32, PyTorch), ``_int8``, ``_ort-fp32``, ``_ort-int8``..."""
    label = precision if backend == "torch" else f"ort-{precision}"
    return "" if label == "fp32" else f"_{label}"


def batch_tuned_files(folder: str | Path, task: str, precision: str = "fp32",
                      backend: str = "torch") -> dict[int, Path]:
    """{batch size: file} of the points `eat tune --batch-size N [--precision P] [--backend B]` saved for ``task``
    in ``folder``."""
    suffix = _tuned_suffix(precision, backend)
    stems = (path.stem for path in sorted(Path(folder).glob(f"tuned_{task}_b*{suffix}.json")))
    sizes = (stem[:len(stem) - len(suffix)].rsplit("_b", 1)[1] for stem in stems)
    return {int(size): tuned_file(folder, task, int(size), precision, backend) for size in sizes if size.isdigit()}


def run_config_file(folder: str | Path, task: str) -> Path:
    """Where the main job records how it built a task's models (``run_config_<task>.json``)."""
    return Path(folder) / f"run_config_{task}.json"


def bench_config_file(folder: str | Path, task: str) -> Path:
    """Where the main job records its bench settings for a task (``bench_config_<task>.json``)."""
    return Path(folder) / f"bench_config_{task}.json"


def train_config_file(folder: str | Path, task: str) -> Path:
    """Where the main job records its EAT model's training settings (``train_config_<task>.json``)."""
    return Path(folder) / f"train_config_{task}.json"


class ResultsError(RuntimeError):
    """A results file is unreadable or inconsistent; the message names it. Nothing was written."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a uniquely named temporary file in the same folder (so two writers
    never share one), flushed and fsynced, then ``os.replace``. Readers see the old file or the new one, whole; a
    crash leaves no temporary file behind (it is removed on any error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON with :func:`atomic_write_text` (values JSON cannot hold become strings)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def new_run_id() -> str:
    """A fresh id for one interleaved measuring run: time, process and a random part (two runs in the same second
    of one process, as in a fast test or a quick rerun, must not share an id, or a mixed table looks whole)."""
    import time
    import uuid

    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def read_tuned_knobs(tuned: str | Path | dict[str, Any], flag: str = "--tuned") -> dict[str, Any]:
    """The knobs of an operating point `eat tune` saved (a ``tuned_<task>.json`` path, or its content as a dict).

    Every entry point that takes a tuned point reads it here, so a missing, non-JSON or foreign file gets the same
    message everywhere, naming ``flag`` and the path."""
    if isinstance(tuned, dict):
        saved: Any = tuned
    else:
        try:
            saved = json.loads(Path(tuned).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{flag} {tuned}: no such file (eat tune writes tuned_<task>.json into its "
                                    "--results folder)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{flag} {tuned}: not valid JSON ({error})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("knobs"), dict):
        raise ValueError(f"{flag} {tuned if not isinstance(tuned, dict) else '(dict)'}: no 'knobs' object; expected "
                         "a file written by eat tune")
    return dict(saved["knobs"])


def series_name(task: str, split: str, split_count: int) -> str:
    """A task's evaluation split as reports and file names call it: the task alone when the task is evaluated on
    one split, ``task:split`` when on several (MNLI's matched and mismatched), whatever was measured so far."""
    return f"{task}:{split}" if split_count > 1 else task


def sweep_file(folder: str | Path, series: str) -> Path:
    """Where the threshold sweep of one series lives (written by the pipeline, read by the report)."""
    return Path(folder) / f"tau_sweep_{series.replace(':', '_')}.csv"


def row_metric(row: dict[str, Any], suffix: str = "") -> tuple[str, float]:
    """(name, value) of a results row's primary metric (``suffix``: of another row set, e.g. ``"_all_rows"``).
    Rows written before metrics had names hold it in ``accuracy`` (a token task's rows: entity F1, which their
    ``metric`` names)."""
    value = row.get(f"metric_value{suffix}")
    if value is not None:
        return str(row.get("metric", "metric")), float(value)
    return str(row.get("metric") or "accuracy"), float(row[f"accuracy{suffix}"])


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ResultsLog:
    """``<stem>.csv`` + ``<stem>.jsonl`` in a folder: one row per measured configuration.

    The JSONL file is the source of truth (nested values kept); the CSV carries the flat columns for spreadsheets.
    """

    def __init__(self, folder: str | Path, stem: str = "results"):
        self.folder = Path(folder)
        self.jsonl = self.folder / f"{stem}.jsonl"
        self.csv = self.folder / f"{stem}.csv"
        self.lock_file = self.folder / f"{stem}.lock"

    def _lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_file))

    def rows(self) -> list[dict[str, Any]]:
        """Every row; raises :class:`ResultsError` for a corrupt file (naming the file and line)."""
        if not self.jsonl.exists():
            return []
        rows = []
        text = self.jsonl.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ResultsError(f"{self.jsonl}: line {number} is not valid JSON ({error.msg}); fix or move the "
                                   "file away (it is never overwritten)") from None
            if not isinstance(row, dict) or "config_hash" not in row:
                raise ResultsError(f"{self.jsonl}: line {number} is not a result row (no config_hash)")
            rows.append(row)
        return rows

    def has(self, hash_: str) -> bool:
        """Whether a row with this configuration hash is already logged."""
        return any(row["config_hash"] == hash_ for row in self.rows())

    def append(self, row: dict[str, Any], *, replace: bool = False) -> None:
        """Add a row (with ``replace``, first drop rows of the same ``config_hash``: an explicit re-measurement)."""
        self.append_rows([row], replace=replace)

    def append_rows(self, new_rows: Sequence[dict[str, Any]], *, replace: bool = False) -> None:
        """Add several rows in one atomic write (a table measured side by side lands whole or not at all); with
        ``replace``, rows of the same ``config_hash`` are dropped first. Holds the log's lock while it reads and
        rewrites, so concurrent appends from other processes are all kept."""
        if any("config_hash" not in row for row in new_rows):
            raise ValueError("a result row needs a config_hash")
        with self._lock():
            rows = self.rows()
            if replace:
                hashes = {row["config_hash"] for row in new_rows}
                rows = [r for r in rows if r["config_hash"] not in hashes]
            rows.extend(new_rows)
            atomic_write_text(self.jsonl, "".join(json.dumps(r, default=str) + "\n" for r in rows))
            atomic_write_text(self.csv, _to_csv(rows))


def _flat(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value


def _to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _flat(v) for k, v in row.items()})
    return buffer.getvalue()


__all__ = ["ResultsLog", "ResultsError", "ResultRow", "atomic_write_text", "atomic_write_json", "config_hash",
           "row_metric", "read_tuned_knobs", "new_run_id", "series_name", "sweep_file", "tuned_file",
           "batch_tuned_files", "run_config_file", "bench_config_file", "train_config_file", "tuned_point_name",
           "STATIC", "HALF_DEPTH", "EXITS_OFF", "TUNED", "B1_P50_MS", "THROUGHPUT", "THROUGHPUT_SORTED"]
