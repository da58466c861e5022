"""Large-file prediction: classify CSV/TSV/JSONL/parquet files of any size into resumable parquet shards.

The input (one file, or every supported file of a folder, in name order) is read as a stream of **chunks** of
``chunk_rows`` input records; nothing holds more than one chunk (plus the model) in memory. Chunk ``k`` of a file is
always records ``k * chunk_rows .. (k + 1) * chunk_rows - 1`` (row numbers count from 0, header excluded), so a
chunk is a fixed unit of work whatever happened before: it becomes one output shard,
``shards/<file>-c<k>.parquet``, with each predicted row's ``source`` (the input file), ``row``, optional ``id``,
``label``, ``label_id``, ``confidence``, ``probabilities`` (in the label order of the manifest), ``exit_layer`` and
``tokens``. Inside a chunk rows are tokenized together and run in length-sorted batches (little padding), results
put back in row order.

Records that cannot be classified (an empty text, bytes that are not UTF-8, a missing column or field, a line that is
not JSON) are not predicted: each goes to the chunk's rejects (``rejects/<shard>.jsonl``: source, row, reason) and is
counted; with ``strict`` the first one stops the job with a :class:`~eat.data.DataError` naming file and row.

``manifest.json`` lists the finished shards and is replaced atomically (write, then ``os.replace``) after each shard,
whose parquet and rejects files were themselves written under a temporary name and renamed first. A job killed at
any moment therefore leaves finished shards in the manifest and at most one unlisted shard, which a resumed job
writes again (same name, same rows): every input row ends up exactly once in the output, predicted or rejected
(:func:`verify_output` checks it). The manifest also records the settings (checkpoint, knobs, precision, columns,
chunk size, the input files' sizes and times); an output folder made with other settings is refused.

The model call is shared with the Ray Data path (:mod:`eat.bulk_ray`): :func:`predict_frame` turns one chunk's frame
into its predictions, wherever it runs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .data import DataError

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class BulkConfig:
    """What a large-file prediction job reads and how (saved in the output's manifest; a resume must match).

    chunk_rows: input records per chunk = per output shard (the unit of resumption).
    batch_size: rows per model call inside a chunk (length-sorted).
    """

    checkpoint: str
    text_column: str = "text"
    text_pair_column: str | None = None
    id_column: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    tuned: str | None = None
    precision: str = "fp32"
    backend: str = "torch"
    max_length: int = 128
    batch_size: int = 32
    chunk_rows: int = 10_000
    strict: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.chunk_rows < 1:
            raise ValueError(f"--chunk-rows: must be >= 1, got {self.chunk_rows}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.max_length < 4:
            raise ValueError(f"--max-length: must be >= 4, got {self.max_length}")


@dataclass
class Chunk:
    """One unit of work: records ``first_row .. first_row + records - 1`` of one input file.

    frame: the readable rows (columns ``source``, ``row``, optional ``id``, ``text``, optional ``text_pair``).
    rejects: the unreadable ones, each ``{"source", "row", "reason"}``.
    """

    source: str
    index: int
    first_row: int
    records: int
    frame: pd.DataFrame
    rejects: list[dict[str, Any]]

    @property
    def name(self) -> str:
        """The shard name: ``<file name, made safe>-c<chunk index>``."""
        return f"{_safe_name(self.source)}-c{self.index:06d}"


@dataclass
class BulkResult:
    """What a job did: rows predicted and rejected (all shards, this run's and earlier), shards written now."""

    output: str
    rows: int
    rejected: int
    shards: int
    shards_written: int
    seconds: float
    rows_per_s: float  # rows predicted by this run / its seconds in the model loop


def _safe_name(source: str) -> str:
    text = "".join(c if c.isalnum() or c in "-_." else "_" for c in source)
    return text.strip("._") or "input"


# --------------------------------------------------------------------------------------------------- inputs


def input_files(path: str | Path) -> list[Path]:
    """The files a job reads: ``path`` itself, or the supported files of a folder (not recursive), sorted."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(SUPPORTED_SUFFIXES)} files in this folder")
        return files
    raise DataError(f"{path}: no such file or folder")


def _source_names(files: list[Path]) -> list[str]:
    """Names the outputs use for the inputs: file names (unique within one folder)."""
    return [file.name for file in files]


def _check_text(value: Any, column: str) -> str | None:
    """None if ``value`` is a usable text, else the reason it is not."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"empty text in {column!r}"
    if not isinstance(value, str):
        return f"{column!r} is not a string ({type(value).__name__})"
    if not value.strip():
        return f"empty text in {column!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a byte that was not UTF-8 (read with surrogateescape)
        return f"{column!r} is not UTF-8 text"
    return None


class _ChunkBuilder:
    """Collects records into chunks of exactly ``chunk_rows`` (the last may be shorter)."""

    def __init__(self, source: str, config: BulkConfig):
        self.source, self.config = source, config
        self.index, self.row = 0, 0
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any] | None, reason: str | None = None) -> Chunk | None:
        """Add record number ``self.row`` (a dict of column values, or None with a ``reason``); a full chunk is
        returned."""
        config = self.config
        if reason is None and record is not None:
            for column in (config.text_column, config.text_pair_column):
                if column is not None:
                    reason = (f"missing column {column!r}" if column not in record
                              else _check_text(record[column], column))
                    if reason:
                        break
            if reason is None and config.id_column is not None and record.get(config.id_column) is None:
                reason = f"missing id in {config.id_column!r}"
        if reason is not None:
            if config.strict:
                raise DataError(f"{self.source}: row {self.row} (counting from 0, header excluded): {reason} "
                                "(--strict stops on the first unreadable row)")
            self.rejects.append({"source": self.source, "row": self.row, "reason": reason})
        else:
            row = {"source": self.source, "row": self.row, "text": record[config.text_column]}
            if config.text_pair_column is not None:
                row["text_pair"] = record[config.text_pair_column]
            if config.id_column is not None:
                row["id"] = str(record[config.id_column])
            self.rows.append(row)
        self.row += 1
        if self.row - self.index * config.chunk_rows == config.chunk_rows:
            return self.flush()
        return None

    def flush(self) -> Chunk | None:
        """The chunk collected so far (None if it has no records)."""
        first = self.index * self.config.chunk_rows
        if self.row == first:
            return None
        columns = ["source", "row", "text"] + (["text_pair"] if self.config.text_pair_column else []) \
            + (["id"] if self.config.id_column else [])
        frame = pd.DataFrame(self.rows, columns=columns).astype({"row": "int64"})
        chunk = Chunk(self.source, self.index, first, self.row - first, frame, self.rejects)
        self.index += 1
        self.rows, self.rejects = [], []
        return chunk


def _wanted_columns(config: BulkConfig) -> list[str]:
    return [c for c in (config.text_column, config.text_pair_column, config.id_column) if c is not None]


def _check_header(path: Path, columns: list[str], config: BulkConfig) -> None:
    missing = [c for c in _wanted_columns(config) if c not in columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, columns))}); "
                        "set --text-column / --text-pair-column / --id-column")


def _delimited_records(path: Path, config: BulkConfig) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """CSV (quoted fields) or TSV (GLUE style: no quoting) records as dicts, streamed with the csv module.

    Read with ``surrogateescape`` so that a byte that is not UTF-8 rejects its row, not the file."""
    tsv = path.suffix.lower() == ".tsv"
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents: the default limit is 128 KiB per field
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (no header line)") from None
        except csv.Error as error:
            raise DataError(f"{path}: cannot read the header line ({error})") from None
        header = [name.lstrip("\ufeff") if i == 0 else name for i, name in enumerate(header)]
        _check_header(path, header, config)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as error:  # e.g. a NUL byte: the reader cannot go on, so neither can the file
                raise DataError(f"{path}: line {reader.line_num}: {error}") from None
            if not fields:  # a blank line is not a record (as pandas reads it)
                continue
            if len(fields) != len(header):
                yield None, f"has {len(fields)} fields, the header has {len(header)} (missing column or stray delimiter)"
                continue
            yield dict(zip(header, fields)), None


def _jsonl_records(path: Path, config: BulkConfig) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """JSON Lines records, one ``json.loads`` per line: a bad line rejects that line only."""
    with open(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                yield None, f"not UTF-8 text (invalid byte at offset {error.start} of the line)"
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield None, f"not valid JSON ({error.msg} at column {error.colno})"
                continue
            if not isinstance(record, dict):
                yield None, f"not a JSON object ({type(record).__name__})"
                continue
            yield record, None


def _parquet_records(path: Path, config: BulkConfig) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """Parquet rows, read a record batch at a time (only the wanted columns)."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several kinds for a corrupt file
        raise DataError(f"{path}: cannot read as parquet ({error})") from None
    _check_header(path, parquet.schema_arrow.names, config)
    for batch in parquet.iter_batches(batch_size=8192, columns=_wanted_columns(config)):
        yield from ((record, None) for record in batch.to_pylist())


_READERS = {".csv": _delimited_records, ".tsv": _delimited_records, ".jsonl": _jsonl_records,
            ".parquet": _parquet_records}


def check_inputs(files: list[Path], config: BulkConfig) -> None:
    """Fail before any work if a file lacks a wanted column (an error naming the file, not a reject per row)."""
    for path in files:
        if path.suffix.lower() == ".jsonl":
            continue  # JSON Lines have no header: a record without the column is rejected on its own
        next(iter(_READERS[path.suffix.lower()](path, config)), None)


def iter_chunks(path: Path, source: str, config: BulkConfig) -> Iterator[Chunk]:
    """The chunks of one input file, in order; each holds at most ``config.chunk_rows`` records."""
    builder = _ChunkBuilder(source, config)
    for record, reason in _READERS[path.suffix.lower()](path, config):
        chunk = builder.add(record, reason)
        if chunk is not None:
            yield chunk
    last = builder.flush()
    if last is not None:
        yield last


def count_rows(files: list[Path]) -> int | None:
    """Rows of the input when cheap to know (parquet metadata only), else None (the bar then counts up)."""
    total = 0
    for path in files:
        if path.suffix.lower() != ".parquet":
            return None
        total += pq.ParquetFile(path).metadata.num_rows
    return total


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class Predictor:
    """A loaded classifier and its tokenizer (what :func:`predict_frame` needs)."""

    model: Any
    tokenizer: Any
    label_names: tuple[str, ...]
    pad_id: int = 0


def load_predictor(config: BulkConfig, threads: int | None = None) -> Predictor:
    """The model of ``config.checkpoint`` with its knobs (a tuned point's, then ``config.knobs`` over them).

    Uses ``eat.deploy.load_for_inference`` (precision, ONNX backends) when that module is installed; without it
    only ``precision="fp32"``, ``backend="torch"`` (:func:`eat.checkpoints.load_classifier`) are available."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        from .deploy import load_for_inference  # type: ignore[attr-defined]
    except ImportError:
        load_for_inference = None
    if load_for_inference is not None:
        from .checkpoints import CheckpointError

        model = load_for_inference(config.checkpoint, knobs=config.knobs or None, tuned=config.tuned,
                                   precision=config.precision, backend=config.backend, threads=threads,
                                   token_level=False)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise CheckpointError(f"{config.checkpoint}: no tokenizer saved with this checkpoint")
    else:
        if (config.precision, config.backend) != ("fp32", "torch"):
            raise ValueError(f"--precision {config.precision} / --backend {config.backend}: this install has no "
                             "eat.deploy; only fp32 on torch is available")
        model, tokenizer = _load_torch_classifier(config)
    label_names = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    return Predictor(model, tokenizer, label_names, tokenizer.pad_token_id or 0)


def _load_torch_classifier(config: BulkConfig):
    from transformers import AutoTokenizer

    from .checkpoints import CheckpointError, load_classifier, model_folder

    model_dir = model_folder(config.checkpoint)
    knobs: dict[str, Any] = {}
    if config.tuned is not None:
        knobs.update(_tuned_knobs(config.tuned))
    knobs.update(config.knobs)
    raw = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    if any(a.endswith("TokenClassification") for a in raw.get("architectures") or []):
        raise CheckpointError(f"{config.checkpoint}: a token-classification (tagging) checkpoint; large-file "
                              "prediction classifies whole texts (use eat predict TEXT for tagging)")
    model = load_classifier(str(model_dir), knobs=knobs)
    if not (model_dir / "tokenizer_config.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer saved with this checkpoint")
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def _tuned_knobs(path: str) -> dict[str, Any]:
    from .results import read_tuned_knobs

    return read_tuned_knobs(path)


def predict_frame(predictor: Predictor, frame: pd.DataFrame, *, max_length: int, batch_size: int) -> pd.DataFrame:
    """Predictions for one chunk's rows (``text`` [+ ``text_pair``]), in the frame's row order: the frame's
    ``source``, ``row`` (and ``id``) columns plus label, label_id, confidence, probabilities, exit_layer, tokens.

    Rows are tokenized together, sorted by length and run ``batch_size`` at a time (little padding)."""
    import torch

    n = len(frame)
    num_labels = len(predictor.label_names)
    probabilities = np.zeros((n, num_labels), dtype=np.float32)
    exit_layer = np.zeros(n, dtype=np.int16)
    if n:
        pairs = frame["text_pair"].tolist() if "text_pair" in frame.columns else None
        encoded = predictor.tokenizer(frame["text"].tolist(), pairs, truncation=True, max_length=max_length)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids") or [[0] * len(row) for row in ids]
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")  # length-sorted batches: padding only within similar lengths
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                width = int(lengths[rows].max())
                input_ids = torch.full((len(rows), width), predictor.pad_id, dtype=torch.long)  # (b, n)
                token_types = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, r in enumerate(rows):
                    length = int(lengths[r])
                    input_ids[i, :length] = torch.tensor(ids[r])
                    token_types[i, :length] = torch.tensor(types[r])
                    mask[i, :length] = 1
                out = predictor.model(input_ids, mask, token_types)
                probabilities[rows] = out.logits.float().softmax(-1).cpu().numpy()  # (b, C)
                exit_layer[rows] = out.exit_layer.cpu().numpy()
    else:
        lengths = np.zeros(0, dtype=np.int64)
    label_id = probabilities.argmax(-1) if n else np.zeros(0, dtype=np.int64)
    result = frame[[c for c in ("source", "row", "id") if c in frame.columns]].reset_index(drop=True).copy()
    result["label"] = pd.Series([predictor.label_names[i] for i in label_id], dtype="string")
    result["label_id"] = label_id.astype(np.int16)
    result["confidence"] = probabilities[np.arange(n), label_id] if n else np.zeros(0, dtype=np.float32)
    result["probabilities"] = list(probabilities)
    result["exit_layer"] = exit_layer
    result["tokens"] = lengths.astype(np.int32)
    return result


# ------------------------------------------------------------------------------------------------- output


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, value: Any) -> None:
    _atomic_write_bytes(path, json.dumps(value, indent=1).encode("utf-8"))


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _checkpoint_identity(checkpoint: str) -> dict[str, Any]:
    """Path and a hash of the model's config and weight file sizes/times: a retrained run is another model."""
    from .checkpoints import model_folder

    folder = model_folder(checkpoint)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        file = folder / name
        if file.is_file():
            stat = file.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            if name == "config.json":
                digest.update(file.read_bytes())
    return {"path": str(folder.resolve()), "fingerprint": digest.hexdigest()[:16]}


def job_settings(config: BulkConfig, files: list[Path]) -> dict[str, Any]:
    """Everything that decides which rows land in which shard with which prediction (kept in the manifest)."""
    settings = dataclasses.asdict(config)
    settings.pop("strict")  # stopping on a reject or not changes no shard that is written
    settings["checkpoint"] = _checkpoint_identity(config.checkpoint)
    if config.tuned is not None:
        settings["tuned_knobs"] = _tuned_knobs(config.tuned)
    settings["inputs"] = [_file_identity(path) for path in files]
    return settings


def open_output(output: Path, settings: dict[str, Any], label_names: tuple[str, ...]) -> dict[str, Any]:
    """The manifest of ``output``: a new one, or the existing one if it was made with the same settings (a
    resume); another job's output folder raises ValueError naming what differs."""
    manifest_file = output / MANIFEST
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_file}: not valid JSON ({error}); not an eat predict output folder?") from None
        previous = manifest.get("settings", {})
        if previous != json.loads(json.dumps(settings)) or manifest.get("labels") != list(label_names):
            differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(f"--output {output}: holds predictions made with other settings "
                             f"({', '.join(differ) or 'labels'}); use another --output folder (or delete it)")
    else:
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"--output {output}: a folder with other files and no {MANIFEST}; give an empty or "
                             "new folder")
        output.mkdir(parents=True, exist_ok=True)
        manifest = {"version": MANIFEST_VERSION, "settings": settings, "labels": list(label_names), "shards": {},
                    "files": {}, "complete": False}
        _atomic_write_json(manifest_file, manifest)  # first: a job killed from here on is resumable
    (output / "shards").mkdir(exist_ok=True)
    (output / "rejects").mkdir(exist_ok=True)
    return manifest


def write_shard(output: Path, manifest: dict[str, Any], chunk: Chunk, predictions: pd.DataFrame) -> None:
    """Write one chunk's shard and rejects (temporary names, then renamed), then the manifest listing it."""
    table = pa.Table.from_pandas(predictions, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"eat.labels": json.dumps(manifest["labels"]).encode()})
    shard = output / "shards" / f"{chunk.name}.parquet"
    tmp = shard.with_name(shard.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, shard)
    if chunk.rejects:
        lines = "".join(json.dumps(r) + "\n" for r in chunk.rejects)
        _atomic_write_bytes(output / "rejects" / f"{chunk.name}.jsonl", lines.encode("utf-8"))
    manifest["shards"][chunk.name] = {"source": chunk.source, "chunk": chunk.index, "first_row": chunk.first_row,
                                      "records": chunk.records, "rows": len(predictions),
                                      "rejected": len(chunk.rejects)}
    _atomic_write_json(output / MANIFEST, manifest)


def finish_output(output: Path, manifest: dict[str, Any], records: dict[str, int]) -> None:
    """Mark the job complete: records per input file, totals, and every reject gathered in ``rejects.jsonl``."""
    lines = []
    for name in sorted(manifest["shards"]):
        file = output / "rejects" / f"{name}.jsonl"
        if file.is_file():
            lines.append(file.read_text(encoding="utf-8"))
    _atomic_write_bytes(output / "rejects.jsonl", "".join(lines).encode("utf-8"))
    manifest["files"] = records
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"].values())
    manifest["rejected"] = sum(s["rejected"] for s in manifest["shards"].values())
    manifest["complete"] = True
    _atomic_write_json(output / MANIFEST, manifest)


def read_predictions(output: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Every finished shard of an output folder as one frame (sorted by source and row). For outputs larger than
    memory read ``shards/`` with ``pyarrow.dataset`` instead."""
    output = Path(output)
    manifest = json.loads((output / MANIFEST).read_text())
    frames = [pd.read_parquet(output / "shards" / f"{name}.parquet", columns=columns)
              for name in sorted(manifest["shards"])]
    if not frames:
        return pd.DataFrame(columns=columns or ["source", "row"])
    return pd.concat(frames, ignore_index=True).sort_values(["source", "row"], kind="stable").reset_index(drop=True)


def verify_output(output: str | Path) -> dict[str, int]:
    """Check a finished output: every input record of every file is, exactly once, either a predicted row of a
    listed shard or a reject. Returns {file: records}; raises ValueError describing the first violation."""
    output = Path(output)
    manifest = json.loads((output / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise ValueError(f"{output}: the job has not finished (resume it first)")
    seen: dict[str, list[np.ndarray]] = {}
    for name, shard in sorted(manifest["shards"].items()):
        rows = pq.read_table(output / "shards" / f"{name}.parquet", columns=["source", "row"]).to_pandas()
        if len(rows) != shard["rows"]:
            raise ValueError(f"{output}: shard {name} has {len(rows)} rows, its manifest entry says {shard['rows']}")
        if set(rows["source"]) - {shard["source"]}:
            raise ValueError(f"{output}: shard {name} holds rows of another file")
        seen.setdefault(shard["source"], []).append(rows["row"].to_numpy())
        rejects = output / "rejects" / f"{name}.jsonl"
        if rejects.is_file():
            rows = [json.loads(line)["row"] for line in rejects.read_text(encoding="utf-8").splitlines()]
            seen[shard["source"]].append(np.asarray(rows, dtype=np.int64))
    for source, records in manifest["files"].items():
        rows = np.sort(np.concatenate(seen.get(source, [np.zeros(0, dtype=np.int64)])))
        if len(rows) != records or not np.array_equal(rows, np.arange(records)):
            duplicates = int(len(rows) - len(np.unique(rows)))
            raise ValueError(f"{output}: {source} has {records} records but the output holds {len(rows)} rows "
                             f"({duplicates} duplicated); not every row exactly once")
    return dict(manifest["files"])


# ---------------------------------------------------------------------------------------------------- job


ProgressFn = Callable[[dict[str, Any]], None]


def pending_chunks(files: list[Path], config: BulkConfig, manifest: dict[str, Any],
                   records: dict[str, int]) -> Iterator[Chunk]:
    """Chunks of every input file that no finished shard holds yet (finished ones are read and skipped: their
    records still count in ``records``, filled in as files end)."""
    for path, source in zip(files, _source_names(files)):
        count = 0
        for chunk in iter_chunks(path, source, config):
            count += chunk.records
            if chunk.name in manifest["shards"]:
                continue
            yield chunk
        records[source] = count


def predict_files(config: BulkConfig, inputs: str | Path, output: str | Path, *, predictor: Predictor | None = None,
                  threads: int | None = None, progress: ProgressFn | None = None) -> BulkResult:
    """Classify every row of ``inputs`` (a file or folder) into parquet shards under ``output``, resuming a job
    that stopped there. See the module docstring for the layout and the exactly-once rule."""
    config.validate()
    output = Path(output)
    files = input_files(inputs)
    if len(set(_source_names(files))) != len(files):
        raise DataError(f"{inputs}: two input files share a name")
    check_inputs(files, config)
    settings = job_settings(config, files)
    predictor = predictor or load_predictor(config, threads)
    manifest = open_output(output, settings, predictor.label_names)
    total = count_rows(files)
    done_before = sum(s["records"] for s in manifest["shards"].values())
    records: dict[str, int] = {}
    started, rows_now, written = time.perf_counter(), 0, 0
    if progress is not None:
        progress({"rows_done": done_before, "rows_total": total, "rows_per_s": 0.0, "shards": len(manifest["shards"])})
    for chunk in pending_chunks(files, config, manifest, records):
        predictions = predict_frame(predictor, chunk.frame, max_length=config.max_length, batch_size=config.batch_size)
        write_shard(output, manifest, chunk, predictions)
        rows_now += chunk.records
        written += 1
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress({"rows_done": done_before + rows_now, "rows_total": total,
                      "rows_per_s": rows_now / max(elapsed, 1e-9), "shards": len(manifest["shards"])})
    seconds = time.perf_counter() - started
    finish_output(output, manifest, records)
    return BulkResult(str(output), manifest["rows"], manifest["rejected"], len(manifest["shards"]), written, seconds,
                      rows_now / max(seconds, 1e-9))


__all__ = ["BulkConfig", "BulkResult", "Chunk", "Predictor", "SUPPORTED_SUFFIXES", "input_files", "iter_chunks",
           "check_inputs", "count_rows", "load_predictor", "predict_frame", "job_settings", "open_output",
           "write_shard", "finish_output", "pending_chunks", "predict_files", "read_predictions", "verify_output"]
