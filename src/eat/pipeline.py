"""The main job, end to end: train (EAT, static, half-depth) -> tune on calibration -> tau sweep from cached heads
-> measure every operating point side by side (ablation grid, baselines, tuned point, sweeps) -> report.

Every stage is resumable: finished trainings are reused, measured points are skipped by configuration hash, and
the report is rebuilt from what is on disk. Checkpoints go under ``runs_dir``; small result files (CSV, JSONL,
JSON, PNG, Markdown) under ``results_dir``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bench import (BenchConfig, OperatingPoint, ablation_points, bench_config_from_preset, measure_points, save_json,
                    sweep_points, tau_sweep, tune)
from .checkpoints import load_classifier
from .data import encode, load_glue, task_spec
from .report import build_report
from .results import ResultsLog
from .training import TrainConfig, train, train_config_from_preset

RUN_TASKS = ("sst2", "qqp", "mnli")
# accuracy points the tuned point may lose against the same checkpoint with everything off (calibration split)
RUN_MAX_DROP = {"smoke": 5.0, "demo": 0.5, "paper": 0.5}


def _log(message: str, log: Callable[[str], None] | None) -> None:
    if log is not None:
        log(message)


def _train_variant(config: TrainConfig, folder: Path, log) -> Path:
    if (folder / "train_summary.json").is_file():
        _log(f"{folder}: trained already, reusing", log)
    else:
        _log(f"training {config.variant} on {config.task} into {folder}", log)
        result = train(config, folder)
        _log(f"{config.variant}: dev accuracy {result.dev_accuracy} in {result.seconds / 60:.1f} min", log)
    return folder / "model"


def run_task(task: str, preset: str, runs_dir: Path, results_dir: Path, *, device: str = "cpu",
             train_overrides: dict[str, Any] | None = None, bench_overrides: dict[str, Any] | None = None,
             log: Callable[[str], None] | None = None, progress=None, max_drop: float | None = None) -> dict[str, Any]:
    """The whole main job for one task. Returns the tuned point and where the report is.

    max_drop: accuracy points the tuned point may lose on the calibration split (default: the preset's)."""
    max_drop = RUN_MAX_DROP[preset] if max_drop is None else max_drop
    spec = task_spec(task)
    train_overrides = dict(train_overrides or {})
    models = {}
    for variant in ("eat", "static", "half"):
        config = train_config_from_preset(preset, task=task, variant=variant, **train_overrides)
        models[variant] = _train_variant(config, runs_dir / task / variant, log)
    eat_config = train_config_from_preset(preset, task=task, variant="eat", **train_overrides)
    results_dir.mkdir(parents=True, exist_ok=True)
    bench = bench_config_from_preset(preset, task=task, device=device, max_length=eat_config.max_length,
                                     **(bench_overrides or {}))
    save_json(results_dir / f"bench_config_{task}.json", dataclasses.asdict(bench))
    save_json(results_dir / f"train_config_{task}.json", dataclasses.asdict(eat_config))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models["eat"]))
    pad_id = tokenizer.pad_token_id or 0

    # --- operating point on the calibration split (held out of training: same seed and size as training used)
    from .training import training_data

    _, calibration, _ = training_data(eat_config)
    tuned_file = results_dir / f"tuned_{task}.json"
    if tuned_file.is_file():
        tuned = json.loads(tuned_file.read_text())
        _log(f"tuned point for {task} reused: {tuned['knobs']}", log)
    else:
        _log(f"tuning {task} on {len(calibration)} calibration rows (max drop {max_drop})", log)
        result = tune(str(models["eat"]), encode(calibration, tokenizer, eat_config.max_length),
                      max_drop=max_drop, device=device, pad_id=pad_id, tau_grid=bench.tau_grid,
                      timing_rows=min(150, len(calibration)))
        tuned = dataclasses.asdict(result)
        save_json(tuned_file, tuned)
        _log(f"tuned {task}: {result.knobs} ({result.criterion})", log)

    log_file = ResultsLog(results_dir)
    for split in spec.eval_splits:
        dev = load_glue(task, split).subset(bench.rows, seed=bench.seed)
        encoded = encode(dev, tokenizer, eat_config.max_length)
        split_bench = dataclasses.replace(bench, split=split)
        sweep_name = task if len(spec.eval_splits) == 1 else f"{task}:{split}"  # the report's series name
        sweep_file = results_dir / f"tau_sweep_{sweep_name.replace(':', '_')}.csv"
        if not sweep_file.is_file():
            import pandas as pd

            model = load_classifier(str(models["eat"]), knobs={"exit_layers": "all"})
            rows = tau_sweep(model, encoded, bench.tau_grid, device=device, pad_id=pad_id, f1=spec.f1)
            from .results import atomic_write_text

            atomic_write_text(sweep_file, pd.DataFrame(rows).to_csv(index=False))
        points = ablation_points(str(models["eat"]), split_bench, static_checkpoint=str(models["static"]),
                                 half_checkpoint=str(models["half"]), tau=tuned["knobs"]["exit_threshold"],
                                 keep=tuned["knobs"]["keep_ratio"], policy=tuned["knobs"].get("exit_policy"),
                                 patience=tuned["knobs"].get("exit_patience"))
        points.append(OperatingPoint("eat:tuned", str(models["eat"]), tuned["knobs"], "tuned"))
        points += sweep_points(str(models["eat"]), split_bench)
        _log(f"measuring {len(points)} operating points on {task} {split} ({len(encoded)} rows)", log)
        measure_points(points, encoded, split_bench, log_file, dataset_source=f"{dev.source} {dev.note}".strip(),
                       f1=spec.f1, pad_id=pad_id, examples_dir=results_dir / "examples",
                       extra={"preset": preset}, progress=progress)
    report = build_report(results_dir)
    return {"task": task, "tuned": tuned["knobs"], "report": str(report)}


def summary_lines(results_dir: Path, task: str) -> list[str]:
    """One line per key point: accuracy and batch-1 latency of static, half-depth and tuned EAT."""
    rows = [r for r in ResultsLog(results_dir).rows() if r["task"] == task]
    lines = []
    for name in ("static", "half-depth", "eat:none", "eat:tuned"):
        for row in [r for r in rows if r["point"] == name]:
            lines.append(f"{task} {row['split']} {name:<11} accuracy {row['accuracy']:.2f}%  batch-1 p50 "
                         f"{row['b1_p50_ms']:.2f} ms  {row['throughput_rows_per_s']:.0f} rows/s at batch "
                         f"{row['batch_size_throughput']}  mean exit layer {row['mean_exit_layer']:.2f}")
    return lines


__all__ = ["run_task", "summary_lines", "RUN_TASKS", "BenchConfig"]
