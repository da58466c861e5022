"""Fine-tuning: joint multi-exit loss, self-distillation, pruning-aware training, resumable checkpoints.

A run lives in one output folder:

- ``checkpoint-last/``: the latest resumable state (model, optimizer, scheduler, progress), replaced atomically;
- ``model/``: the finished model (``save_pretrained``, safetensors) with its tokenizer;
- ``train_config.json`` (the :class:`TrainConfig`) and ``train_summary.json`` (time, steps, dev accuracy).

A finished run is never overwritten unless asked (``force``, which also discards an interrupted run and deletes
nothing until the new run has loaded its data, model and teacher); an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed
from .checkpoints import load_classifier, model_folder, read_config_dict
from .configuration_eat import EXIT_POOLINGS, MECHANISMS_OFF
from .data import DataError, TextDataset
from .presets import get_preset
from .tasks import Task, resolve_task
from .modeling_eat import half_depth_layers, keep_layers
from .ner_data import IGNORE

logger = logging.getLogger(__name__)

VARIANTS = ("eat", "static", "half")


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run (saved as ``train_config.json``).

    variant: "eat" (exit heads after ``exit_layers``, joint loss), "static" (the full backbone, one head), or
    "half" (static, every other layer of the backbone: the DistilBERT stand-in).
    """

    task: str = "sst2"  # a GLUE task, "conll2003" (token-level), or a name for your own --data-file
    model: str | None = None  # backbone: path or hub id; None = the packaged MiniLM
    variant: str = "eat"
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 8e-5
    # exit heads' own learning rate (None: learning_rate). Starting from a fine-tuned static model, a low
    # learning_rate keeps its final layer, but early heads copied from the final head then stay at chance
    head_learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 42
    train_limit: int | None = None  # seeded subset of the training rows (demo sizes)
    eval_limit: int | None = None
    calibration_rows: int = 2000  # held out of train for `eat tune` (never trained on); 0 = train on every row
    # "row": calibration_rows random rows; "sentence": that many whole sentences, their phrases held out of
    # training too (SST-2, whose rows are parse-tree phrases and whose dev set is whole sentences)
    calibration_unit: str = "row"
    exit_layers: list[int] | str | None = "all"
    exit_pooling: str = "cls"  # what the exit heads read: "cls", "mean" (of the real tokens) or "pair" (segment means)
    exit_loss_weights: str | list[float] = "depth"  # "depth" (proportional to layer), "uniform", or a list
    distill_weight: float = 1.0  # self-distillation of every exit from the final head (0 = off)
    distill_temperature: float = 2.0
    # a finished run (same calibration slice) whose logits every exit, the last one too, is distilled from
    # instead of this model's own final head; keeps a joint stage started from a good static model near it
    teacher: str | None = None
    train_keep_ratio: float | list[float] = 1.0  # pruning-aware training (keep ratio active while training)
    train_attention_window: int | None = None
    bf16: str = "auto"  # "auto": bf16 autocast on CUDA only; "on"; "off"
    checkpoint_every: int = 400  # optimizer steps between resumable checkpoints
    length_bucketing: bool = False  # batches of similar lengths: faster, but homogeneous batches can cost accuracy
    init_from: str | None = None  # a finished run (or model folder) to start from instead of the backbone
    freeze_backbone: bool = False  # with init_from: train only the exit heads (two-stage schedule)
    data_file: str | None = None  # user data instead of GLUE
    eval_file: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    # your own table: "classes" or "regression" (a real-valued label, e.g. a similarity score), and the metric(s)
    # to report, the first one primary (None: accuracy for classes, Pearson and Spearman for regression)
    label_kind: str = "classes"
    metric: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        runner = config_task(self).runner()  # a known task, or a user's table with a valid label kind and metric
        rates = ("learning_rate",) + (("head_learning_rate",) if self.head_learning_rate is not None else ())
        for name in ("epochs",) + rates:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.batch_size < 1 or self.max_length < 4:
            raise ValueError("batch_size must be >= 1 and max_length >= 4")
        if self.freeze_backbone and (self.init_from is None or self.variant != "eat"):
            raise ValueError("freeze_backbone: needs --init-from (a fine-tuned run) and --variant eat")
        if self.teacher is not None and (self.variant != "eat" or self.freeze_backbone or self.distill_weight <= 0
                                         or not runner.supports_teacher):
            raise ValueError("teacher: needs --variant eat, a distill weight > 0, a sequence task and no "
                             "--freeze-backbone (which distills from its frozen final head already)")
        if self.exit_pooling not in EXIT_POOLINGS:
            raise ValueError(f"exit_pooling: expected one of {', '.join(EXIT_POOLINGS)}, got {self.exit_pooling!r}")
        if self.exit_pooling != "cls" and (self.variant != "eat" or not runner.pooled_exits):
            raise ValueError("exit_pooling: only EAT sequence classifiers have pooled exit heads (token tasks' heads "
                             "read every token)")
        if self.calibration_rows < 0:
            raise ValueError(f"calibration_rows: must be >= 0, got {self.calibration_rows}")
        for name in ("train_limit", "eval_limit"):  # checked here, before training, not when evaluating after it
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1 row, got {getattr(self, name)}")
        runner.check_installed()  # before training: e.g. seqeval for a token task's entity F1
        if self.calibration_unit not in ("row", "sentence"):
            raise ValueError(f"calibration_unit: expected row or sentence, got {self.calibration_unit!r}")
        if self.calibration_unit == "sentence" and not runner.sentence_calibration:
            raise ValueError(f"calibration_unit sentence: {self.task} rows are sentences already; use row")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16: expected auto, on or off, got {self.bf16!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


def train_config_from_preset(preset: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named preset's train settings (:mod:`eat.presets`: smoke, demo, paper) with overrides
    (None values ignored); unknown names are errors."""
    values = {**get_preset(preset).train.overrides(), **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    config = TrainConfig(**values)
    config.validate()
    return config


# ------------------------------------------------------------------------------------------------------- data


def config_task(config: TrainConfig) -> Task:
    """The :class:`~eat.tasks.Task` a training config trains for: the registered task (or the user's tagged
    files for a token task), or the user's own table (``data_file``) described by its columns, ``label_kind`` and
    ``metric``."""
    return resolve_task(config.task, config.data_file is not None, text_column=config.text_column,
                        pair_column=config.text_pair_column, label_column=config.label_column,
                        label_kind=config.label_kind, metrics=config.metric)


def training_data(config: TrainConfig) -> tuple[TextDataset, TextDataset, dict[str, TextDataset]]:
    """(train, calibration, {eval split: dataset}) for a config: GLUE or user files (token tasks: TaggedData),
    by the task's runner (:meth:`eat.runners.TaskRunner.training_data`)."""
    return config_task(config).runner().training_data(config)


# the settings that decide which training rows are held out as the calibration slice
CALIBRATION_FIELDS = ("task", "seed", "calibration_rows", "calibration_unit", "data_file")


def calibration_differences(config: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The calibration settings (as "name: a vs b") in which two saved training configs differ; [] = same slice."""
    def value(saved: dict[str, Any], name: str) -> Any:
        return saved.get(name, "row" if name == "calibration_unit" else None)  # runs saved before units: rows

    return [f"{name}: {value(config, name)} vs {value(other, name)}" for name in CALIBRATION_FIELDS
            if value(config, name) != value(other, name)]


def _check_init_calibration(config: TrainConfig, start: Path, flag: str = "--init-from") -> None:
    """A run started from another run (``init_from``) may only hold out a calibration slice that run held out
    too: otherwise the slice was trained on and tuning on it would flatter the model."""
    saved = start.parent / "train_config.json" if start.name == "model" else start / "train_config.json"
    if config.calibration_rows == 0 or not saved.is_file():
        return  # nothing to tune on, or a plain model folder (a backbone: it never saw this task's rows)
    try:
        other = json.loads(saved.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{flag} {start}: {saved} is not valid JSON ({error})") from None
    differ = calibration_differences(dataclasses.asdict(config), other)
    if differ:
        raise ValueError(f"{flag} {start}: it held out another calibration slice ({', '.join(differ)}), so "
                         "it trained on rows this run would tune on; train both with the same calibration settings")


# ------------------------------------------------------------------------------------------------------ model


def build_model(config: TrainConfig, label_names: tuple[str, ...]):
    """The model to fine-tune for a variant: from the backbone (a token classifier for token tasks), or from the
    finished run ``init_from`` (which must have held out the same calibration slice)."""
    id2label = dict(enumerate(label_names))
    runner = config_task(config).runner()
    token_level = runner.token_level
    source, saved = config.model, {}
    if config.init_from is not None:
        start = model_folder(config.init_from)
        _check_init_calibration(config, start)
        source, saved = str(start), read_config_dict(str(start))
    if config.variant == "eat":
        knobs = dict(exit_layers=config.exit_layers, keep_ratio=config.train_keep_ratio,
                     attention_window=config.train_attention_window)
        if runner.pooled_exits:
            knobs["exit_pooling"] = config.exit_pooling
        saved_pooling = saved.get("exit_pooling", "cls")
        if saved.get("exit_layers") and runner.pooled_exits and saved_pooling != config.exit_pooling:
            # An EAT run whose heads read another pooling: its backbone and final head under fresh heads (copies
            # of the final head) reading this one; its own heads are not loaded. E.g. heads trained jointly with
            # the backbone as "pair", then cheaper "mean" heads fitted on that backbone frozen.
            model = load_classifier(source, id2label=id2label, token_level=token_level,
                                    knobs={**knobs, "exit_layers": None, "exit_pooling": saved_pooling})
            model.config.set_knobs(exit_pooling=config.exit_pooling)
            model.add_exit_heads(config.exit_layers if config.exit_layers is not None else "all")
            return _mark_regression(model)
        return _mark_regression(load_classifier(source, id2label=id2label, knobs=knobs, token_level=token_level))
    if saved.get("exit_layers"):  # a static run trained further (e.g. as long as an EAT run was), never an EAT run
        raise ValueError(f"--init-from {source}: an EAT run with exit heads; a {config.variant} model starts "
                         "from a static run or the backbone")
    model = load_classifier(source, id2label=id2label, token_level=token_level)
    if config.variant == "half":
        model = keep_layers(model, half_depth_layers(model.config.num_hidden_layers))
    return _mark_regression(model)


def _mark_regression(model):
    """Set Hugging Face's ``problem_type`` of a one-output model to "regression" (what it is: MSE loss, and the
    regression exit rules) so the saved config says so."""
    if model.config.num_labels == 1:
        model.config.problem_type = "regression"
    return model


def load_teacher(config: TrainConfig, label_names: tuple[str, ...], device: str):
    """The fixed distillation teacher (``config.teacher``): a finished run that held out the same calibration
    slice and has the same labels, in eval mode with every mechanism off and no gradients."""
    start = model_folder(config.teacher)
    if not (start / "config.json").is_file():
        raise ValueError(f"--teacher {config.teacher}: no model there (expected RUN/model/config.json)")
    _check_init_calibration(config, start, flag="--teacher")
    teacher = load_classifier(str(start), knobs=MECHANISMS_OFF)
    names = tuple(teacher.config.id2label[i] for i in range(len(teacher.config.id2label)))
    if names != tuple(label_names):
        raise ValueError(f"--teacher {config.teacher}: its labels {names} are not this task's {tuple(label_names)}")
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and LayerNorm weights; the intermediate exit heads
    (``exit_heads.*``) at ``head_learning_rate`` when it is set, everything else at ``learning_rate``."""
    no_decay = ("bias", "LayerNorm.weight")
    # without a head rate: the two groups runs have always had (so their saved optimizer state still resumes)
    parts = (False, True) if config.head_learning_rate else (None,)
    groups = []
    for is_head in parts:
        for decays in (True, False):
            params = [p for n, p in model.named_parameters()
                      if (is_head is None or n.startswith("exit_heads.") == is_head) and n.endswith(no_decay) != decays]
            if params:
                groups.append({"params": params, "weight_decay": config.weight_decay if decays else 0.0,
                               "lr": config.head_learning_rate if is_head else config.learning_rate})
    return groups


def exit_weights(spec: str | list[float], exit_layers: tuple[int, ...]) -> torch.Tensor:
    """Loss weight per exit head, summing to 1: "depth" (proportional to the layer), "uniform", or a list."""
    if spec == "depth":
        weights = torch.tensor(exit_layers, dtype=torch.float32)
    elif spec == "uniform":
        weights = torch.ones(len(exit_layers))
    else:
        weights = torch.tensor([float(w) for w in spec])
        if len(weights) != len(exit_layers) or bool((weights < 0).any()):
            raise ValueError(f"exit_loss_weights: need {len(exit_layers)} non-negative weights, got {spec}")
    return weights / weights.sum()


def multi_exit_loss(exit_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    distill_weight: float, temperature: float,
                    teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Joint loss over exits: weighted cross-entropy of every head, plus distillation (KL at ``temperature``,
    the teacher detached) of every earlier head from the final head, or, with ``teacher_logits`` (B, C) from
    another model, of every head including the final one from those. exit_logits: (B, E, C).

    Regression (float ``labels``, C == 1): mean squared error of every head instead, and distillation by MSE on
    the final head's (or the teacher's) value: a real value has no temperature."""
    B, E, C = exit_logits.shape
    if labels.is_floating_point():
        values = exit_logits[..., 0].float()  # (B, E)
        loss = (((values - labels[:, None].float()) ** 2).mean(0) * weights.to(values.device)).sum()
        if distill_weight > 0 and (E > 1 or teacher_logits is not None):
            if teacher_logits is None:
                target, student = values[:, -1:].detach(), values[:, :-1]  # (B, 1), (B, E-1)
            else:
                target, student = teacher_logits.detach().float()[:, :1], values  # (B, 1), (B, E)
            loss = loss + distill_weight * ((student - target) ** 2).mean()
        return loss
    ce = F.cross_entropy(exit_logits.reshape(B * E, C), labels.repeat_interleave(E), reduction="none").view(B, E)
    loss = (ce.mean(0) * weights.to(ce.device)).sum()
    if distill_weight > 0 and (E > 1 or teacher_logits is not None):
        if teacher_logits is None:
            target, student_logits = exit_logits[:, -1:].detach(), exit_logits[:, :-1]  # (B, 1, C), (B, E-1, C)
        else:
            target, student_logits = teacher_logits.detach()[:, None], exit_logits  # (B, 1, C), (B, E, C)
        teacher = (target.float() / temperature).softmax(-1)
        student = (student_logits / temperature).log_softmax(-1)
        kd = F.kl_div(student, teacher.expand_as(student), reduction="none").sum(-1).mean()
        loss = loss + distill_weight * kd * temperature**2
    return loss


def token_multi_exit_loss(exit_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                          distill_weight: float, temperature: float) -> torch.Tensor:
    """:func:`multi_exit_loss` over the labelled tokens: exit_logits (B, E, n, C), labels (B, n) with IGNORE."""
    keep = labels != IGNORE
    per_token = exit_logits.permute(0, 2, 1, 3)[keep]  # (N, E, C)
    return multi_exit_loss(per_token, labels[keep], weights, distill_weight, temperature)


# -------------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a finished run reports (also ``train_summary.json``)."""

    output_dir: str
    model_dir: str
    steps: int
    seconds: float
    train_rows: int
    dev_accuracy: dict[str, float]  # per split, the task's primary metric (``dev_metric``; the name is historical)
    resumed_from_step: int = 0
    dev_metric: str = "accuracy"


class RunFinishedError(RuntimeError):
    """The output folder holds a finished run; pass force to replace it."""


def _atomic_write_json(path: Path, data: Any) -> None:
    from .results import atomic_write_json  # the one atomic writer (unique temp name, fsync, os.replace)

    atomic_write_json(path, data)


def _load_resume_state(model_class, ckpt_dir: Path, device: str):
    """(model, trainer state, optimizer/scheduler/RNG state) of ``checkpoint-last``; a damaged file (a run killed
    while the disk filled, a truncated copy) is a CheckpointError naming it, raised before anything is written."""
    from .checkpoints import CheckpointError

    hint = f"delete {ckpt_dir} or pass --force to start over"
    try:
        model = model_class.from_pretrained(ckpt_dir)
    except Exception as error:  # noqa: BLE001 - safetensors, OSError, torch: one message naming the folder
        raise CheckpointError(f"{ckpt_dir / 'model.safetensors'}: the resumable checkpoint's weights cannot be "
                              f"read ({type(error).__name__}: {error}); {hint}") from None
    try:
        state = json.loads((ckpt_dir / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["global_step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{ckpt_dir / 'trainer_state.json'}: unreadable ({error}); {hint}") from None
    try:
        saved = torch.load(ckpt_dir / "optimizer.pt", map_location=device, weights_only=True)
        missing = {"optimizer", "scheduler", "rng"} - set(saved)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
    except Exception as error:  # noqa: BLE001 - a truncated zip, a missing file, a foreign pickle
        raise CheckpointError(f"{ckpt_dir / 'optimizer.pt'}: the optimizer state cannot be read "
                              f"({type(error).__name__}: {error}); {hint}") from None
    return model, state, saved


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AVX-512 with BF16 or AMX). Without it, bf16 autocast on
    the CPU is emulated: on an AVX2-only EPYC (Zen 3, 2 threads) the static SST-2 `paper` run took 4.5 minutes for
    its first 400 steps in float32 and had not reached them after 19 minutes with bf16 (a Zen 4 with AVX-512 BF16
    runs all 3,498 steps in bf16 in 15 minutes)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def train(config: TrainConfig, output_dir: str | Path, *, force: bool = False, device: str = "cpu",
          progress: Callable[[dict[str, Any]], None] | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Fine-tune according to ``config`` into ``output_dir``; resume if a checkpoint is there.

    progress: called after every step with {"step", "total", "loss", "rows_per_s"} (the CLI draws a bar).
    stop_after_steps: stop (with a checkpoint) after this many steps of this call; used to test resuming.
    """
    config.validate()
    out = Path(output_dir)
    model_dir, ckpt_dir, saved_config = out / "model", out / "checkpoint-last", out / "train_config.json"
    if not force:
        _refuse_other_runs(out, config)

    context = distributed.setup(device)  # under torchrun: this process's rank and device; else one process
    device = context.device
    if not context.is_main:
        progress = None  # one process logs (and saves, below)
    torch.manual_seed(config.seed)
    train_data, calibration_data, evals = training_data(config)
    distributed.check_same(distributed.data_fingerprint(train_data, calibration_data),
                           "the training rows and calibration slice", context)
    from transformers import AutoTokenizer

    backbone = config.model
    if backbone is None:
        from .checkpoints import default_backbone

        backbone = default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    runner = config_task(config).runner()  # the task's level: its encoding, batches, model class and loss
    encoded = runner.encode(train_data, tokenizer, config.max_length)

    resumed_step = 0
    if not force and ckpt_dir.is_dir() and (ckpt_dir / "trainer_state.json").is_file():
        model, state, resume_state = _load_resume_state(runner.model_class, ckpt_dir, device)
        resumed_step = state["global_step"]
        logger.warning("%s: resuming from step %d (checkpoint-last; --force starts over)", out, resumed_step)
    else:
        model, resume_state = build_model(config, train_data.label_names), None
    teacher = load_teacher(config, train_data.label_names, device) if config.teacher is not None else None
    # Only now, with data, model and teacher loaded, is anything in `out` touched: a run refused on the way (a
    # missing --init-from or --teacher, a corrupt checkpoint) leaves no half-made folder, and --force deletes the
    # finished or interrupted run it replaces only once the replacement can start.
    if force and context.is_main:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        (out / "train_summary.json").unlink(missing_ok=True)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(saved_config, dataclasses.asdict(config))
    model.to(device).train()
    distributed.broadcast_parameters(model, context)  # a freshly initialised head starts the same everywhere
    if config.freeze_backbone:
        started = time.perf_counter()
        # a minute's work on cached features: every torchrun process does all of it, rank 0 saves
        step = fit_exit_heads_on_frozen_backbone(model, encoded, config, runner, device, tokenizer.pad_token_id or 0,
                                                 progress)
        return _finish_on_main(context, model, tokenizer, config, out, evals, train_data, encoded, step,
                               time.perf_counter() - started, 0, runner, device)

    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = max(1, int(steps_per_epoch * config.epochs))
    # a resumed run's state was read (and checked) before anything in `out` was touched
    optimizer, scheduler = _optimizer_and_schedule(model, config, total_steps, resume_state)

    exit_layers = model.config.exit_layer_list if config.variant == "eat" else (model.config.num_hidden_layers,)
    weights = exit_weights(config.exit_loss_weights, exit_layers)
    use_bf16 = config.bf16 == "on" or (config.bf16 == "auto" and device.startswith("cuda"))
    if use_bf16 and device == "cpu" and not cpu_has_native_bf16():
        logger.warning("--bf16 on: this CPU has no native bf16 (oneDNN reports none, e.g. AVX2 only), so autocast "
                       "emulates it and training runs several times slower than float32; --bf16 off is faster here")
    started = time.perf_counter()
    step = resumed_step
    rows_done = 0
    stopped_early = False
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        for index, batch in enumerate(runner.batches(encoded, config.batch_size, shuffle=True, seed=config.seed + epoch,
                                                     bucket=config.length_bucketing, pad_id=tokenizer.pad_token_id or 0)):
            if index < skip:
                continue
            global_rows = len(batch["labels"])  # torchrun: every process has the same global batch ...
            batch = {k: v.to(device) for k, v in distributed.local_rows(batch, context).items()}  # ... and keeps its rows
            share = len(batch["labels"]) / global_rows  # its part of the global batch's mean loss
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            if share > 0:  # a short last batch may leave a process no rows; it still joins the all-reduce
                loss = _batch_loss(model, batch, runner, config, weights, teacher, use_bf16, device)
                (loss * share if context.enabled else loss).backward()
            distributed.all_reduce_gradients(model, context)  # summed shares: the global batch's gradient
            if context.enabled:
                loss = torch.tensor(distributed.sum_over_processes(float(loss.detach()) * share, context))
            if config.max_grad_norm > 0:  # 0 = no clipping
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            rows_done += global_rows
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress({"step": step, "total": total_steps, "loss": float(loss.detach()),
                          "rows_per_s": rows_done / max(elapsed, 1e-9)})
            if step % config.checkpoint_every == 0 and step < total_steps and context.is_main:
                _save_checkpoint(model, optimizer, scheduler, step, ckpt_dir, tokenizer)
            if stop_after_steps is not None and step - resumed_step >= stop_after_steps and step < total_steps:
                if context.is_main:
                    _save_checkpoint(model, optimizer, scheduler, step, ckpt_dir, tokenizer)
                stopped_early = True
                break
            if step >= total_steps:
                break
        if stopped_early:
            break
    seconds = time.perf_counter() - started
    if stopped_early:
        distributed.barrier(context)
        distributed.cleanup(context)
        return TrainResult(str(out), "", step, seconds, len(encoded), {}, resumed_step)

    return _finish_on_main(context, model, tokenizer, config, out, evals, train_data, encoded, step, seconds,
                           resumed_step, runner, device)


def _refuse_other_runs(out: Path, config: TrainConfig) -> None:
    """Refuse (before anything loads) a folder holding a finished run, or an interrupted run with other settings
    (RunFinishedError); an unreadable saved config is a DataError. ``--force`` skips this."""
    if (out / "train_summary.json").is_file():
        raise RunFinishedError(f"{out}: holds a finished run (train_summary.json); pass --force to retrain")
    saved_config = out / "train_config.json"
    if (out / "checkpoint-last").is_dir() and saved_config.is_file():
        try:
            previous = json.loads(saved_config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{saved_config}: not valid JSON ({error}); the interrupted run's settings are unknown: "
                            "use --force to start over or another --out") from None
        if previous != dataclasses.asdict(config):
            changed = sorted(k for k in previous if previous.get(k) != dataclasses.asdict(config).get(k))
            raise RunFinishedError(f"{out}: an interrupted run with other settings ({', '.join(changed)}) is "
                                   "here; use another --out or --force")


def _optimizer_and_schedule(model, config: TrainConfig, total_steps: int, resume_state: dict[str, Any] | None):
    """AdamW over :func:`parameter_groups` and a linear warm-up then linear decay to 0 over ``total_steps``; with
    ``resume_state`` both continue where the interrupted run stopped (and so does the RNG: same dropout masks)."""
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.learning_rate)
    warmup = int(total_steps * config.warmup_ratio)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        torch.set_rng_state(resume_state["rng"])
    return optimizer, scheduler


def _batch_loss(model, batch: dict[str, Any], runner, config: TrainConfig, weights: torch.Tensor, teacher,
                use_bf16: bool, device: str) -> torch.Tensor:
    """The joint multi-exit loss of one batch (bf16 autocast when asked), distilled from ``teacher``'s logits when
    there is one (the fixed teacher: eval mode, every mechanism off, no gradients)."""
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
        output = runner.forward(model, batch)
    logits = output.exit_logits.float()  # (B, E, C), token tasks (B, E, n, C)
    extra_loss = {}
    if teacher is not None:  # (B, C)
        with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                                             enabled=use_bf16):
            extra_loss["teacher_logits"] = teacher(batch["input_ids"], batch["attention_mask"],
                                                   batch["token_type_ids"]).logits.float()
    return runner.loss(logits, batch["labels"], weights, config.distill_weight, config.distill_temperature,
                       **extra_loss)


def _finish_on_main(context: distributed.Distributed, model, tokenizer, config: TrainConfig, out: Path, evals,
                    train_data, encoded, step: int, seconds: float, resumed_step: int, runner,
                    device: str) -> TrainResult:
    """:func:`_finish_run` in rank 0 only (the others, holding the same weights, wait for it and report no dev
    figures), then leave the torchrun process group."""
    if context.is_main:
        result = _finish_run(model, tokenizer, config, out, evals, train_data, encoded, step, seconds, resumed_step,
                             runner, device)
    else:
        result = TrainResult(str(out), str(out / "model"), step, seconds, len(encoded), {}, resumed_step)
    distributed.barrier(context)
    distributed.cleanup(context)
    return result


def _finish_run(model, tokenizer, config: TrainConfig, out: Path, evals, train_data, encoded, step: int,
                seconds: float, resumed_step: int, runner, device: str) -> TrainResult:
    """Save the finished model atomically, evaluate it on the dev split(s), write train_summary.json."""
    model_dir, ckpt_dir = out / "model", out / "checkpoint-last"
    model.eval()
    tmp_model_dir = out / "model.tmp"
    shutil.rmtree(tmp_model_dir, ignore_errors=True)
    model.save_pretrained(tmp_model_dir)
    tokenizer.save_pretrained(tmp_model_dir)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp_model_dir, model_dir)

    dev = {name: runner.dev_score(model, tokenizer, data, config.max_length, device) for name, data in evals.items()}
    result = TrainResult(str(out), str(model_dir), step, seconds, len(encoded), dev, resumed_step,
                         runner.task.primary_metric)
    summary = {**dataclasses.asdict(result), "train_source": train_data.source, "train_note": train_data.note,
               "threads": torch.get_num_threads(), "device": device, "torch": torch.__version__}
    _atomic_write_json(out / "train_summary.json", summary)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


@torch.no_grad()
def _frozen_features(model, encoded, runner, device: str, pad_id: int):
    """One pass of the frozen model (eval mode, every mechanism off) over the training rows: the input of every
    exit head ((N, E-1, d): `[CLS]` or mean-pooled vectors, or labelled tokens' vectors for token tasks), the final head's
    logits (N, C) as the distillation teacher, and the labels (N,)."""
    model.eval()
    exit_layers = [layer for layer in model.config.exit_layer_list if layer != model.config.num_hidden_layers]
    captured: dict[int, torch.Tensor] = {}
    hooks = [model.bert.encoder.layer[layer - 1].register_forward_hook(
        lambda module, args, output, layer=layer: captured.__setitem__(layer, output[0])) for layer in exit_layers]
    features, teacher, labels = [], [], []
    saved_knobs = model.config.knobs()
    try:
        model.config.set_knobs(**MECHANISMS_OFF)
        for batch in runner.batches(encoded, 64, bucket=True, pad_id=pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            output = runner.forward(model, batch)
            batch_features, batch_teacher, batch_labels = runner.head_features(model, captured, exit_layers, batch,
                                                                               output)
            features.append(batch_features)
            teacher.append(batch_teacher)
            labels.append(batch_labels)
    finally:
        for hook in hooks:
            hook.remove()
        model.config.set_knobs(**saved_knobs)
    return torch.cat(features), torch.cat(teacher), torch.cat(labels), exit_layers


def fit_exit_heads_on_frozen_backbone(model, encoded, config: TrainConfig, runner, device: str, pad_id: int,
                                      progress=None) -> int:
    """Second stage of a two-stage schedule: the backbone and final head of a fine-tuned model (``init_from``)
    stay exactly as they are; only the exit heads learn, from features computed once by the frozen model (so an
    epoch costs a few matrix products, not a forward pass). Loss: :func:`multi_exit_loss` with the frozen final
    head as the last "head" (its weight is a constant) and as the distillation teacher. Returns steps taken."""
    features, teacher, labels, exit_layers = _frozen_features(model, encoded, runner, device, pad_id)
    heads = [model.exit_heads[str(layer)] for layer in exit_layers]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = [p for head in heads for p in head.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    weights = exit_weights(config.exit_loss_weights, tuple(exit_layers) + (model.config.num_hidden_layers,))
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    total_steps = max(1, int(steps_per_epoch * config.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    generator = torch.Generator().manual_seed(config.seed)
    for head in heads:
        head.train()
    step, started = 0, time.perf_counter()
    while step < total_steps:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size].to(device)
            logits = torch.stack([head(features[index, slot]) for slot, head in enumerate(heads)]
                                 + [teacher[index]], dim=1)  # (b, E, C), the teacher last
            loss = multi_exit_loss(logits, labels[index], weights, config.distill_weight, config.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if progress is not None:
                progress({"step": step, "total": total_steps, "loss": float(loss.detach()),
                          "rows_per_s": step * config.batch_size / max(time.perf_counter() - started, 1e-9)})
            if step >= total_steps:
                break
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.eval()
    return step


def _save_checkpoint(model, optimizer, scheduler, step: int, ckpt_dir: Path, tokenizer) -> None:
    """Write the resumable state to a temporary folder, then swap it in (a crash never leaves half a checkpoint)."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "optimizer.pt")  # dropout masks continue as if never stopped
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["TrainConfig", "train_config_from_preset", "train", "TrainResult", "RunFinishedError",
           "multi_exit_loss", "token_multi_exit_loss", "exit_weights", "build_model", "training_data", "VARIANTS"]
