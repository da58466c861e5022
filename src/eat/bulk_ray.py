"""Large-file prediction on Ray Data: the chunks of :mod:`eat.bulk` classified by a pool of model actors.

The driver reads the input exactly as the local job does (:func:`eat.bulk.pending_chunks`: same chunks, row numbers,
rejects and resume), and hands the readable rows of a window of chunks to Ray Data as one dataset, one block per
chunk. ``map_batches`` runs :class:`ChunkPredictor` actors (``ActorPoolStrategy``: ``actors`` of them, one per CPU
slot by default, or one per GPU with ``gpus_per_actor``) on whole blocks, so each call is the same
:func:`eat.bulk.predict_frame` call on the same rows as the local job: the output is the local job's output. The
driver collects each chunk's rows as they come back and writes its shard and the manifest
(:func:`eat.bulk.write_shard`): the same folder layout, resume and exactly-once check
(:func:`eat.bulk.verify_output`).

Why the driver reads: the row numbers, rejects and chunk boundaries have to be exact, and ``ray.data.read_csv``
fails a whole file on one undecodable byte and numbers no rows; reading runs at hundreds of thousands of rows a
second, the model at hundreds per core, so the actors are the part worth spreading over a cluster. Actors are
started once per window of ``window_chunks`` chunks (a few seconds each; a window is minutes of work at the
default 10,000-row chunks), which bounds the driver's memory to one window.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .bulk import (BulkConfig, BulkResult, Chunk, ProgressFn, check_inputs, count_rows, finish_output, input_files,
                   job_settings, load_predictor, open_output, pending_chunks, predict_frame, write_shard)
from .data import DataError


class ChunkPredictor:
    """A Ray Data actor: loads the model once, then classifies whole chunks (pandas batches) with
    :func:`eat.bulk.predict_frame`."""

    def __init__(self, config: dict[str, Any], threads: int | None = None):
        self.config = BulkConfig(**config)
        self.predictor = load_predictor(self.config, threads)

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Predictions for one block (one chunk's readable rows), in its row order."""
        return predict_frame(self.predictor, frame, max_length=self.config.max_length,
                             batch_size=self.config.batch_size)


def label_names(checkpoint: str) -> tuple[str, ...]:
    """The labels of a checkpoint, read from its config (the driver loads no model)."""
    from .checkpoints import model_folder, read_config_dict

    raw = read_config_dict(str(model_folder(checkpoint)))
    id2label = {int(k): v for k, v in (raw.get("id2label") or {}).items()}
    if not id2label:
        raise DataError(f"{checkpoint}: its config has no id2label")
    return tuple(id2label[i] for i in range(len(id2label)))


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to Ray: ``"local"`` starts one on this machine (loopback, no dashboard, usage stats off),
    ``"auto"`` or an address joins a running cluster; an already initialised Ray is used as it is."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def predict_files_ray(config: BulkConfig, inputs: str | Path, output: str | Path, *, address: str | None = "local",
                      actors: int | None = None, threads: int | None = None, gpus_per_actor: float = 0.0,
                      window_chunks: int | None = None, progress: ProgressFn | None = None) -> BulkResult:
    """:func:`eat.bulk.predict_files` with the model calls on a pool of Ray Data actors.

    actors: pool size (default: the cluster's CPUs divided by ``threads``); threads: torch threads per actor (and
    the CPUs each one reserves); window_chunks: chunks per Ray dataset (default 4 per actor)."""
    import ray
    import ray.data

    config.validate()
    output = Path(output)
    files = input_files(inputs)
    check_inputs(files, config)
    settings = job_settings(config, files)
    manifest = open_output(output, settings, label_names(config.checkpoint))
    init_ray(address)
    threads = threads or 1
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
    window_chunks = window_chunks or 4 * actors
    ray.data.DataContext.get_current().enable_progress_bars = False
    total = count_rows(files)
    done_before = sum(s["records"] for s in manifest["shards"].values())
    records: dict[str, int] = {}
    started, rows_now, written = time.perf_counter(), 0, 0

    def report() -> None:
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress({"rows_done": done_before + rows_now, "rows_total": total,
                      "rows_per_s": rows_now / max(elapsed, 1e-9), "shards": len(manifest["shards"])})

    def run_window(window: list[Chunk]) -> None:
        nonlocal rows_now, written
        todo = {(c.source, c.index): c for c in window if len(c.frame)}
        for chunk in window:
            if not len(chunk.frame):  # every record rejected: nothing for the model
                write_shard(output, manifest, chunk, predict_frame_empty(chunk))
                rows_now, written = rows_now + chunk.records, written + 1
        if not todo:
            report()
            return
        dataset = ray.data.from_pandas([c.frame for c in todo.values()])  # one block per chunk
        dataset = dataset.map_batches(
            ChunkPredictor, batch_size=None, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(todo))),
            fn_constructor_kwargs={"config": _config_dict(config), "threads": threads},
            num_cpus=threads, num_gpus=gpus_per_actor or None)
        parts: dict[tuple[str, int], list[pd.DataFrame]] = {key: [] for key in todo}
        got: dict[tuple[str, int], int] = dict.fromkeys(todo, 0)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            keys = list(zip(batch["source"], batch["row"] // config.chunk_rows))
            for key, rows in batch.groupby(pd.Series(keys, index=batch.index), sort=False):
                parts[key].append(rows)
                got[key] += len(rows)
                chunk = todo[key]
                if got[key] == len(chunk.frame):
                    frame = pd.concat(parts.pop(key)).sort_values("row", kind="stable").reset_index(drop=True)
                    write_shard(output, manifest, chunk, frame)
                    rows_now, written = rows_now + chunk.records, written + 1
                    report()
        if parts:
            missing = ", ".join(todo[key].name for key in parts)
            raise RuntimeError(f"Ray Data returned no or too few rows for chunk(s) {missing}; rerun to resume")

    report()
    window: list[Chunk] = []
    for chunk in pending_chunks(files, config, manifest, records):
        window.append(chunk)
        if len(window) == window_chunks:
            run_window(window)
            window = []
    if window:
        run_window(window)
    seconds = time.perf_counter() - started
    finish_output(output, manifest, records)
    return BulkResult(str(output), manifest["rows"], manifest["rejected"], len(manifest["shards"]), written, seconds,
                      rows_now / max(seconds, 1e-9))


def predict_frame_empty(chunk: Chunk) -> pd.DataFrame:
    """The (empty) predictions of a chunk whose every record was rejected, with the usual columns."""
    columns = [c for c in ("source", "row", "id") if c in chunk.frame.columns]
    frame = chunk.frame[columns].copy()
    for name, dtype in (("label", "string"), ("label_id", "int16"), ("confidence", "float32"),
                        ("probabilities", "object"), ("exit_layer", "int16"), ("tokens", "int32")):
        frame[name] = pd.Series([], dtype=dtype)
    return frame


def _config_dict(config: BulkConfig) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(config)))


__all__ = ["ChunkPredictor", "init_ray", "label_names", "predict_files_ray", "predict_frame_empty"]
