"""The main job, end to end: train (static, EAT, half-depth) -> tune on calibration -> tau sweep from cached heads
-> measure every operating point side by side (ablation grid, baselines, tuned point, sweeps) -> report.

Recipes for the EAT model (``RunConfig.recipe``):

- ``two-stage`` (default): fine-tune the static model, then fit mean-pooled exit heads on it with the backbone
  frozen (minutes). With exits off the EAT model *is* the static model, so every speedup is measured against the
  very model whose accuracy it keeps. This is the recipe behind the README's met batch-1 and batch-32 targets.
- ``joint``: train EAT from the backbone with the joint multi-exit loss (`[CLS]` exit heads), as the published
  EAT does; its final layer may end up below the static model.

SST-2 holds out whole calibration *sentences* (and their phrases): its training rows are parse-tree phrases and
its dev set is whole sentences, so a slice of random phrases is easier than dev and tunes thresholds too low.

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

from .bench import (TAU_GRID, BenchConfig, OperatingPoint, ablation_points, bench_config_from_preset, measure_points,
                    regression_tau_grid, save_json, sweep_points, tau_sweep, tune)
from .checkpoints import load_classifier
from .configuration_eat import REGRESSION_EXIT_POLICIES
from .data import encode, load_glue, load_table
from .presets import get_preset
from .report import build_report
from .deploy.peers import PEERS
from .results import (B1_P50_MS, EXITS_OFF, HALF_DEPTH, STATIC, THROUGHPUT, THROUGHPUT_SORTED, TUNED, ResultsLog,
                      bench_config_file, row_metric, run_config_file, series_name, train_config_file, tuned_file)
from .results import sweep_file as results_sweep_file
from .tasks import SEQUENCE_TASKS, Task
from .training import TrainConfig, config_task, train, train_config_from_preset

# every sentence-level task of the registry (GLUE); `eat run --task all` runs the three headline tasks and
# `--task glue` every one of them; a user's own table runs with --data-file / --eval-file
RUN_TASKS = SEQUENCE_TASKS
HEADLINE_TASKS = ("sst2", "qqp", "mnli")
# the fields of a user's own table (RunConfig), passed on to every training config
USER_DATA_FIELDS = ("data_file", "eval_file", "text_column", "text_pair_column", "label_column", "label_kind", "metric")
RUN_RECIPES = ("two-stage", "joint")
# the second stage of the two-stage recipe: exit heads that read the mean of the real tokens, fitted on features
# of the frozen static model (an epoch is a few matrix products, so five of them cost about a minute); on sentence
# pairs (QQP, MNLI) they read each segment's mean and their comparison instead (PAIR_POOLING; README, "pair heads")
HEAD_STAGE = dict(exit_pooling="mean", freeze_backbone=True, epochs=5.0, learning_rate=1e-3)
PAIR_POOLING = "pair"
# per-task training settings of the main job (both recipes, all three models: they hold out the same slice)
TASK_TRAINING = {"sst2": dict(calibration_unit="sentence")}
# settings that may differ between a finished run and the one asked for without changing the model it produces
_RESUME_IGNORED = ("checkpoint_every",)


@dataclasses.dataclass
class RunConfig:
    """How the main job builds and tunes one task; saved as ``run_config_<task>.json`` beside the results."""

    task: str
    preset: str
    recipe: str = "two-stage"
    max_drop: float | None = None  # None: the preset's (eat.presets.Preset.max_drop)
    certify: float | None = None  # e.g. 0.9: the tuner certifies the drop (see `eat tune --certify`)
    # a user's own table instead of a registered task (``task`` then only names it)
    data_file: str | None = None
    eval_file: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_kind: str = "classes"
    metric: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.data_file is None and self.task not in RUN_TASKS:
            raise ValueError(f"unknown task {self.task!r}; use {', '.join(RUN_TASKS)}, all, glue, or --data-file "
                             "with --eval-file for your own table")
        if self.data_file is not None and self.eval_file is None:
            raise ValueError("--eval-file is required with --data-file (the dev rows every point is measured on)")
        if self.recipe not in RUN_RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; recipes: {', '.join(RUN_RECIPES)}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"max_drop: must be >= 0, got {self.max_drop}")
        if self.certify is not None and not 0.0 < self.certify < 1.0:
            raise ValueError(f"certify: a confidence strictly between 0 and 1, got {self.certify}")


def tuner_grid(bench: BenchConfig, certify: float | None) -> list[float] | None:
    """The thresholds the main job's tuner walks: None (the tuner's own grid: finer when certifying, from just above
    chance for three or more classes) unless the bench config names a grid of its own (e.g. the smoke preset's)."""
    return None if certify or bench.tau_grid == list(TAU_GRID) else list(bench.tau_grid)


def _log(message: str, log: Callable[[str], None] | None) -> None:
    if log is not None:
        log(message)


def _train_variant(config: TrainConfig, folder: Path, log) -> Path:
    """Train ``config`` into ``folder``, or reuse the finished run there if it was trained with the same settings
    (a run made with other settings, e.g. by the other recipe, is an error: it is never silently mixed in)."""
    if (folder / "train_summary.json").is_file():
        saved_file = folder / "train_config.json"
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
        wanted = json.loads(json.dumps(dataclasses.asdict(config)))  # lists as JSON has them
        differ = [f"{name}: {saved[name]!r} there, {value!r} now" for name, value in wanted.items()
                  if name in saved and name not in _RESUME_IGNORED and saved[name] != value]
        if differ:
            raise ValueError(f"{folder} holds a finished run trained with other settings ({'; '.join(differ)}); "
                             "use another --runs folder or remove that run")
        _log(f"{folder}: trained already, reusing", log)
    else:
        _log(f"training {config.variant} on {config.task} into {folder}", log)
        result = train(config, folder)
        _log(f"{config.variant}: dev {result.dev_metric} {result.dev_accuracy} in {result.seconds / 60:.1f} min", log)
    return folder / "model"


def run_saved_fields(run: RunConfig) -> dict[str, Any]:
    """The fields of ``run`` as ``run_config_<task>.json`` holds them: a user-data field is left out while it has
    its default, so results folders written before those fields existed still resume (and compare equal)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    return {name: value for name, value in dataclasses.asdict(run).items()
            if name not in USER_DATA_FIELDS or value != defaults[name]}


def run_task_of(run: RunConfig) -> Task:
    """The :class:`~eat.tasks.Task` of a run: the registered one, or the user's table as its flags describe it."""
    return config_task(train_config_from_preset(run.preset, task=run.task,
                                                **{name: getattr(run, name) for name in USER_DATA_FIELDS}))


def training_configs(run: RunConfig, runs_dir: Path, train_overrides: dict[str, Any] | None = None
                     ) -> dict[str, TrainConfig]:
    """The training settings of the three models of a run ({"static", "eat", "half"}, in training order).
    ``train_overrides`` (e.g. epochs, train_limit) apply to the models fine-tuned from the backbone; the
    two-stage head fitting keeps its own epochs and learning rate."""
    user = {name: getattr(run, name) for name in USER_DATA_FIELDS} if run.data_file is not None else {}
    base = {**({} if user else TASK_TRAINING.get(run.task, {})), **user, **(train_overrides or {})}
    pooling = PAIR_POOLING if run_task_of(run).is_pair else HEAD_STAGE["exit_pooling"]
    stage = ({"eat": {**HEAD_STAGE, "exit_pooling": pooling, "init_from": str(runs_dir / run.task / "static")}}
             if run.recipe == "two-stage" else {})
    return {variant: train_config_from_preset(run.preset, task=run.task, variant=variant,
                                              **{**base, **stage.get(variant, {})})
            for variant in ("static", "eat", "half")}


def run_task(task: str, preset: str, runs_dir: Path, results_dir: Path, *, device: str = "cpu",
             train_overrides: dict[str, Any] | None = None, bench_overrides: dict[str, Any] | None = None,
             log: Callable[[str], None] | None = None, progress=None, max_drop: float | None = None,
             recipe: str = "two-stage", certify: float | None = None,
             user_data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole main job for one task. Returns the tuned point and where the report is.

    ``user_data``: a user's own table instead of a registered task (``task`` names it): ``data_file``,
    ``eval_file``, ``text_column``, ``text_pair_column``, ``label_column``, ``label_kind`` ("classes" or
    "regression") and ``metric`` (the first one primary), as :class:`RunConfig` holds them.

    max_drop: accuracy points the tuned point may lose against the static model on the calibration split
    (default: the preset's). recipe: ``two-stage`` or ``joint`` (module docstring). certify: a confidence (e.g. 0.9)
    at which the tuner must certify that drop instead of meeting it on the calibration rows alone."""
    run = RunConfig(task, preset, recipe, max_drop, certify, **(user_data or {}))
    run.validate()
    max_drop = get_preset(preset).max_drop if max_drop is None else max_drop
    spec = run_task_of(run)
    results_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_config_file(results_dir, task)
    if run_file.is_file() and json.loads(run_file.read_text()) != run_saved_fields(run):
        raise ValueError(f"{results_dir} holds results of another run of {task} ({run_file.read_text().strip()}); "
                         "use another --results folder")
    configs = training_configs(run, runs_dir, train_overrides)
    models = {variant: _train_variant(config, runs_dir / task / variant, log) for variant, config in configs.items()}
    eat_config = configs["eat"]
    save_json(run_file, run_saved_fields(run))
    # the calibration slice (held out of training: same seed and size as training used) and the dev sets
    from .training import training_data

    _, calibration, _ = training_data(eat_config)
    task_bench = regression_bench(calibration.frame["label"].to_numpy()) if spec.is_regression else {}
    bench = bench_config_from_preset(preset, task=task, device=device, max_length=eat_config.max_length,
                                     **{**task_bench, **(bench_overrides or {})})
    save_json(bench_config_file(results_dir, task), dataclasses.asdict(bench))
    save_json(train_config_file(results_dir, task), dataclasses.asdict(eat_config))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models["eat"]))
    pad_id = tokenizer.pad_token_id or 0

    # --- operating point on the calibration split
    tuned_path = tuned_file(results_dir, task)
    if tuned_path.is_file():
        tuned = json.loads(tuned_path.read_text())
        _log(f"tuned point for {task} reused: {tuned['knobs']}", log)
    else:
        _log(f"tuning {task} on {len(calibration)} calibration rows (max drop {max_drop} against static"
             + (f", certified at {certify:.0%})" if certify else ")"), log)
        result = tune(str(models["eat"]), encode(calibration, tokenizer, eat_config.max_length),
                      max_drop=max_drop, device=device, pad_id=pad_id,
                      tau_grid=tuner_grid(bench, certify),
                      timing_rows=min(150, len(calibration)), reference_checkpoint=str(models["static"]),
                      certify=certify, task=spec)
        tuned = dataclasses.asdict(result)
        save_json(tuned_path, tuned)
        _log(f"tuned {task}: {result.knobs} ({result.criterion})", log)

    log_file = ResultsLog(results_dir)
    for split in spec.eval_splits:
        dev = _dev_split(run, spec, split, calibration.label_names).subset(bench.rows, seed=bench.seed)
        encoded = encode(dev, tokenizer, eat_config.max_length)
        split_bench = dataclasses.replace(bench, split=split)
        sweep_file = results_sweep_file(results_dir, series_name(task, split, len(spec.eval_splits)))
        if not sweep_file.is_file():
            import pandas as pd

            model = load_classifier(str(models["eat"]), knobs={"exit_layers": "all"})
            rows = tau_sweep(model, encoded, bench.tau_grid, device=device, pad_id=pad_id, task=spec,
                             **_sweep_rule(spec, tuned["knobs"], bench))
            from .results import atomic_write_text

            atomic_write_text(sweep_file, pd.DataFrame(rows).to_csv(index=False))
        points = ablation_points(str(models["eat"]), split_bench, static_checkpoint=str(models["static"]),
                                 half_checkpoint=str(models["half"]), tau=tuned["knobs"]["exit_threshold"],
                                 keep=tuned["knobs"]["keep_ratio"], policy=tuned["knobs"].get("exit_policy"),
                                 patience=tuned["knobs"].get("exit_patience"))
        points.append(OperatingPoint(TUNED, str(models["eat"]), tuned["knobs"], "tuned"))
        points += sweep_points(str(models["eat"]), split_bench)
        points += _peer_points(points, log)
        _log(f"measuring {len(points)} operating points on {task} {split} ({len(encoded)} rows)", log)
        measure_points(points, encoded, split_bench, log_file, dataset_source=f"{dev.source} {dev.note}".strip(),
                       f1=spec.f1, pad_id=pad_id, examples_dir=results_dir / "examples", task=spec,
                       extra={"preset": preset}, progress=progress)
    report = build_report(results_dir)
    return {"task": task, "tuned": tuned["knobs"], "report": str(report)}


def regression_bench(labels) -> dict[str, Any]:
    """Bench settings of a regression task: its exit rule (PABEE's "delta") and thresholds in the label's units
    (:func:`~eat.bench.regression_tau_grid` of the calibration labels) for the sweep, the ablation's exit rows
    (the grid's middle) and the timed sweep points (a quarter, half and three quarters along it)."""
    grid = regression_tau_grid(labels)
    return {"exit_policy": "delta", "tau": grid[len(grid) // 2], "tau_grid": grid,
            "tau_latency_points": [grid[len(grid) // 4], grid[len(grid) // 2], grid[3 * len(grid) // 4]]}


def _sweep_rule(spec: Task, tuned_knobs: dict[str, Any], bench: BenchConfig) -> dict[str, Any]:
    """The exit rule the threshold sweep replays: the tuned rule for regression (delta or spread, its patience),
    else the bench's (confidence)."""
    if not spec.is_regression:
        return {}
    policy = tuned_knobs.get("exit_policy")
    if policy in REGRESSION_EXIT_POLICIES:
        return {"policy": policy, "patience": int(tuned_knobs.get("exit_patience", 2))}
    return {"policy": bench.exit_policy, "patience": 2}


def _dev_split(run: RunConfig, spec: Task, split: str, label_names: tuple[str, ...]):
    """A dev split of the run's task: GLUE's, or the user's ``eval_file`` (with the training labels' names)."""
    if run.data_file is None:
        return load_glue(run.task, split)
    return load_table(run.eval_file, run.text_column, run.text_pair_column, run.label_column,
                      label_names=None if spec.is_regression else label_names, label_kind=run.label_kind)


def _peer_points(points: list[OperatingPoint], log) -> list[OperatingPoint]:
    """The static model and the tuned point also as a CPU user would deploy them (PyTorch int8, ONNX Runtime fp32
    and int8; :mod:`eat.deploy.peers`), timed in the same interleaved run; peers this machine cannot run are
    left out with a logged note."""
    from .deploy.peers import DEFAULT_PEERS, available_peers, peer_points

    names, notes = available_peers(DEFAULT_PEERS, explicit=False)
    new, more = peer_points(points, names)
    for note in notes + more:
        _log(f"note: {note}", log)
    return new


def summary_lines(results_dir: Path, task: str) -> list[str]:
    """One line per key point: accuracy and batch-1 latency of static, half-depth and tuned EAT."""
    rows = [r for r in ResultsLog(results_dir).rows() if r["task"] == task]
    lines = []
    for name in (STATIC, *(f"{STATIC}:{peer}" for peer in PEERS), HALF_DEPTH, EXITS_OFF, TUNED,
                 *(f"{TUNED}:{peer}" for peer in PEERS)):
        for row in [r for r in rows if r["point"] == name]:
            metric, value = row_metric(row)
            lines.append(f"{task} {row['split']} {name:<20} {metric} {value:.2f}%  batch-1 p50 "
                         f"{row[B1_P50_MS]:.2f} ms  {row[THROUGHPUT]:.0f} rows/s at batch "
                         f"{row['batch_size_throughput']}{_sorted_rate(row)}  mean exit layer "
                         f"{row['mean_exit_layer']:.2f}")
    return lines


def _sorted_rate(row: dict) -> str:
    """" (N sorted)": the row's throughput on length-sorted batches, when it was measured."""
    rate = row.get(THROUGHPUT_SORTED)
    return "" if rate is None else f" ({rate:.0f} sorted)"


__all__ = ["run_task", "summary_lines", "training_configs", "RunConfig", "RUN_TASKS", "HEADLINE_TASKS", "run_task_of",
           "regression_bench", "RUN_RECIPES", "HEAD_STAGE",
           "PAIR_POOLING", "BenchConfig"]
