"""The main job, end to end: train (static, EAT, half-depth) -> tune on calibration -> tau sweep from cached heads
-> measure every operating point side by side (ablation grid, baselines, tuned point, sweeps) -> report.

Recipes for the EAT model (``RunConfig.recipe``):

- ``two-stage`` (default): fine-tune the static model, then fit mean-pooled exit heads on it with the backbone
  frozen (minutes). With exits off the EAT model *is* the static model, so every speedup is measured against the
  very model whose accuracy it keeps. This is the recipe behind the README's met batch-1 and batch-32 targets.
- ``joint``: train EAT from the backbone with the joint multi-exit loss (`[CLS]` exit heads), as the published
  EAT does; its final layer may end up below the static model.
- ``refit``: three stages: fine-tune the static model; train EAT from it with the backbone unfrozen (the joint
  loss with uniform weights, every head distilled from the static model, the segment-comparing heads of pairs)
  so that the middle layers learn to answer; then fit cheap mean-pooled heads on that backbone frozen. The
  backbone moves, so EAT with exits off is no longer the static model (both are measured); the recipe behind
  STS-B's met G2 (docs/tasks.md), where the frozen static model's layer-3 head was too weak.

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
from .presets import get_preset
from .report import build_report
from .deploy.peers import PEERS
from .results import (B1_P50_MS, EXITS_OFF, HALF_DEPTH, STATIC, THROUGHPUT, THROUGHPUT_SORTED, TUNED, ResultsLog,
                      batch_tuned_files, bench_config_file, row_metric, run_config_file, series_name,
                      train_config_file, tuned_file, tuned_point_name)
from .runners import TuneOutcome, TuneRequest
from .results import sweep_file as results_sweep_file
from .tasks import SEQUENCE_TASKS, Task
from .training import TrainConfig, config_task, train, train_config_from_preset

# every sentence-level task of the registry (GLUE); `eat run --task all` runs the three headline tasks and
# `--task glue` every one of them; a user's own table runs with --data-file / --eval-file
RUN_TASKS = SEQUENCE_TASKS
HEADLINE_TASKS = ("sst2", "qqp", "mnli")
# the fields of a user's own table (RunConfig), passed on to every training config
USER_DATA_FIELDS = ("data_file", "eval_file", "text_column", "text_pair_column", "label_column", "label_kind", "metric")
RUN_RECIPES = ("two-stage", "joint", "refit")
# the second stage of the two-stage recipe: exit heads that read the mean of the real tokens, fitted on features
# of the frozen static model (an epoch is a few matrix products, so five of them cost about a minute); on sentence
# pairs (QQP, MNLI) they read each segment's mean and their comparison instead (PAIR_POOLING; README, "pair heads")
HEAD_STAGE = dict(exit_pooling="mean", freeze_backbone=True, epochs=5.0, learning_rate=1e-3)
PAIR_POOLING = "pair"
# the middle stage of the refit recipe (the model folder "eat-joint"): EAT from the static run with its backbone
# unfrozen, every head's loss weighted alike and distilled from the static model (the teacher keeps the target
# fixed while the backbone moves); the heads here are trained to shape the backbone, the refit stage replaces them
JOINT_STAGE = dict(freeze_backbone=False, epochs=3.0, learning_rate=3e-5, head_learning_rate=1e-3,
                   exit_loss_weights="uniform")
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


def _train_variant(config: TrainConfig, folder: Path, log, progress=None) -> Path:
    """Train ``config`` into ``folder``, or reuse the finished run there if it was trained with the same settings
    (a run made with other settings, e.g. by the other recipe, is an error: it is never silently mixed in).
    progress: the main job's ``(label, done, total)`` callback, told every training step."""
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
        label = f"train {config.task} {config.variant}"
        step_progress = None if progress is None else (lambda p: progress(label, p["step"], p["total"]))
        result = train(config, folder, progress=step_progress)
        _log(f"{config.variant}: dev {result.dev_metric} {result.dev_accuracy} in {result.seconds / 60:.1f} min", log)
    return folder / "model"


def run_task_names(task: str | None, own_table: bool = False) -> tuple[str, ...]:
    """The tasks `eat run --task` names: one GLUE task, "all" (HEADLINE_TASKS), "glue" (RUN_TASKS); default sst2.
    With a user's table (``own_table``) the one name the user gave it (default "custom"), never a GLUE one."""
    if own_table:
        if task in ("all", "glue") or task in RUN_TASKS:
            raise ValueError(f"--task {task}: with --data-file, name your own task (e.g. --task mypairs), not a GLUE one")
        return (task or "custom",)
    task = task or "sst2"
    tasks = HEADLINE_TASKS if task == "all" else RUN_TASKS if task == "glue" else (task,)
    for name in tasks:
        if name not in RUN_TASKS:
            raise ValueError(f"unknown task {name!r}; use {', '.join(RUN_TASKS)}, all or glue (or --data-file)")
    return tasks


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
    head fitting and the refit recipe's joint stage (folder "eat-joint", trained between static and eat) keep
    their own epochs and learning rates."""
    user = {name: getattr(run, name) for name in USER_DATA_FIELDS} if run.data_file is not None else {}
    base = {**({} if user else TASK_TRAINING.get(run.task, {})), **user, **(train_overrides or {})}
    pooling = PAIR_POOLING if run_task_of(run).is_pair else HEAD_STAGE["exit_pooling"]
    static = str(runs_dir / run.task / "static")
    stage: dict[str, dict[str, Any]] = {}
    if run.recipe == "two-stage":
        stage = {"eat": {**HEAD_STAGE, "exit_pooling": pooling, "init_from": static}}
    elif run.recipe == "refit":  # folder name -> settings; "eat-joint" trains between static and eat
        stage = {"eat-joint": {**JOINT_STAGE, "variant": "eat", "exit_pooling": pooling, "init_from": static,
                               "teacher": static},
                 "eat": {**HEAD_STAGE, "init_from": str(runs_dir / run.task / "eat-joint")}}
    folders = ("static", "eat-joint", "eat", "half") if run.recipe == "refit" else ("static", "eat", "half")
    return {folder: train_config_from_preset(run.preset, task=run.task,
                                             **{"variant": folder, **base, **stage.get(folder, {})})
            for folder in folders}


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
    spec = run_task_of(run)
    results_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_config_file(results_dir, task)
    if run_file.is_file() and json.loads(run_file.read_text()) != run_saved_fields(run):
        raise ValueError(f"{results_dir} holds results of another run of {task} ({run_file.read_text().strip()}); "
                         "use another --results folder")
    configs = training_configs(run, runs_dir, train_overrides)
    models = {variant: str(_train_variant(config, runs_dir / task / variant, log, progress))
              for variant, config in configs.items()}
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

    tokenizer = AutoTokenizer.from_pretrained(models["eat"])
    tuned = _main_job_point(run, spec, models, calibration, tokenizer, bench, eat_config.max_length, results_dir, log)
    runner = spec.runner()
    for split in spec.eval_splits:
        dev = runner.load_split(split, eval_file=run.eval_file if run.data_file is not None else None,
                                label_names=calibration.label_names).subset(bench.rows, seed=bench.seed)
        encoded = runner.encode(dev, tokenizer, eat_config.max_length)
        split_bench = dataclasses.replace(bench, split=split)
        _write_sweep(results_sweep_file(results_dir, series_name(task, split, len(spec.eval_splits))), models["eat"],
                     encoded, spec, tuned["knobs"], bench, device, tokenizer.pad_token_id or 0)
        points = comparison_points(models["eat"], split_bench, static=models["static"], half=models["half"],
                                   tuned={TUNED: tuned["knobs"]}) + sweep_points(models["eat"], split_bench)
        points += peer_points_for(points, None, lambda note: _log(f"note: {note}", log))
        _log(f"measuring {len(points)} operating points on {task} {split} ({len(encoded)} rows)", log)
        measure_points(points, encoded, split_bench, ResultsLog(results_dir),
                       dataset_source=f"{dev.source} {dev.note}".strip(), f1=spec.f1,
                       pad_id=tokenizer.pad_token_id or 0, examples_dir=results_dir / "examples", task=spec,
                       extra={"preset": preset}, progress=progress)
    report = build_report(results_dir)
    return {"task": task, "tuned": tuned["knobs"], "report": str(report)}


def _main_job_point(run: RunConfig, spec: Task, models: dict[str, str], calibration, tokenizer, bench: BenchConfig,
                    max_length: int, results_dir: Path, log) -> dict[str, Any]:
    """The main job's operating point (what ``tuned_<task>.json`` holds): reused when saved, else chosen on the
    calibration split against the static model (the drop the preset allows, or ``run.max_drop``) and saved."""
    path = tuned_file(results_dir, run.task)
    if path.is_file():
        tuned = json.loads(path.read_text())
        _log(f"tuned point for {run.task} reused: {tuned['knobs']}", log)
        return tuned
    max_drop = get_preset(run.preset).max_drop if run.max_drop is None else run.max_drop
    _log(f"tuning {run.task} on {len(calibration)} calibration rows (max drop {max_drop} against static"
         + (f", certified at {run.certify:.0%})" if run.certify else ")"), log)
    result = tune(models["eat"], spec.runner().encode(calibration, tokenizer, max_length), max_drop=max_drop,
                  device=bench.device, pad_id=tokenizer.pad_token_id or 0, tau_grid=tuner_grid(bench, run.certify),
                  timing_rows=min(150, len(calibration)), reference_checkpoint=models["static"],
                  certify=run.certify, task=spec)
    tuned = dataclasses.asdict(result)
    save_json(path, tuned)
    _log(f"tuned {run.task}: {result.knobs} ({result.criterion})", log)
    return tuned


def _write_sweep(path: Path, eat_checkpoint: str, encoded, spec: Task, tuned_knobs: dict[str, Any],
                 bench: BenchConfig, device: str, pad_id: int) -> None:
    """The threshold sweep of one dev split from one cached pass (every head), unless it is on disk already."""
    if path.is_file():
        return
    import pandas as pd

    from .results import atomic_write_text

    model = load_classifier(eat_checkpoint, knobs={"exit_layers": "all"})
    rows = tau_sweep(model, encoded, bench.tau_grid, device=device, pad_id=pad_id, task=spec,
                     **_sweep_rule(spec, tuned_knobs, bench))
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


# --------------------------------------------------------------------------------------------- the points


# the short table (`eat bench --points tuned`): the baselines, exits off, the exit and prune+exit rows
SHORT_TABLE = (STATIC, HALF_DEPTH, EXITS_OFF, "eat:exit", "eat:prune+exit")


def tuned_rule(knobs: dict[str, Any]) -> dict[str, Any]:
    """A tuned point's exit rule and keep schedule as :func:`~eat.bench.ablation_points` takes them (its exit and
    prune rows then use the rule that was tuned)."""
    return {"tau": knobs["exit_threshold"], "keep": knobs.get("keep_ratio"), "policy": knobs.get("exit_policy"),
            "patience": knobs.get("exit_patience")}


def comparison_points(eat_checkpoint: str, bench: BenchConfig, *, static: str | None = None, half: str | None = None,
                      tuned: dict[str, dict[str, Any]] | None = None, short: bool = False) -> list[OperatingPoint]:
    """The points every comparison table holds: the ablation grid (``short``: only :data:`SHORT_TABLE`) on the
    rule of the batch-1 tuned point when there is one, the baselines, and the tuned points (``tuned``: name ->
    knobs, e.g. ``{TUNED: ..., "eat:tuned-b32": ...}``), all timed in one run."""
    tuned = tuned or {}
    grid = ablation_points(eat_checkpoint, bench, static_checkpoint=static, half_checkpoint=half,
                           **(tuned_rule(tuned[TUNED]) if TUNED in tuned else {}))
    if short:
        grid = [point for point in grid if point.name in SHORT_TABLE]
    return grid + [OperatingPoint(name, eat_checkpoint, knobs, "tuned") for name, knobs in tuned.items()]


def saved_tuned_points(results_dir: Path, task: str, precision: str = "fp32",
                       backend: str = "torch") -> dict[str, dict[str, Any]]:
    """name -> knobs of the points `eat tune` saved for ``task`` in ``results_dir`` at ``precision`` on ``backend``
    (batch 1 first, then each batch size)."""
    points = {}
    if tuned_file(results_dir, task, 1, precision, backend).is_file():
        points[TUNED] = json.loads(tuned_file(results_dir, task, 1, precision, backend).read_text())["knobs"]
    for size, path in batch_tuned_files(results_dir, task, precision, backend).items():
        points[tuned_point_name(size)] = json.loads(path.read_text())["knobs"]
    return points


def peer_tuned_points(results_dir: Path, task: str) -> dict[str, dict[str, dict[str, Any]]]:
    """peer name -> {tuned point: knobs} that peer runs instead of the fp32 tuner's knobs: the points a tuner saved
    for the peer's own backend and precision (`eat tune --backend onnxruntime --precision int8`), else, for an
    ONNX Runtime int8 peer, those the PyTorch int8 tuner saved (:func:`~eat.deploy.peers.peer_points`)."""
    from .deploy.peers import PEERS

    chosen = {}
    for peer, (backend, precision) in PEERS.items():
        points = {}
        if backend != "torch" and precision != "fp32":
            points.update(saved_tuned_points(results_dir, task, precision, "torch"))
        if (backend, precision) != ("torch", "fp32"):
            points.update(saved_tuned_points(results_dir, task, precision, backend))
        chosen[peer] = points
    return chosen


def everything_off() -> dict[str, Any]:
    """The knobs of the exits-off row `eat tune` times beside its point (explicit: a checkpoint's saved knobs may
    prune): every mechanism off and no exit head loaded."""
    from .configuration_eat import MECHANISMS_OFF

    return {**MECHANISMS_OFF, "exit_layers": None}


def peer_points_for(points: list[OperatingPoint], peers: str | None,
                    note: Callable[[str], None] | None = None,
                    tuned_at: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[OperatingPoint]:
    """The static model and the tuned points among ``points`` also as a CPU user would deploy them (PyTorch int8,
    ONNX Runtime fp32 and int8; :mod:`eat.deploy.peers`), timed in the same interleaved run. ``peers``: a comma
    list or "none" (None: the defaults, each left out with a ``note`` when this machine cannot run it).
    ``tuned_at``: the points tuned for a peer's own backend or precision (:func:`peer_tuned_points`), which that
    peer runs."""
    from .deploy.peers import available_peers, parse_peers, peer_points

    names, notes = available_peers(parse_peers(peers), explicit=peers is not None)
    new, more = peer_points(points, names, tuned_at)
    for text in notes + more:
        if note is not None:
            note(text)
    return new


# ------------------------------------------------------------------------------------- eat tune, eat bench

# fewest held-out rows eat tune chooses an operating point on: with fewer, one row moves the accuracy by more than 5
# points, so no --max-drop below that means anything
MIN_CALIBRATION_ROWS = 20


def calibration_split(train_config: TrainConfig, checkpoint: str | Path):
    """The calibration rows a run held out of training (what `eat tune` tunes on); a ValueError when it held out
    none or too few to tune on."""
    from .training import training_data

    _, calibration, _ = training_data(train_config)
    if len(calibration) == 0:
        raise ValueError(f"{checkpoint}: trained with calibration_rows=0 (on every training row), so no held-out "
                         "calibration split exists to tune on; retrain with --calibration-rows N")
    if len(calibration) < MIN_CALIBRATION_ROWS:  # refused before anything is tuned or written
        raise ValueError(f"{checkpoint}: its calibration split has {len(calibration)} rows; eat tune needs at least "
                         f"{MIN_CALIBRATION_ROWS} (each row is {100 / len(calibration):.0f} accuracy points of it); "
                         "retrain with more rows or a larger --calibration-rows (at most 10% of the training rows "
                         "are held out)")
    return calibration


def tune_checkpoint(task: str, model, tokenizer, model_dir: Path, train_config: TrainConfig, request: TuneRequest,
                    results_dir: Path, *, preset: str = "demo", rows: int | None = None, threads: int | None = None,
                    log: Callable[[str], None] = print) -> TuneOutcome:
    """`eat tune` on a loaded run: choose the point on its calibration split (the task's runner), save it
    (:func:`~eat.results.tuned_file`), then time it beside exits off on every dev split (``rows``: a seeded sample)
    with the preset's bench settings, at the request's batch size and precision. Every line goes to ``log``."""
    spec = config_task(train_config)
    runner = spec.runner()
    runner.check_tune(request)
    calibration = calibration_split(train_config, model_dir)
    outcome = runner.tune(model, model_dir, tokenizer, calibration, train_config.max_length, request)
    save_json(tuned_file(results_dir, task, request.batch_size, request.precision, request.backend), outcome.saved)
    for line in outcome.lines:
        log(line)
    bench = bench_config_from_preset(preset, task=task, device=request.device, threads=threads, rows=rows,
                                     **({"batch_size": request.batch_size} if request.batch_size > 1 else {}))
    # an int8 (or ONNX Runtime) tuner times its points as it tuned them: eat:tuned:torch-int8, eat:tuned:ort-int8...
    from .deploy import deployment_name

    deployed = (request.backend, request.precision) != ("torch", "fp32")
    peer = f":{deployment_name(request.backend, request.precision)}" if deployed else ""
    off, name = EXITS_OFF + peer, tuned_point_name(request.batch_size) + peer
    points = [OperatingPoint(off, str(model_dir), everything_off(), "ablation", precision=request.precision,
                             backend=request.backend),
              OperatingPoint(name, str(model_dir), outcome.knobs, "tuned", precision=request.precision,
                             backend=request.backend)]
    own_eval_file = train_config.eval_file if train_config.data_file is not None else None
    for split in runner.dev_splits(own_eval_file):
        # the task's dev split, or the user's own dev table with the training labels
        data = runner.load_split(split, eval_file=own_eval_file, label_names=calibration.label_names)
        data = data.subset(rows, seed=bench.seed)
        measured = measure_points(points, runner.encode(data, tokenizer, train_config.max_length),
                                  dataclasses.replace(bench, split=split), ResultsLog(results_dir),
                                  dataset_source=f"{data.source} {data.note}".strip(), f1=spec.f1, force=True,
                                  pad_id=tokenizer.pad_token_id or 0, task=spec, data=data,
                                  objective=None if request.batch_size == 1 else f"tune-b{request.batch_size}")
        by_name = {row["point"]: row for row in measured}
        log(tuned_line(f"{task} {split}", by_name[name], by_name[off]))
    return outcome


def tuned_line(series: str, tuned: dict[str, Any], off: dict[str, Any]) -> str:
    """A tuned point's row against the exits-off row timed beside it: primary metric, token-layer work, batch-1
    median, batch throughput (arrival order, and length-sorted when measured)."""
    metric, value = row_metric(tuned)
    sorted_rate = ""
    if tuned.get(THROUGHPUT_SORTED) and off.get(THROUGHPUT_SORTED):
        sorted_rate = f", {tuned[THROUGHPUT_SORTED] / off[THROUGHPUT_SORTED]:.2f}x length-sorted"
    return (f"{series}: tuned {metric} {value:.2f} vs {row_metric(off)[1]:.2f}; token-layer fraction "
            f"{tuned['token_layer_fraction']:.3f}; batch-1 p50 {tuned[B1_P50_MS]:.2f} vs {off[B1_P50_MS]:.2f} ms "
            f"({off[B1_P50_MS] / tuned[B1_P50_MS]:.2f}x); batch {tuned['batch_size_throughput']} "
            f"{tuned[THROUGHPUT]:.0f} vs {off[THROUGHPUT]:.0f} rows/s "
            f"({tuned[THROUGHPUT] / off[THROUGHPUT]:.2f}x in arrival order{sorted_rate})")


@dataclasses.dataclass
class BenchRequest:
    """What `eat bench` measures on a loaded run: ``points`` (any of "ablation", "sweeps", "tuned"), the
    baselines' checkpoints, the peers (a comma list, "none", or None for the defaults), whether every point is
    also scored on the whole split (``accuracy_all_rows``, with a sampled ``config.rows``), and ``force`` to
    re-measure a table already logged. ``eval_file``: a run trained on the user's table is measured on its own."""

    points: frozenset[str]
    static: str | None = None
    half: str | None = None
    peers: str | None = None
    accuracy_all_rows: bool = False
    force: bool = False
    eval_file: str | None = None

    def validate(self, runner) -> None:
        """Raise ValueError for unknown point sets or what the task's level cannot measure."""
        unknown = self.points - {"ablation", "sweeps", "tuned"}
        if unknown:
            raise ValueError(f"--points: unknown {', '.join(sorted(unknown))}; use ablation, sweeps and/or tuned")
        if self.accuracy_all_rows and not runner.supports_all_rows:
            raise ValueError("--accuracy-all-rows: sentence-level tasks only (a token task's bench reports entity F1 "
                             "on the sentences it timed)")


def bench_points(model_dir: str, bench: BenchConfig, request: BenchRequest, tuned: dict[str, dict[str, Any]],
                 runner, note: Callable[[str], None] | None = None,
                 tuned_at: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[OperatingPoint]:
    """The points of one `eat bench` table: the comparison points (``request.points`` "ablation": the whole
    grid, "tuned": the short table) with the saved ``tuned`` points, the sweeps, and the peers (a tuned point's
    peers at the point tuned for their backend and precision, where ``tuned_at`` has one)."""
    chosen: list[OperatingPoint] = []
    if request.points & {"ablation", "tuned"}:
        # with a tuned point in the results folder (`eat tune`), the ablation uses its rule and the point itself
        # is measured in the same run as the baselines
        chosen += comparison_points(model_dir, bench, static=request.static, half=request.half, tuned=tuned,
                                    short="ablation" not in request.points)
    if "sweeps" in request.points:
        chosen += sweep_points(model_dir, bench)
    return chosen + (peer_points_for(chosen, request.peers, note, tuned_at) if runner.supports_peers else [])


def bench_split(spec: Task, split: str, model_dir: Path, tokenizer, bench: BenchConfig, request: BenchRequest,
                results_dir: Path, *, label_names=(), progress=None,
                note: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """One dev split of `eat bench`: load it (a seeded sample of ``bench.rows``; the whole split too with
    ``accuracy_all_rows``), build the table's points (:func:`bench_points`) and measure those not logged yet.
    Returns (the new rows, how many points the table has)."""
    runner = spec.runner()
    whole = runner.load_split(split, eval_file=request.eval_file, label_names=label_names)
    data = whole.subset(bench.rows, seed=bench.seed)
    encoded = runner.encode(data, tokenizer, bench.max_length)
    all_rows = (runner.encode(whole, tokenizer, bench.max_length)
                if request.accuracy_all_rows and len(data) < len(whole) else None)
    split_bench = dataclasses.replace(bench, split=split)
    points = bench_points(str(model_dir), split_bench, request, saved_tuned_points(results_dir, bench.task), runner,
                          note, peer_tuned_points(results_dir, bench.task))
    new = measure_points(points, encoded, split_bench, ResultsLog(results_dir),
                         dataset_source=f"{data.source} {data.note}".strip(), f1=spec.f1, force=request.force,
                         pad_id=tokenizer.pad_token_id or 0, examples_dir=results_dir / "examples", progress=progress,
                         all_rows=all_rows, task=spec, data=data)
    return new, len(points)


def record_bench_call(results_dir: Path, preset: str, points: frozenset[str], checkpoint: str | Path,
                      bench: BenchConfig) -> None:
    """One line per `eat bench` call in ``bench_configs.jsonl`` (a results folder collects several), so every
    row's settings stay on record."""
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / "bench_configs.jsonl", "a", encoding="utf-8") as configs:
        configs.write(json.dumps({"preset": preset, "points": sorted(points), "checkpoint": str(checkpoint),
                                  "bench": dataclasses.asdict(bench)}) + "\n")


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
           "regression_bench", "RUN_RECIPES", "HEAD_STAGE", "PAIR_POOLING", "BenchConfig", "comparison_points",
           "tuned_rule", "saved_tuned_points", "peer_tuned_points", "everything_off", "peer_points_for",
           "tune_checkpoint", "tuned_line",
           "calibration_split", "BenchRequest", "run_task_names", "bench_points", "bench_split", "record_bench_call", "SHORT_TABLE",
           "MIN_CALIBRATION_ROWS"]
