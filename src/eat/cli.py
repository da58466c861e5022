"""The `eat` command: thin wrappers over the library (training, evaluation, prediction, benchmarking, reports).

Errors the user can fix (missing files, bad columns, unknown knobs, finished runs) print one line and exit 2,
without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="EAT: input-adaptive BERT inference (token pruning, sparse attention, early exit) and the "
                       "pipeline that measures it.")
# Written to a file or a pipe (a log of a long run), rich would squeeze tables into 80 columns and cut every name
# short; such output gets room for the widest table instead (COLUMNS, when set, still decides).
_LOG_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=_LOG_WIDTH)


def _task_help() -> str:
    """--task help: every task the tool knows (eat.tasks, cheap to import: no torch) and the user's own."""
    from .tasks import TASKS

    return ("a task: " + "; ".join(task.summary() for task in TASKS.values())
            + "; or any name for your own table with --data-file")


TASK_HELP = _task_help()
LABEL_KIND_HELP = ("your own table: classes (labels are names or ids) or regression (a real value per row, e.g. a "
                   "similarity score)")
PRESET_HELP = "smoke, demo or paper (eat.presets: how the run trains, measures and tunes)"
METRIC_HELP = ("your own table: the metric(s) to report, comma-separated, the first primary: accuracy, f1, matthews "
               "(classes); pearson, spearman (regression). Default: accuracy, or pearson,spearman")


@app.callback()
def _group() -> None:
    """EAT: input-adaptive BERT inference and the pipeline that measures it."""


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def user_errors(function: Callable) -> Callable:
    """Turn the library's user-facing errors into one red line and exit code 2."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .checkpoints import CheckpointError
        from .configuration_eat import KnobError
        from .data import DataError
        from .report import ReportError
        from .results import ResultsError
        from .training import RunFinishedError

        _quiet_transformers()
        try:
            _check_flags(kwargs)
            return function(*args, **kwargs)
        except (CheckpointError, KnobError, DataError, RunFinishedError, ReportError, ResultsError, ValueError,
                FileNotFoundError) as error:
            from rich.markup import escape

            # escaped: a message may hold brackets ("pip install 'eat[ner]'", "[CLS]", label lists) rich would eat
            console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            # finished work is on disk whole (atomic writes, resumable checkpoints, one append per measured table)
            console.print("[red]interrupted;[/red] resume with the same command (eat train, bench, tune and run "
                          "continue from what is saved)")
            raise typer.Exit(130) from None

    return wrapper


# flags that count something: 0 or a negative number is a usage error (exit 2) naming the flag, before any work
_AT_LEAST_ONE = ("rows", "train_limit", "eval_limit", "limit", "batch_size", "threads")


def _check_flags(options: dict[str, Any]) -> None:
    """One check of the counting flags and ``--device`` of every command, before anything loads or is written."""
    for name in _AT_LEAST_ONE:
        value = options.get(name)
        if value is not None and not isinstance(value, bool) and isinstance(value, int) and value < 1:
            raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=f"--{name.replace('_', '-')}")
    if options.get("max_length") is not None and options["max_length"] < 3:
        raise typer.BadParameter(f"must be at least 3 ([CLS], one token of text, [SEP]), got {options['max_length']}",
                                 param_hint="--max-length")
    device = options.get("device")
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise typer.BadParameter(f"{device!r}: no CUDA device is available (torch {torch.__version__} is "
                                     f"{build}); use --device cpu", param_hint="--device")


def _parse_knob_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_knobs(items: list[str] | None) -> dict[str, Any]:
    """``["keep_ratio=0.7", "exit_layers=[2,4]"]`` -> dict, values read as JSON where they parse."""
    knobs: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--knob {item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        knobs[name.strip()] = _parse_knob_value(value.strip())
    return knobs


def knobs_from_options(knob: list[str] | None, tau: float | None, tuned: Path | None = None) -> dict[str, Any]:
    """Knobs from a point `eat tune` saved (``tuned``: its ``tuned_<task>.json``), then repeated ``--knob
    NAME=VALUE`` over them; ``--tau`` is shorthand for the confidence exit policy."""
    knobs: dict[str, Any] = {}
    if tuned is not None:
        from .results import read_tuned_knobs

        knobs.update(read_tuned_knobs(tuned))
    knobs.update(parse_knobs(knob))
    if tau is not None:
        if not 0.0 < tau <= 1.0:
            raise typer.BadParameter(f"{tau} is not a confidence threshold: it lies in (0, 1] (the largest class "
                                     "probability must reach it; above 1 no row could ever exit)", param_hint="--tau")
        knobs.update(exit_policy="confidence", exit_threshold=tau)
    threshold = knobs.get("exit_threshold")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        from .configuration_eat import REGRESSION_EXIT_POLICIES

        # a regression rule's threshold is in the label's units (a change of the predicted score), so it may
        # exceed 1; a class-probability threshold cannot
        if knobs.get("exit_policy") in REGRESSION_EXIT_POLICIES:
            if threshold <= 0:
                raise typer.BadParameter(f"exit_threshold={threshold}: a regression exit threshold (the largest "
                                         "change of the prediction that counts as settled) must be > 0",
                                         param_hint="--knob")
        elif not 0.0 < threshold <= 1.0:
            raise typer.BadParameter(f"exit_threshold={threshold}: a confidence threshold lies in (0, 1]",
                                     param_hint="--knob")
    return knobs


def _progress():
    """Live bars on a terminal; a plain line every 30 s per stage when stderr is a log file or a pipe."""
    from .progress import make_progress

    return make_progress(console)


@app.command()
@user_errors
def train(
    task: Annotated[str, typer.Option(help=TASK_HELP)] = "sst2",
    model: Annotated[Optional[str], typer.Option(help="backbone path or hub id (default: packaged MiniLM)")] = None,
    variant: Annotated[str, typer.Option(help="eat (exit heads, joint loss), static, or half (layers 0,2,4)")] = "eat",
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "demo",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="output folder (default runs/<task>-<variant>)")] = None,
    epochs: Annotated[Optional[float], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr")] = None,
    head_learning_rate: Annotated[Optional[float], typer.Option(
        "--head-lr", help="learning rate of the intermediate exit heads (default: --lr)")] = None,
    warmup_ratio: Annotated[Optional[float], typer.Option(
        help="share of steps with a linear learning-rate warm-up (default 0.06)")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (default 0.01)")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(
        help="gradient clipping norm (default 1.0; 0 = no clipping)")] = None,
    max_length: Annotated[Optional[int], typer.Option()] = None,
    train_limit: Annotated[Optional[int], typer.Option(help="seeded subset of training rows")] = None,
    eval_limit: Annotated[Optional[int], typer.Option()] = None,
    calibration_rows: Annotated[Optional[int], typer.Option(
        help="training rows held out for `eat tune`, at most 10% of them (0: train on every row, e.g. for a "
             "baseline)")] = None,
    calibration_unit: Annotated[Optional[str], typer.Option(
        help="row (random rows) or sentence (whole sentences, their phrases held out too: SST-2)")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    distill_weight: Annotated[Optional[float], typer.Option(help="self-distillation weight (0 = off)")] = None,
    teacher: Annotated[Optional[str], typer.Option(
        help="distil every exit (the last too) from this finished run's logits instead of the own last head")] = None,
    train_keep_ratio: Annotated[Optional[str], typer.Option(
        help="pruning-aware training: keep ratio while training, one number or 'first,last' (e.g. 0.9,0.6)")] = None,
    length_bucketing: Annotated[Optional[bool], typer.Option("--length-bucketing/--no-length-bucketing",
                                                             help="train on batches of similar length")] = None,
    exit_layers: Annotated[Optional[str], typer.Option(help="layers with exit heads: 'all' or a comma list")] = None,
    exit_pooling: Annotated[Optional[str], typer.Option(
        help="what the exit heads read: cls (the [CLS] vector), mean (the mean of the real tokens) or pair "
             "(sentence pairs: each segment's mean a, b and |a-b|, a*b)")] = None,
    exit_loss_weights: Annotated[Optional[str], typer.Option(
        help="joint loss weights: depth, uniform, or a comma list (one per exit layer)")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="start from this fine-tuned run instead of the backbone")] = None,
    freeze_backbone: Annotated[bool, typer.Option(
        help="with --init-from: train only the exit heads on frozen features (two-stage)")] = False,
    data_file: Annotated[Optional[str], typer.Option(help="your own training table (csv/tsv/jsonl/parquet)")] = None,
    eval_file: Annotated[Optional[str], typer.Option(help="your own evaluation table")] = None,
    text_column: Annotated[str, typer.Option()] = "text",
    text_pair_column: Annotated[Optional[str], typer.Option()] = None,
    label_column: Annotated[str, typer.Option()] = "label",
    label_kind: Annotated[Optional[str], typer.Option(help=LABEL_KIND_HELP)] = None,
    metric: Annotated[Optional[str], typer.Option(help=METRIC_HELP)] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's)")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    bf16: Annotated[Optional[str], typer.Option(
        help="bf16 autocast in training: auto (CUDA only), on (CPU too; faster only with native bf16, AVX-512 BF16 or AMX: it warns where the CPU lacks it), off")] = None,
    force: Annotated[bool, typer.Option(help="start over in --out: replace a finished run or discard an interrupted one (deleted only once the new run has loaded)")] = False,
) -> None:
    """Fine-tune an EAT model (or a static baseline) and print its dev score (the task's primary metric). Resumes
    interrupted runs. Tasks: GLUE sst2, qqp, mnli, qnli, rte, mrpc, cola, stsb (regression), wnli; conll2003 (token
    task, NER); or your own table (--data-file, --eval-file, columns, --label-kind, --metric)."""
    from .training import train as run_training
    from .training import train_config_from_preset

    _set_threads(threads)
    config = train_config_from_preset(
        preset, task=task, model=model, variant=variant, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, head_learning_rate=head_learning_rate, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, max_length=max_length,
        train_limit=train_limit, eval_limit=eval_limit, seed=seed,
        calibration_rows=calibration_rows, calibration_unit=calibration_unit, distill_weight=distill_weight,
        teacher=teacher, train_keep_ratio=_keep_ratio(train_keep_ratio), length_bucketing=length_bucketing,
        init_from=init_from, freeze_backbone=freeze_backbone or None, exit_layers=_layer_list(exit_layers),
        exit_pooling=exit_pooling, exit_loss_weights=_weight_list(exit_loss_weights),
        data_file=data_file, eval_file=eval_file, bf16=bf16,
        text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
        label_kind=label_kind, metric=metric)
    target = out_dir or Path("runs") / f"{task}-{variant}"
    with _progress() as bar:
        job = bar.add_task(f"train {task} {variant}", total=None, info="")

        def report(p: dict[str, Any]) -> None:
            info = f"loss {p['loss']:.4f}  {p['rows_per_s']:.0f} rows/s"
            bar.update(job, total=p["total"], completed=p["step"], info=info)

        result = run_training(config, target, force=force, device=device, progress=report)
    from .tasks import metric_title

    for split, value in result.dev_accuracy.items():
        out.print(f"{task} {split} {metric_title(result.dev_metric)}: {value:.2f}%  ({result.steps} steps, {result.seconds / 60:.1f} min, "
                  f"model in {result.model_dir})")


def _layer_list(text: str | None):
    """'all' or '2,4,6' -> the TrainConfig value (None = the preset's)."""
    if text is None or text == "all":
        return text
    return [int(part) for part in text.split(",") if part.strip()]


def _check_same_calibration(checkpoint: Path, trained: dict, reference: Path, reference_trained: dict) -> None:
    """A tuning reference must have held out the very calibration slice the EAT run holds out."""
    from .training import calibration_differences

    if not reference_trained:
        raise ValueError(f"{reference}: no train_config.json, so its calibration slice is unknown")
    differ = calibration_differences(trained, reference_trained)
    if differ or not reference_trained.get("calibration_rows"):
        details = ", ".join(differ) or "calibration_rows: 0 (it trained on every row)"
        raise ValueError(f"--reference {reference}: its calibration slice differs from {checkpoint}'s ({details}); "
                         "the reference must hold out the same rows")


def _keep_ratio(text: str | None, flag: str = "--train-keep-ratio"):
    """'0.7' -> 0.7, '0.9,0.6' -> [0.9, 0.6] (the knob's forms; None = the preset's)."""
    if text is None:
        return None
    try:
        parts = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected a number or 'first,last', got {text!r}") from None
    if not parts or not all(0.0 < part <= 1.0 for part in parts):
        raise ValueError(f"{flag}: keep ratios lie in (0, 1], got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _keep_grid(text: str | None):
    """'1.0;0.9,0.7' -> [1.0, [0.9, 0.7]]: the keep schedules `eat tune` searches (None = its default grid)."""
    if text is None:
        return None
    grid = [_keep_ratio(part, "--keep-grid") for part in text.split(";") if part.strip()]
    if not grid:
        raise ValueError(f"--keep-grid: give at least one keep schedule (1.0 = no pruning), got {text!r}")
    return grid


def _exit_depths(text: str) -> list[int] | str | None:
    """'auto' / 'all' / 'none' / '3,4,5' -> the depth caps `eat tune` searches (TuneRequest.exit_depths)."""
    if text.strip().lower() in ("auto", "all", "none"):
        return None if text.strip().lower() == "none" else text.strip().lower()
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--exit-depths: 'auto', 'all', 'none' or a comma list of layers, got {text!r}") from None
    if not depths or min(depths) < 1:
        raise ValueError(f"--exit-depths: layers are numbered from 1, got {text!r}")
    return depths


def _weight_list(text: str | None):
    """'depth' / 'uniform' / '0.1,0.2,0.7' -> the TrainConfig value (None = the preset's)."""
    if text is None or text in ("depth", "uniform"):
        return text
    return [float(part) for part in text.split(",") if part.strip()]


def _load_checkpoint_for_task(checkpoint: Path, task: str | None, knobs: dict[str, Any]):
    """Model + tokenizer + its training config; refuses a checkpoint trained for another task. The model class
    follows the task's level (without a task: what the checkpoint itself says it is)."""
    from transformers import AutoTokenizer

    from .checkpoints import CheckpointError, load_classifier, model_folder
    from .tasks import is_token_task, named_task

    model_dir = model_folder(checkpoint)
    train_config_file = (model_dir.parent / "train_config.json") if model_dir.name == "model" else None
    trained: dict[str, Any] = {}
    if train_config_file is not None and train_config_file.is_file():
        trained = _read_json_file(train_config_file)
    if task is not None and trained.get("task") not in (None, task) and trained.get("data_file") is None:
        raise CheckpointError(f"{checkpoint}: trained for task {trained.get('task')!r}, not {task!r}")
    token_level = is_token_task(task if task is not None else trained.get("task", ""))
    if task is None and not token_level and (model_dir / "config.json").is_file():
        token_level = "EATForTokenClassification" in (_read_json_file(model_dir / "config.json").get("architectures")
                                                      or [])
    model = load_classifier(str(model_dir), knobs=knobs, token_level=token_level)
    _check_exit_knobs(knobs, model.config)
    if task is not None and trained.get("data_file") is not None and task != trained.get("task"):
        _check_own_data_labels(checkpoint, trained, model.config, task)
    if task is not None and trained.get("data_file") is None:
        labels = named_task(task).runner().label_names()  # () for a user's tagged files: tags from the data
        if labels and model.config.num_labels != len(labels):
            raise CheckpointError(f"{checkpoint}: its head has {model.config.num_labels} labels, task {task} has "
                                  f"{len(labels)}; it was trained for another task")
    if not (model_dir / "tokenizer_config.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer saved with this checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer, trained, model_dir


def _deployed(model, model_dir: Path, knobs: dict[str, Any], precision: str, backend: str):
    """``model`` itself at fp32 on torch; else the same checkpoint and knobs at that precision / on that backend
    (:func:`eat.deploy.load_for_inference`): the int8 or bf16 torch model, or the ONNX Runtime runner, each an
    EAT model class that every evaluation and timing function takes as it is."""
    if (precision, backend) == ("fp32", "torch"):
        return model
    from .deploy import load_for_inference

    token_level = type(model).__name__ == "EATForTokenClassification"
    return load_for_inference(model_dir, knobs=knobs, precision=precision, backend=backend,
                              token_level=token_level).model


def _read_json_file(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, train_config.json) as a dict; a CheckpointError naming it otherwise."""
    from .checkpoints import CheckpointError

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); restore it or retrain into another --out") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _check_exit_knobs(knobs: dict[str, Any], config) -> None:
    """A threshold knob with no exit policy (given or saved) would change nothing: say so instead."""
    given = [name for name in ("exit_threshold", "entropy_threshold", "exit_patience") if name in knobs]
    if given and "exit_policy" not in knobs and getattr(config, "exit_policy", "none") == "none":
        from .configuration_eat import KnobError

        raise KnobError(f"--knob {given[0]}={knobs[given[0]]}: this checkpoint's exit_policy is 'none', so no row "
                        "would exit; add --knob exit_policy=confidence (or entropy, patience, agreement), or use --tau")


def _check_own_data_labels(checkpoint: Path, trained: dict[str, Any], config, task: str) -> None:
    """A checkpoint trained on the user's own table, asked to score a known task (e.g. SST-2 dev), must have that
    task's labels: a 4-class head on a 2-class dev set would print a meaningless score."""
    from .checkpoints import CheckpointError
    from .data import DataError, task_spec

    try:
        wanted = tuple(str(name) for name in task_spec(task).label_names)
    except DataError:
        return  # not a known task: the user's own name
    own = tuple(str(config.id2label[i]) for i in range(config.num_labels))
    ids = tuple(str(i) for i in range(len(wanted)))
    if len(own) != len(wanted) or own not in (wanted, ids):
        raise CheckpointError(f"{checkpoint}: trained on {trained.get('data_file')} with labels {list(own)}; task "
                              f"{task} has labels {list(wanted)}; evaluate it on its own data with --eval-file "
                              f"(or --task {trained.get('task')})")


def _own_eval_file(checkpoint: Path, trained: dict[str, Any]) -> str:
    """The dev table of a run trained on the user's own data (its train_config.json's ``eval_file``)."""
    if not trained.get("eval_file"):
        raise ValueError(f"{checkpoint}: trained on {trained['data_file']} but its train_config.json names no "
                         "eval_file to measure on")
    return trained["eval_file"]


@app.command("eval")
@user_errors
def evaluate_command(
    checkpoint: Annotated[Path, typer.Option(help="a run folder (with model/) or a model folder")],
    task: Annotated[str, typer.Option()] = "sst2",
    tau: Annotated[Optional[float], typer.Option(help="confidence threshold (sets exit_policy=confidence)")] = None,
    knob: Annotated[Optional[list[str]], typer.Option(help="EAT knob NAME=VALUE (repeatable)")] = None,
    tuned: Annotated[Optional[Path], typer.Option(
        help="the knobs of a point eat tune chose (its tuned_<task>.json); --knob / --tau override them")] = None,
    eval_file: Annotated[Optional[str], typer.Option(help="evaluate on your own table instead of GLUE dev")] = None,
    text_column: Annotated[str, typer.Option()] = "text",
    text_pair_column: Annotated[Optional[str], typer.Option()] = None,
    label_column: Annotated[str, typer.Option()] = "label",
    max_length: Annotated[int, typer.Option()] = 128,
    batch_size: Annotated[int, typer.Option()] = 64,
    limit: Annotated[Optional[int], typer.Option(help="seeded subset of the eval rows")] = None,
    threads: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, bf16 (CPUs with native bf16) or int8 (dynamic int8 of every "
                                                "linear layer; see docs/backends.md)")] = "fp32",
    backend: Annotated[str, typer.Option(help="torch, or onnxruntime (the model exported to ONNX segments first; "
                                              "sentence tasks)")] = "torch",
) -> None:
    """GLUE metrics, per-exit accuracy, exit distribution and tokens kept (entity P/R/F1, per-exit F1 and word exit
    layers for a token task); written as JSON/CSV beside the checkpoint."""
    from .evaluation import evaluate_run
    from .tasks import named_task, resolve_task

    _set_threads(threads)
    knobs = knobs_from_options(knob, tau, tuned)
    model, tokenizer, trained, model_dir = _load_checkpoint_for_task(checkpoint, None if eval_file else task, knobs)
    if eval_file is None:
        spec = named_task(task)
    else:  # the user's table, read with the column flags; its metrics those the model was trained to report
        spec = resolve_task(task, True, text_column=text_column, pair_column=text_pair_column,
                            label_column=label_column, label_kind="regression" if model.config.num_labels == 1
                            else "classes", metrics=trained.get("metric") if trained.get("data_file") else None)
    written = evaluate_run(spec, _deployed(model, model_dir, knobs, precision, backend), tokenizer, model_dir, knobs,
                           eval_file=eval_file, limit=limit, max_length=max_length, batch_size=batch_size,
                           device=device, precision=precision, backend=backend, log=out.print)
    console.print(f"wrote {written} and .csv")


@app.command()
@user_errors
def predict(
    checkpoint: Annotated[Path, typer.Option(help="a run folder (with model/) or a model folder")],
    text: Annotated[Optional[list[str]], typer.Argument(help="texts; none = read one per line from --file or stdin")] = None,
    file: Annotated[Optional[Path], typer.Option(help="a file with one text per line")] = None,
    tau: Annotated[Optional[float], typer.Option(help="confidence threshold for early exit")] = None,
    knob: Annotated[Optional[list[str]], typer.Option(help="EAT knob NAME=VALUE (repeatable)")] = None,
    max_length: Annotated[int, typer.Option()] = 128,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    input_path: Annotated[Optional[Path], typer.Option(
        "--input", help="large-file mode: a CSV/TSV/JSONL/parquet file or a folder of them, streamed in chunks")] = None,
    output: Annotated[Optional[Path], typer.Option(
        help="large-file mode: folder for the parquet shards, manifest.json and rejects.jsonl (resumes a job there)")] = None,
    text_column: Annotated[str, typer.Option(help="large-file mode: the text column")] = "text",
    text_pair_column: Annotated[Optional[str], typer.Option(help="large-file mode: second text of a pair")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="large-file mode: a column copied to the output as id")] = None,
    tuned: Annotated[Optional[Path], typer.Option(help="knobs of a point eat tune chose (tuned_<task>.json)")] = None,
    batch_size: Annotated[int, typer.Option(help="large-file mode: rows per model call (length-sorted)")] = 32,
    chunk_rows: Annotated[int, typer.Option(help="large-file mode: input rows per chunk = per output shard")] = 10_000,
    strict: Annotated[bool, typer.Option(help="large-file mode: stop on the first unreadable row")] = False,
    precision: Annotated[str, typer.Option(help="fp32, bf16 (native-bf16 CPUs) or int8 (docs/backends.md)")] = "fp32",
    backend: Annotated[str, typer.Option(help="large-file mode: torch or onnxruntime (needs eat.deploy)")] = "torch",
    threads: Annotated[Optional[int], typer.Option(help="torch threads (per Ray actor with --ray)")] = None,
    ray: Annotated[Optional[str], typer.Option(
        help="large-file mode on Ray Data: 'local' (start a Ray on this machine), 'auto' or a cluster address")] = None,
    actors: Annotated[Optional[int], typer.Option(help="with --ray: model actors (default: one per CPU)")] = None,
) -> None:
    """Classify raw texts: label, confidence and exit layer for each. A token-task checkpoint (NER) tags every
    whitespace-separated word instead: word/TAG@exit-layer. With --input/--output: classify files of any size into
    resumable parquet shards (see docs/scale-out.md)."""
    from .evaluation import predict_texts

    if input_path is not None or output is not None:
        if input_path is None or output is None or text or file is not None:
            raise ValueError("large-file mode needs both --input and --output (and no TEXT or --file)")
        return _predict_files(checkpoint, input_path, output, knobs_from_options(knob, tau), tuned, text_column,
                              text_pair_column, id_column, max_length, batch_size, chunk_rows, strict, precision,
                              backend, threads, ray, actors)
    knobs = knobs_from_options(knob, tau, tuned)
    from .modeling_eat import EATForTokenClassification

    model, tokenizer, _, model_dir = _load_checkpoint_for_task(checkpoint, None, knobs)
    model = _deployed(model, model_dir, knobs, precision, backend)  # int8 / bf16 / ONNX Runtime (eat.deploy)
    texts, numbers = (list(text), None) if text else _read_texts(file)
    if not texts:
        raise ValueError("no text to classify (give texts as arguments, --file, or lines on stdin)")
    _warn_truncated(tokenizer, texts, max_length, numbers)
    if isinstance(model, EATForTokenClassification):
        from .token_tasks import tag_texts

        for result in tag_texts(model, tokenizer, texts, max_length=max_length):
            if as_json:
                typer.echo(json.dumps(result))
            else:
                typer.echo(" ".join(f"{word}/{tag}@{layer}" for word, tag, layer
                                    in zip(result["words"], result["tags"], result["exit_layer"])))
        return
    for index, result in enumerate(predict_texts(model, tokenizer, texts, max_length=max_length)):
        if as_json:
            typer.echo(json.dumps(result if numbers is None else {"line": numbers[index], **result}))
        else:
            answer = (f"{result['score']:.3f}" if "score" in result  # a regression model: its value
                      else f"{result['label']}\t{result['confidence']:.3f}")
            typer.echo(f"{answer}\texit {result['exit_layer']}\t{result['text']}")


def _read_texts(file: Path | None) -> tuple[list[str], list[int]]:
    """(texts, their 1-based line numbers) from ``file`` or stdin: blank lines are skipped with a count on stderr,
    so every result keeps the number of its line ("line" in --json)."""
    if file is not None:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        raw, source = file.read_bytes(), str(file)
    else:
        raw, source = sys.stdin.buffer.read(), "stdin"
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}: not UTF-8 text (invalid byte at offset {error.start})") from None
    numbers = [number for number, line in enumerate(lines, start=1) if line.strip()]
    texts = [lines[number - 1] for number in numbers]
    blank = [number for number, line in enumerate(lines, start=1) if not line.strip()]
    if blank and texts:
        console.print(f"{source}: skipped {len(blank)} blank line(s) (line {', '.join(map(str, blank[:10]))}"
                      f"{' ...' if len(blank) > 10 else ''}); results carry their line numbers")
    return texts, numbers


def _predict_files(checkpoint: Path, input_path: Path, output: Path, knobs: dict[str, Any], tuned: Path | None,
                   text_column: str, text_pair_column: str | None, id_column: str | None, max_length: int,
                   batch_size: int, chunk_rows: int, strict: bool, precision: str, backend: str,
                   threads: int | None, ray: str | None, actors: int | None) -> None:
    """`eat predict --input --output`: eat.bulk (or eat.bulk_ray) with a progress bar in rows/s."""
    from .bulk import BulkConfig, predict_files

    config = BulkConfig(str(checkpoint), text_column, text_pair_column, id_column, knobs,
                        None if tuned is None else str(tuned), precision, backend, max_length, batch_size, chunk_rows,
                        strict)
    with _progress() as bar:
        job = bar.add_task(f"predict {input_path.name}", total=None, info="")

        def report(p: dict[str, Any]) -> None:
            bar.update(job, total=p["rows_total"], completed=p["rows_done"],
                       info=f"{p['rows_per_s']:.0f} rows/s, {p['shards']} shards")

        if ray is not None:
            from .bulk_ray import predict_files_ray

            result = predict_files_ray(config, input_path, output, address=ray, actors=actors, threads=threads,
                                       progress=report)
        else:
            result = predict_files(config, input_path, output, threads=threads, progress=report)
    rejected = f", {result.rejected} rejected (see {Path(result.output) / 'rejects.jsonl'})" if result.rejected else ""
    out.print(f"{result.rows} rows predicted{rejected} into {result.shards} shards in {result.output} "
              f"({result.shards_written} written now, {result.rows_per_s:.0f} rows/s)")


def _warn_truncated(tokenizer, texts: list[str], max_length: int, numbers: list[int] | None) -> None:
    """One stderr line when texts are longer than --max-length tokens (they are classified on their first tokens)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]]
    long = [i for i, length in enumerate(lengths) if length > max_length]
    if long:
        where = "line" if numbers is not None else "text"
        names = ", ".join(str(numbers[i] if numbers is not None else i + 1) for i in long[:10])
        console.print(f"[yellow]warning:[/yellow] {len(long)} of {len(texts)} text(s) are longer than --max-length "
                      f"{max_length} tokens (up to {max(lengths[i] for i in long)}) and were truncated ({where} "
                      f"{names}{' ...' if len(long) > 10 else ''})")


def _bench_progress(bar):
    jobs: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in jobs:
            jobs[label] = bar.add_task(label, total=total, info="")
        bar.update(jobs[label], completed=done, total=total)

    return update


@app.command()
@user_errors
def bench(
    checkpoint: Annotated[Path, typer.Option(help="EAT run folder (with model/) or model folder")],
    task: Annotated[str, typer.Option()] = "sst2",
    static: Annotated[Optional[Path], typer.Option(help="static baseline run folder")] = None,
    half: Annotated[Optional[Path], typer.Option(help="half-depth baseline run folder")] = None,
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "demo",
    results: Annotated[Path, typer.Option("--results", help="results folder (CSV/JSONL appended)")] = Path("results/bench"),
    points: Annotated[str, typer.Option(
        help="comma list of: ablation (8 mechanism combinations + baselines), sweeps, tuned (baselines, exits off, "
             "exit, prune+exit and the tuned point only: the short table for large dev sets)")] = "ablation,sweeps",
    tau: Annotated[Optional[float], typer.Option(help="exit threshold of the exit mechanism")] = None,
    rows: Annotated[Optional[int], typer.Option(help="seeded sample of dev rows (default: preset)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="throughput batch size")] = None,
    max_length: Annotated[int, typer.Option()] = 128,
    threads: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    force: Annotated[bool, typer.Option(help="re-measure points already in the results")] = False,
    accuracy_all_rows: Annotated[bool, typer.Option(
        help="with --rows: also every point's accuracy on the whole split (untimed batched calls, as `eat eval`), "
             "logged as accuracy_all_rows; benchmarks/targets.py judges accuracy drops on it")] = False,
    sorted_throughput: Annotated[bool, typer.Option(
        "--sorted-throughput/--arrival-only",
        help="also time batch throughput on length-sorted batches (a second throughput pass); --arrival-only "
             "times arrival order alone")] = True,
    peers: Annotated[Optional[str], typer.Option(
        help="the static model and the tuned points also on these backends, each its own row timed in the same "
             "run: comma list of torch-int8, torch-bf16, ort-fp32, ort-int8, or none (default "
             "torch-int8,ort-fp32,ort-int8; ONNX Runtime ones left out with a note when it is not installed)")] = None,
) -> None:
    """Latency (batch 1, interleaved) + accuracy from the same calls, and batch throughput, per operating point."""
    import torch

    from .bench import bench_config_from_preset
    from .pipeline import BenchRequest, bench_split, record_bench_call
    from .results import ResultsLog, batch_tuned_files, tuned_file
    from .tasks import metric_title, named_task
    from .training import TrainConfig, config_task

    _set_threads(threads)
    config = bench_config_from_preset(preset, task=task, rows=rows, batch_size=batch_size, device=device,
                                      max_length=max_length, tau=tau, threads=torch.get_num_threads(),
                                      sorted_throughput=sorted_throughput)
    model, tokenizer, trained, model_dir = _load_checkpoint_for_task(checkpoint, task, {})
    # a checkpoint trained on the user's own table is measured on its own dev table (named in train_config.json)
    own_eval_file = (_own_eval_file(checkpoint, trained) if trained.get("data_file") and trained.get("task") == task
                     else None)
    spec = config_task(TrainConfig(**trained)) if own_eval_file else named_task(task)
    baselines = {name: str(_load_checkpoint_for_task(folder, task, {})[3]) if folder is not None else None
                 for name, folder in (("static", static), ("half", half))}
    request = BenchRequest(frozenset(p.strip() for p in points.split(",") if p.strip()), baselines["static"],
                           baselines["half"], peers, accuracy_all_rows, force, own_eval_file)
    request.validate(spec.runner())
    if "tuned" in request.points and not (tuned_file(results, task).is_file() or batch_tuned_files(results, task)):
        raise ValueError(f"--points tuned: no {tuned_file(results, task)}; run `eat tune --results {results}` first")
    record_bench_call(results, preset, request.points, checkpoint, config)
    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    for split in spec.runner().dev_splits(own_eval_file):
        with _progress() as bar:
            new, table = bench_split(spec, split, model_dir, tokenizer, config, request, results, label_names=labels,
                                     progress=_bench_progress(bar), note=_note)
        out.print(_bench_table(f"{task} {split}: {len(new)} point(s) measured in this run, {table - len(new)} "
                               "already measured", new, metric_title(spec.primary_metric)))
    log = ResultsLog(results)
    out.print(f"results in {log.csv} and {log.jsonl}")


def _note(text: str) -> None:
    """A note on stderr (e.g. a peer this machine cannot run, left out)."""
    console.print(f"[yellow]note:[/yellow] {text}")


def _bench_table(title: str, new: list[dict[str, Any]], metric: str) -> Table:
    """The rows `eat bench` measured: primary metric (and on all rows when measured), batch-1 latency, throughput
    (length-sorted too when measured), mean exit layer, token-layer fraction."""
    from .results import B1_P50_MS, THROUGHPUT, THROUGHPUT_SORTED, row_metric

    table = Table(title=title)
    whole_split = bool(new) and "rows_all" in new[0]
    sorted_too = bool(new) and THROUGHPUT_SORTED in new[0]
    for column in ("point", metric, *(("all rows",) if whole_split else ()), "b1 p50 ms", "b1 p90 ms", "rows/s",
                   *(("rows/s sorted",) if sorted_too else ()), "mean exit", "token-layer frac"):
        table.add_column(column)
    for row in new:
        table.add_row(row["point"], f"{row_metric(row)[1]:.2f}",
                      *((f"{row_metric(row, '_all_rows')[1]:.2f}",) if whole_split else ()), f"{row[B1_P50_MS]:.2f}",
                      f"{row['b1_p90_ms']:.2f}", f"{row[THROUGHPUT]:.0f}",
                      *((f"{row[THROUGHPUT_SORTED]:.0f}",) if sorted_too else ()),
                      f"{row['mean_exit_layer']:.2f}", f"{row['token_layer_fraction']:.3f}")
    return table


@app.command("export")
@user_errors
def export_command(
    run: Annotated[Path, typer.Argument(help="a run folder (with model/) or a model folder")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="folder for the ONNX segments and manifest.json")],
    precision: Annotated[str, typer.Option(
        help="fp32 (segments as exported) or int8 (also ONNX Runtime dynamic-int8 segments beside them)")] = "fp32",
    knob: Annotated[Optional[list[str]], typer.Option(help="EAT knob NAME=VALUE saved as the export's default")] = None,
    tuned: Annotated[Optional[Path], typer.Option(help="knobs of a point eat tune chose (tuned_<task>.json)")] = None,
    force: Annotated[bool, typer.Option(help="write into a non-empty OUT")] = False,
) -> None:
    """Export a sentence classifier as ONNX segments (embeddings, each layer, each exit head, final head; dynamic
    batch and length axes) plus a manifest (knobs, labels, tokenizer, versions, sha256 checksums). Sentence models
    also get the whole model with every mechanism off as one graph (model.onnx), run instead of the segments when
    nothing adaptive is on. Run them with --backend onnxruntime (eval, bench, tune) or
    eat.deploy.load_for_inference(OUT, backend="onnxruntime")."""
    from .deploy.onnx_export import ExportError, export_checkpoint

    if precision not in ("fp32", "int8"):
        raise ValueError(f"--precision {precision!r}: ONNX export takes fp32 or int8")
    try:
        manifest = export_checkpoint(run, out_dir, precisions=("fp32", "int8") if precision == "int8" else ("fp32",),
                                     knobs=knobs_from_options(knob, None, tuned), force=force)
    except ExportError as error:
        raise ValueError(str(error)) from None
    segments = manifest["segments"][precision]
    out.print(f"exported {run} to {out_dir}: embeddings, {len(segments['layers'])} layers, "
              f"{len(segments['exit_heads'])} exit heads, final head"
              f"{', whole model' if 'whole' in segments else ''} ({', '.join(manifest['precisions'])}); "
              f"manifest {out_dir / 'manifest.json'}")


@app.command("tune")
@user_errors
def tune_command(
    checkpoint: Annotated[Path, typer.Option(help="EAT run folder (with model/ and train_config.json)")],
    task: Annotated[str, typer.Option()] = "sst2",
    max_drop: Annotated[Optional[float], typer.Option(help="accuracy points allowed below everything-off")] = None,
    latency_budget: Annotated[Optional[float], typer.Option(help="batch-1 median budget in ms")] = None,
    results: Annotated[Path, typer.Option("--results")] = Path("results/bench"),
    preset: Annotated[str, typer.Option(help=PRESET_HELP + "; here: how the dev report is measured")] = "demo",
    rows: Annotated[Optional[int], typer.Option(help="seeded sample of dev rows for the final report (default all)")] = None,
    max_work: Annotated[float, typer.Option(help="token tasks: most token-layer work allowed (fraction of static)")] = 1.0,
    reference: Annotated[Optional[Path], typer.Option(
        help="measure --max-drop against this run (e.g. the family's static model, trained with the same "
             "calibration slice held out) instead of the EAT checkpoint with everything off")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="1: fastest batch-1 median; N > 1: highest throughput at batch N (saved as "
                             "tuned_<task>_bN.json, point eat:tuned-bN)")] = 1,
    certify: Annotated[Optional[float], typer.Option(
        help="e.g. 0.9: only points whose drop is at most --max-drop with this confidence for rows like the "
             "calibration rows (exact paired bound, fixed-sequence over tau), not just on the point estimate")] = None,
    keep_grid: Annotated[Optional[str], typer.Option(
        help="keep schedules to search, ';'-separated, each a number or 'first,last' (default "
             "'1.0;1.0,0.8;0.9,0.7;0.9,0.6;0.8,0.5'); with --certify, fewer schedules leave more error to each")] = None,
    threads: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    precision: Annotated[str, typer.Option(
        help="tune the model at this precision: fp32, bf16 or int8 (its exits and pruning read its own outputs; "
             "the drop still counts from the fp32 reference); saved as tuned_<task>[_bN]_<precision>.json")] = "fp32",
    backend: Annotated[str, typer.Option(
        help="torch, or onnxruntime: read and time the ONNX Runtime runner (fp32 or int8) the point will be deployed "
             "on; saved as tuned_<task>[_bN]_ort-<precision>.json, which eat bench's ort peers then run")] = "torch",
    exit_depths: Annotated[str, typer.Option(
        help="depth caps to search (the exit_depth knob: rows still running there leave with that layer's head, "
             "later layers never run): auto (regression models only: each cap is one more chance of a lucky "
             "calibration dip), all (every layer from 2), none, or a comma list")] = "auto",
) -> None:
    """Choose tau, keep ratios and a depth cap on the calibration split held out of training, then report that point
    on dev."""
    import torch

    from .pipeline import tune_checkpoint
    from .presets import get_preset
    from .runners import TuneRequest
    from .training import TrainConfig, config_task

    _set_threads(threads)
    if (max_drop is None) == (latency_budget is None):
        raise ValueError("give exactly one of --max-drop or --latency-budget")
    get_preset(preset)  # an unknown preset is refused before anything loads
    request = TuneRequest(max_drop=max_drop, latency_budget_ms=latency_budget, batch_size=batch_size, certify=certify,
                          keep_grid=_keep_grid(keep_grid),  # a bad grid is refused before anything loads
                          precision=precision, reference=None if reference is None else str(reference),
                          max_work=max_work, device=device, backend=backend, exit_depths=_exit_depths(exit_depths))
    model, tokenizer, trained, model_dir = _load_checkpoint_for_task(checkpoint, task, {})
    if not trained:
        raise ValueError(f"{checkpoint}: no train_config.json beside the model, so its calibration split is unknown")
    train_config = TrainConfig(**trained)
    config_task(train_config).runner().check_tune(request)  # before a reference run is loaded
    if reference is not None:
        _, _, reference_trained, reference_dir = _load_checkpoint_for_task(reference, task, {})
        _check_same_calibration(checkpoint, trained, reference, reference_trained)
        request.reference_dir = str(reference_dir)
    tune_checkpoint(task, model, tokenizer, model_dir, train_config, request, results, preset=preset, rows=rows,
                    threads=torch.get_num_threads(), log=out.print)


@app.command()
@user_errors
def serve(
    checkpoint: Annotated[Path, typer.Option(help="a run folder (with model/) or a model folder")],
    tuned: Annotated[Optional[Path], typer.Option(help="knobs of a point eat tune chose (tuned_<task>.json)")] = None,
    knob: Annotated[Optional[list[str]], typer.Option(help="EAT knob NAME=VALUE over --tuned (repeatable)")] = None,
    tau: Annotated[Optional[float], typer.Option(help="confidence threshold (sets exit_policy=confidence)")] = None,
    precision: Annotated[str, typer.Option(help="fp32, bf16 or int8 (bf16/int8 need eat.deploy)")] = "fp32",
    backend: Annotated[str, typer.Option(help="torch or onnxruntime (onnxruntime needs eat.deploy)")] = "torch",
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_batch: Annotated[int, typer.Option(help="rows per batch")] = 32,
    max_batch_tokens: Annotated[int, typer.Option(help="padded tokens (rows x longest) per batch")] = 4096,
    max_wait_ms: Annotated[float, typer.Option(
        help="how long the oldest row may wait for a batch to fill (0: start when the model is free)")] = 0.0,
    max_queue: Annotated[int, typer.Option(help="rows waiting at most; beyond: 503 + Retry-After")] = 1024,
    max_rows_per_request: Annotated[int, typer.Option()] = 64,
    max_body_bytes: Annotated[int, typer.Option()] = 1_000_000,
    max_length: Annotated[int, typer.Option(help="tokens per row (longer texts are truncated)")] = 128,
    threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="deploy on Ray Serve instead of one uvicorn process")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="an existing Ray cluster (default: start one)")] = None,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray)")] = 1,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve a checkpoint over HTTP: POST /v1/classify (or /v1/tag), GET /health, GET /metrics, with dynamic
    batching; rows that exit early are answered at once. See docs/serving.md."""
    from .serving import ServeConfig

    config = ServeConfig(max_batch=max_batch, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                         max_queue=max_queue, max_rows_per_request=max_rows_per_request,
                         max_body_bytes=max_body_bytes, max_length=max_length).validate()
    knobs = knobs_from_options(knob, tau)
    load = dict(tuned=tuned, knobs=knobs, precision=precision, backend=backend, threads=threads)
    if ray:
        from .serving.ray_app import serve_on_ray

        serve_on_ray(checkpoint, config=config, address=ray_address, replicas=replicas, host=host, port=port, **load)
        return
    if replicas != 1 or ray_address:
        raise ValueError(f"{'--replicas' if replicas != 1 else '--ray-address'} needs --ray (one uvicorn process "
                         "serves one model)")
    from .serving.app import run_server
    from .serving.model import load_predictor

    run_server(load_predictor(checkpoint, max_length=max_length, **load), config, host=host, port=port,
               log_level=log_level)


@app.command()
@user_errors
def report(results: Annotated[Path, typer.Option("--results", help="results folder")] = Path("results/bench")) -> None:
    """Build report.md and PNG plots from a results folder."""
    from .report import build_report

    path = build_report(results)
    out.print(f"report: {path}")


@app.command()
@user_errors
def run(
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "demo",
    task: Annotated[Optional[str], typer.Option(
        help="sst2, qqp, mnli, qnli, rte, mrpc, cola, stsb, wnli; all (sst2, qqp, mnli); glue (every one); with "
             "--data-file any name for your own table (default: sst2, or 'custom' with --data-file)")] = None,
    runs_dir: Annotated[Optional[Path], typer.Option("--runs", help="checkpoints (default runs/<preset>)")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", help="results (default runs/<preset>/results)")] = None,
    threads: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    train_limit: Annotated[Optional[int], typer.Option(help="override the preset's training rows")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="override the preset's epochs (e.g. 1 for QQP/MNLI)")] = None,
    max_drop: Annotated[Optional[float], typer.Option(
        help="accuracy points the tuned point may lose against static on the calibration split (default: the "
             "preset's)")] = None,
    recipe: Annotated[str, typer.Option(
        help="two-stage (static model, then mean-pooled exit heads on it, frozen), joint (EAT trained from the "
             "backbone with the multi-exit loss) or refit (static, then EAT from it with the backbone unfrozen, "
             "then mean-pooled heads on that backbone, frozen: STS-B's G2)")] = "two-stage",
    certify: Annotated[Optional[float], typer.Option(
        help="confidence (e.g. 0.9) at which the tuner must certify --max-drop (see eat tune --certify)")] = None,
    calibration_unit: Annotated[Optional[str], typer.Option(
        help="row or sentence (default: sentence for SST-2, whose dev set is whole sentences; row otherwise)")] = None,
    length_bucketing: Annotated[Optional[bool], typer.Option(
        "--length-bucketing/--no-length-bucketing",
        help="train on batches of similar length (default: the preset's); a runs folder trained either way is "
             "only resumed the same way")] = None,
    data_file: Annotated[Optional[str], typer.Option(help="your own training table (csv/tsv/jsonl/parquet)")] = None,
    eval_file: Annotated[Optional[str], typer.Option(help="your own dev table (every point is measured on it)")] = None,
    text_column: Annotated[str, typer.Option()] = "text",
    text_pair_column: Annotated[Optional[str], typer.Option()] = None,
    label_column: Annotated[str, typer.Option()] = "label",
    label_kind: Annotated[str, typer.Option(help=LABEL_KIND_HELP)] = "classes",
    metric: Annotated[Optional[str], typer.Option(help=METRIC_HELP)] = None,
    model: Annotated[Optional[str], typer.Option(
        help="backbone path or hub id the three models start from (default: the packaged MiniLM)")] = None,
    ray: Annotated[Optional[str], typer.Option(
        help="schedule on Ray: 'local' (a Ray on this machine), 'auto' or a cluster address; trainings run as Ray "
             "tasks, each timing stage alone on a whole node (docs/scale-out.md)")] = None,
    train_cpus: Annotated[int, typer.Option(help="with --ray: CPUs (and torch threads) per training")] = 1,
) -> None:
    """The main job end to end: train static + EAT + half-depth, tune, sweep, ablate, time, report. Resumable.
    Any GLUE task (each scored by its GLUE metric) or your own table (--data-file, --eval-file)."""
    from .pipeline import run_task, run_task_names, summary_lines
    from .presets import get_preset

    _set_threads(threads)
    get_preset(preset)  # an unknown preset is refused before anything is trained
    tasks = run_task_names(task, own_table=data_file is not None)
    user_data = None if data_file is None else dict(
        data_file=data_file, eval_file=eval_file, text_column=text_column, text_pair_column=text_pair_column,
        label_column=label_column, label_kind=label_kind, metric=metric)
    runs_dir = runs_dir or Path("runs") / preset
    results = results or runs_dir / "results"
    train_overrides = {k: v for k, v in (("train_limit", train_limit), ("epochs", epochs),
                                         ("calibration_unit", calibration_unit), ("length_bucketing", length_bucketing),
                                         ("model", model)) if v is not None} or None
    if ray is not None:
        from .pipeline_ray import run_tasks_ray

        run_tasks_ray(tasks, preset, runs_dir, results, address=ray, train_cpus=train_cpus, log=console.print,
                      run_kwargs=dict(device=device, train_overrides=train_overrides, max_drop=max_drop,
                                      recipe=recipe, certify=certify, user_data=user_data))
        for name in tasks:
            for line in summary_lines(results, name):
                out.print(line)
        out.print(f"report: {results / 'report.md'}")
        return
    for name in tasks:
        with _progress() as bar:
            summary = run_task(name, preset, runs_dir, results, device=device, train_overrides=train_overrides,
                               log=lambda message: console.print(message), progress=_bench_progress(bar),
                               max_drop=max_drop, recipe=recipe, certify=certify, user_data=user_data)
        for line in summary_lines(results, name):
            out.print(line)
        out.print(f"report: {summary['report']}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
