"""Benchmarking: operating points measured side by side (accuracy and latency from the same calls), ablation grid,
threshold / keep-ratio / window sweeps, and operating-point selection on a calibration split.

An *operating point* is a checkpoint plus EAT knobs. :func:`measure_points` loads every point, times batch-1 calls
interleaved over the same examples (one pass = accuracy and latency of each point), then batch-B throughput on the
same batches (also interleaved, batch by batch), and appends one row per point to a
:class:`~eat.results.ResultsLog`. Points already in the log (same configuration hash) are skipped unless ``force``
(finished results are never redone or overwritten by a resumed run); every row carries the ``run_id`` of the
interleaved run it came from, so a comparison can insist on points measured side by side. Every row comes from its
own measurement, never a copy."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoints import load_classifier
from .deploy import BACKENDS
from .deploy.quantize import apply_precision
from .configuration_eat import MECHANISMS_OFF
from .data import EncodedDataset, batches, collate, encode, padding_share
from .evaluation import Predictions, classification_metrics, exits_at_threshold, predict_encoded
from .modeling_eat import EATForSequenceClassification
from .results import (HALF_DEPTH, STATIC, THROUGHPUT, THROUGHPUT_SORTED, ResultsLog, atomic_write_json, config_hash,
                      new_run_id)
from .bootstrap import bootstrap_indices, paired_bootstrap_drop
from .configuration_eat import REGRESSION_EXIT_POLICIES
from .presets import get_preset
from .runners import runner_for
from .tasks import Task, task_for_model
from .timing import LatencyStats, environment, interleaved_latency, interleaved_throughput

MECHANISMS = ("prune", "sparse", "exit")


# exit thresholds swept and tuned on by default (steps of 0.01); `tune --certify` walks CERTIFY_TAU_GRID
TAU_GRID: tuple[float, ...] = tuple(round(x, 3) for x in np.linspace(0.5, 1.0, 51))


@dataclass
class BenchConfig:
    """How to measure (saved as JSON beside the results).

    rows: a seeded sample of the eval split for batch-1 timing (None = every example). Accuracy of each point is
    computed on the same rows its latency was measured on.
    """

    task: str = "sst2"
    split: str | None = None  # default: the task's first eval split
    rows: int | None = None
    seed: int = 0
    max_length: int = 128
    batch_size: int = 32  # throughput batch size
    warmup: int = 10
    throughput_repeats: int = 2
    # also time throughput on length-sorted batches: a server that buckets by length pays little padding, and an
    # exiting model's batch speedup in arrival order is partly padding it trimmed (benchmarks/batch_order.py)
    sorted_throughput: bool = True
    device: str = "cpu"
    threads: int | None = None
    prune_keep_ratio: float | list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.6])
    attention_window: int = 16
    tau: float = 0.9
    exit_policy: str = "confidence"
    tau_grid: list[float] = dataclasses.field(default_factory=lambda: list(TAU_GRID))
    tau_latency_points: list[float] = dataclasses.field(default_factory=lambda: [0.7, 0.8, 0.9, 0.95, 0.99])
    keep_sweep: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5])
    window_sweep: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 32])


def bench_config_from_preset(preset: str, **overrides: Any) -> BenchConfig:
    """A BenchConfig from a named preset's bench settings (:mod:`eat.presets`) with overrides (None values
    ignored); unknown presets are errors."""
    return BenchConfig(**{**get_preset(preset).bench.overrides(), **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class OperatingPoint:
    """A checkpoint plus knobs, named for tables. role: baseline, ablation, tau, keep, window, tuned."""

    name: str
    checkpoint: str
    knobs: dict[str, Any] = field(default_factory=dict)
    role: str = "ablation"
    model_label: str = "eat"
    backend: str = "torch"  # "torch" or "onnxruntime" (eat.deploy): a peer of the same point deployed otherwise
    precision: str = "fp32"  # "fp32", "bf16" or "int8"

    def mechanisms(self) -> dict[str, bool]:
        """Which mechanisms this point switches on."""
        keep = self.knobs.get("keep_ratio", 1.0)
        keeps = keep if isinstance(keep, list) else [keep]
        return {"prune": any(float(k) < 1.0 for k in keeps),
                "sparse": self.knobs.get("attention_window") is not None,
                # a depth cap stops rows at a head too (every row, with exit_policy "none")
                "exit": (self.knobs.get("exit_policy", "none") != "none"
                         or self.knobs.get("exit_depth") is not None)}


def mechanism_knobs(bench: BenchConfig, prune: bool, sparse: bool, exit_: bool,
                    tau: float | None = None, keep: float | list[float] | None = None,
                    policy: str | None = None, patience: int | None = None) -> dict[str, Any]:
    """EAT knobs that switch each mechanism on or off (ablations are knob toggles, nothing else).

    A ``keep`` that prunes nothing (a tuned point that chose no pruning) cannot stand for the pruning mechanism:
    the bench's own keep schedule is used instead, so a "prune" row always prunes.
    """
    if keep is None or all(float(r) >= 1.0 for r in (keep if isinstance(keep, (list, tuple)) else [keep])):
        keep = bench.prune_keep_ratio
    knobs = {"keep_ratio": keep if prune else 1.0,
             "attention_window": bench.attention_window if sparse else None,
             # a tuned point with exits off has no rule to lend the exit rows: the bench's rule is used then
             "exit_policy": (policy if policy not in (None, "none") else bench.exit_policy) if exit_ else "none",
             "exit_threshold": tau if tau is not None else bench.tau,
             "exit_layers": "all" if exit_ else None}
    if knobs["exit_policy"] in ("agreement", "patience") + REGRESSION_EXIT_POLICIES:
        knobs["exit_patience"] = patience or 2
    return knobs


def ablation_points(eat_checkpoint: str, bench: BenchConfig, *, static_checkpoint: str | None = None,
                    half_checkpoint: str | None = None, tau: float | None = None,
                    keep: float | list[float] | None = None, policy: str | None = None,
                    patience: int | None = None) -> list[OperatingPoint]:
    """The 8 on/off combinations of the three mechanisms on the EAT checkpoint, plus the static baselines."""
    points = []
    for prune, sparse, exit_ in itertools.product((False, True), repeat=3):
        on = [name for name, flag in zip(MECHANISMS, (prune, sparse, exit_)) if flag]
        name = "eat:" + ("+".join(on) if on else "none")
        points.append(OperatingPoint(name, eat_checkpoint,
                                     mechanism_knobs(bench, prune, sparse, exit_, tau, keep, policy, patience),
                                     "ablation"))
    if static_checkpoint:
        points.append(OperatingPoint(STATIC, static_checkpoint, {}, "baseline", "static"))
    if half_checkpoint:
        points.append(OperatingPoint(HALF_DEPTH, half_checkpoint, {}, "baseline", "half"))
    return points


def sweep_points(eat_checkpoint: str, bench: BenchConfig) -> list[OperatingPoint]:
    """Real-latency points of the sweeps: tau (exit only), keep ratio (pruning only), window (sparse only)."""
    points = [OperatingPoint(f"tau={tau}", eat_checkpoint, mechanism_knobs(bench, False, False, True, tau=tau), "tau")
              for tau in bench.tau_latency_points]
    points += [OperatingPoint(f"keep={keep}", eat_checkpoint, mechanism_knobs(bench, True, False, False, keep=keep),
                              "keep") for keep in bench.keep_sweep]
    for window in bench.window_sweep:
        knobs = {**mechanism_knobs(bench, False, True, False), "attention_window": window}
        points.append(OperatingPoint(f"window={window}", eat_checkpoint, knobs, "window"))
    return points


# ------------------------------------------------------------------------------------------------- measuring


def _point_hash(point: OperatingPoint, bench: BenchConfig, dataset_source: str, rows: int, env: dict,
                all_rows: int | None = None, objective: str | None = None) -> str:
    checkpoint = Path(point.checkpoint)
    config_text = (checkpoint / "config.json").read_text() if (checkpoint / "config.json").is_file() else point.checkpoint
    # all_rows and objective only enter the hash when given, so rows measured without them keep their hashes
    return config_hash({"checkpoint": str(checkpoint.resolve()) if checkpoint.exists() else point.checkpoint,
                        "checkpoint_config": config_text, "knobs": point.knobs, "task": bench.task,
                        "split": bench.split, "rows": rows, "source": dataset_source, "seed": bench.seed,
                        "max_length": bench.max_length, "batch_size": bench.batch_size, "device": env["device"],
                        "threads": env["threads"], "cpu": env["cpu"], "name": point.name,
                        **({"all_rows": all_rows} if all_rows is not None else {}),
                        **({"objective": objective} if objective is not None else {}),
                        # peers only: rows of eager fp32 points keep their hashes
                        **({"backend": point.backend, "precision": point.precision}
                           if (point.backend, point.precision) != ("torch", "fp32") else {})})


def load_point(point: OperatingPoint, device: str, token_level: bool = False) -> EATForSequenceClassification:
    """The model of an operating point, knobs applied, in eval mode on ``device`` (``token_level``: a token
    classifier); a point on another backend or precision (a peer) through :func:`eat.deploy.load_for_inference`
    (called the same way)."""
    if (point.backend, point.precision) != ("torch", "fp32"):
        from .deploy import load_for_inference

        return load_for_inference(point.checkpoint, knobs=point.knobs, precision=point.precision,
                                  backend=point.backend, **({"token_level": True} if token_level else {})).to(device)
    return load_classifier(point.checkpoint, knobs=point.knobs, token_level=token_level).to(device).eval()


def _unmeasured(points, bench: BenchConfig, dataset_source: str, rows: int, env: dict, log: ResultsLog,
                force: bool, all_rows: int | None = None,
                objective: str | None = None) -> list[tuple[OperatingPoint, str]]:
    """(point, configuration hash) of the points to measure: none when every point is in the log already, else
    all of them. Ratios are only valid between points timed side by side in one interleaved run, so a table with
    one new point is measured again as a whole (the old rows are replaced, not duplicated)."""
    hashes = [(point, _point_hash(point, bench, dataset_source, rows, env, all_rows, objective)) for point in points]
    if not force and _complete_table(log, [hash_ for _, hash_ in hashes]):
        return []
    return hashes


def _complete_table(log: ResultsLog, hashes: Sequence[str]) -> bool:
    """Whether every point of a table is logged and all of them come from one interleaved run (one ``run_id``).
    A table whose rows come from several runs (a ``--force`` re-measure of some of its points, or another command's
    re-measure of a shared point) is not comparable as ratios, so it counts as unmeasured."""
    logged = {row["config_hash"]: row.get("run_id") for row in log.rows()}
    return all(hash_ in logged for hash_ in hashes) and len({logged[hash_] for hash_ in hashes}) <= 1


def _identity_fields(point: OperatingPoint, model, bench: BenchConfig, rows: int, dataset_source: str,
                     env: dict, run_id: str) -> dict[str, Any]:
    """What a results row says about what was measured and where (everything but the measurements)."""
    return {"run_id": run_id, "task": bench.task, "split": bench.split, "point": point.name, "role": point.role,
            "model": point.model_label, "checkpoint": point.checkpoint, "layers": model.config.num_hidden_layers,
            "backend": point.backend, "precision": point.precision,
            **{f"mech_{k}": v for k, v in point.mechanisms().items()},
            "knobs": model.config.knobs(),
            "tau": point.knobs.get("exit_threshold") if point.mechanisms()["exit"] else None,
            "rows": rows, "dataset": dataset_source, "seed": bench.seed, "batch_size_latency": 1,
            "batch_size_throughput": bench.batch_size, **env}


def measure_points(points: Sequence[OperatingPoint], encoded, bench: BenchConfig, log: ResultsLog, *,
                   dataset_source: str, f1: bool = False, force: bool = False, pad_id: int = 0,
                   examples_dir: Path | None = None, extra: dict[str, Any] | None = None,
                   progress: Callable[[str, int, int], None] | None = None,
                   all_rows: EncodedDataset | None = None, objective: str | None = None,
                   task: Task | None = None, data=None) -> list[dict[str, Any]]:
    """Measure every point not yet logged: batch-1 latency (interleaved) + accuracy from those calls, then
    throughput at ``bench.batch_size`` in arrival order (``throughput_rows_per_s``) and, with
    ``bench.sorted_throughput``, on the same rows in length-sorted batches (``throughput_sorted_rows_per_s``, with
    the padding share of both orders). Appends and returns the new rows.

    What a call leaves behind and how a row is scored depends on the task's level; its runner's
    :meth:`~eat.runners.TaskRunner.measurement` does that part, this function the timing. A token task
    (``encoded`` from :func:`eat.ner_data.encode_tagged`, ``data`` its sentences) is timed per chunk and scored by
    entity F1 over whole sentences (``metric_value`` and ``accuracy`` hold it, ``metric`` says so), its exit layers
    per word, its ``token_layer_fraction`` query token-layers over the static model's (no length-sorted pass). A
    peer point (another ``backend`` / ``precision``) of either level is loaded by :func:`load_point` and timed and
    scored like any other point of the run.

    ``all_rows``: the whole split when ``encoded`` is a sample of it. Every point then also predicts all of it
    (untimed, length-bucketed batches) and its row gets ``accuracy_all_rows`` (``f1_all_rows``) and
    ``rows_all``: an accuracy drop on a few thousand timed rows can be a few tenths off the whole split's.
    ``objective``: what this table was measured for (e.g. ``"tune-b32"``, the batch-32 tuner's dev report). It
    enters the configuration hash, so two tables that share a point name and settings (both tuners' ``eat:none``)
    do not replace each other's rows in one results folder.

    ``task``: score with the task's metrics; each row then carries ``metric`` (the primary metric's name),
    ``metric_value``, every metric by name (``accuracy`` only when it is one), ``metric_value_batched`` and, with
    ``all_rows``, ``metric_value_all_rows``. Without it: the registered task of ``bench.task`` when its head
    matches the model's (Pearson for any one-output model), else accuracy (and F1 with ``f1``), as rows always
    had."""
    env = environment(bench.device)
    rows = len(encoded)
    todo = _unmeasured(points, bench, dataset_source, rows, env, log, force,
                       None if all_rows is None else len(all_rows), objective)
    if not todo:
        return []
    runner = runner_for(task)
    if all_rows is not None and not runner.supports_all_rows:
        raise ValueError(f"{runner.name}: scores on all rows are for sentence-level tasks only")
    run_id = new_run_id()  # the interleaved run these rows come from
    models = {point.name: load_point(point, bench.device, token_level=runner.token_level) for point, _ in todo}
    measured = runner.measurement(encoded, bench=bench, pad_id=pad_id, data=data, f1=f1, all_rows=all_rows,
                                  examples_dir=examples_dir)
    measured.start(models)
    latency = interleaved_latency({name: measured.call(m) for name, m in models.items()}, measured.singles(),
                                  warmup=bench.warmup, device=bench.device, on_result=measured.record,
                                  progress=(lambda i, n: progress("batch 1", i, n)) if progress else None)
    # throughput: the same batches (arrival order, not length-sorted) for every point
    batched = measured.batched(bucket=False)
    batch_timing = interleaved_throughput({name: measured.batch_call(name, m) for name, m in models.items()},
                                          batched, rows, device=bench.device, repeats=bench.throughput_repeats)
    sorted_fields: dict[str, dict[str, float]] = {name: {} for name in models}
    if bench.sorted_throughput and runner.supports_sorted_throughput:
        # the same rows cut into length-sorted batches (predictions are not kept: the arrival-order ones are)
        sorted_batched = measured.batched(bucket=True)
        sorted_timing = interleaved_throughput({name: batch_forward(m) for name, m in models.items()}, sorted_batched,
                                               rows, device=bench.device, repeats=bench.throughput_repeats)
        padding = {"padding_share_arrival": padding_share(batched),
                   "padding_share_sorted": padding_share(sorted_batched)}
        sorted_fields = {name: {THROUGHPUT_SORTED: sorted_timing[name][0], **padding} for name in models}
    measured.finish(models, progress)
    new_rows = []
    for point, hash_ in todo:
        model = models[point.name]
        rows_per_s, batch_latency = batch_timing[point.name]
        new_rows.append({
            **_identity_fields(point, model, bench, rows, dataset_source, env, run_id),
            **measured.scores(point.name),
            **latency[point.name].as_dict("b1_"), THROUGHPUT: rows_per_s, **sorted_fields[point.name],
            **batch_latency.as_dict(f"b{bench.batch_size}_batch_"),
            **measured.exit_fields(point.name, model),
            "work": dataclasses.asdict(measured.work[point.name]),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config_hash": hash_, **(extra or {}),
            **measured.trailing(point.name, hash_, run_id),
        })
    # the whole table in one atomic append: a run killed before it leaves the old table whole, never a mix
    log.append_rows(new_rows, replace=True)
    return new_rows


# ---------------------------------------------------------------------------------------------- sweeps, tuning


def tau_sweep(model: EATForSequenceClassification, encoded: EncodedDataset, taus: Sequence[float], *,
              policy: str = "confidence", device: str = "cpu", pad_id: int = 0, f1: bool = False,
              reference_correct: np.ndarray | None = None, task: Task | None = None, patience: int = 2,
              keep_predictions: bool = False, batch_size: int = 64) -> list[dict]:
    """Accuracy and mean exit layer at every threshold from ONE cached pass (every head evaluated, no exits).

    ``reference_correct`` (N,) bool, whether a reference model got each row right: each row then also counts the
    discordant rows, ``rows_worse`` (reference right, this threshold wrong) and ``rows_better`` (the reverse), from
    which :func:`drop_upper_bound` bounds the accuracy drop.

    ``task``: score each threshold with the task's metrics (``metric`` names the primary one, ``metric_value``
    holds it); regression rules ("delta", "spread") take ``patience``. ``keep_predictions``: each row also holds
    its (N,) predictions as ``_predicted`` (for a bootstrap bound; not for files). ``batch_size``: rows per call
    of the cached pass.
    """
    cached = predict_encoded(model, encoded, device=device, cache_exits=True, pad_id=pad_id, batch_size=batch_size)
    return replay_sweep(cached, taus, policy=policy, f1=f1, reference_correct=reference_correct, task=task,
                        patience=patience, keep_predictions=keep_predictions)


def replay_sweep(cached: Predictions, taus: Sequence[float], *, policy: str = "confidence", f1: bool = False,
                 reference_correct: np.ndarray | None = None, task: Task | None = None, patience: int = 2,
                 keep_predictions: bool = False, exit_depth: int | None = None,
                 first_head: int | None = None) -> list[dict]:
    """:func:`tau_sweep`'s rows from a cached pass (``predict_encoded(..., cache_exits=True)``): the rule replayed
    at every threshold. ``exit_depth``: replay the model capped there (the knob of the same name): the heads after
    it are never read and every row still running leaves at it. ``first_head``: the rule reads the heads from this
    layer on (the model run with ``exit_layers`` from it); each row then names the heads read in ``exit_heads``."""
    exit_logits, exit_layers = cached.exit_logits, tuple(cached.exit_layers)
    if exit_depth is not None:
        if exit_depth not in exit_layers:
            raise ValueError(f"exit_depth {exit_depth} is not one of the cached heads {exit_layers}")
        heads = exit_layers.index(exit_depth) + 1
        exit_logits, exit_layers = exit_logits[:, :heads], exit_layers[:heads]
    skipped = first_head is not None and first_head > exit_layers[0]
    if skipped:
        if first_head not in exit_layers:
            raise ValueError(f"first_head {first_head} is not one of the cached heads {exit_layers}")
        start = exit_layers.index(first_head)
        exit_logits, exit_layers = exit_logits[:, start:], exit_layers[start:]
    labels = cached.labels
    rows = []
    lengths = cached.input_length
    for tau in taus:
        chosen, layers = exits_at_threshold(exit_logits, exit_layers, policy, tau, patience)
        predictions = chosen.argmax(-1) if task is None else task.predictions(chosen)
        # token-layers this threshold would cost, from the cached per-layer token counts
        ran = np.arange(1, cached.tokens_per_layer.shape[1] + 1)[None, :] <= layers[:, None]
        token_layers = float((cached.tokens_per_layer * ran).sum() / (lengths.sum() * ran.shape[1]))
        scores = (classification_metrics(labels, predictions, f1) if task is None else
                  {"metric": task.primary_metric, "metric_value": task.primary(labels, predictions),
                   **task.score(labels, predictions)})
        row = {"tau": float(tau), **scores,
               "mean_exit_layer": float(layers.mean()), "token_layer_fraction": token_layers,
               "exit_layers_used": sorted(int(layer) for layer in np.unique(layers))}
        if exit_depth is not None:
            row["exit_depth"] = int(exit_depth)
        if skipped:
            row["exit_heads"] = [int(layer) for layer in exit_layers]
        if reference_correct is not None:
            row.update(discordant_rows(reference_correct, predictions == labels))
        if keep_predictions:
            row["_predicted"] = predictions
        rows.append(row)
    return rows


def discordant_rows(reference_correct: np.ndarray, correct: np.ndarray) -> dict[str, int]:
    """The paired counts :func:`drop_upper_bound` needs, from (N,) bools: ``rows_worse`` (the reference right,
    this model wrong) and ``rows_better`` (the reverse)."""
    return {"rows_worse": int((reference_correct & ~correct).sum()),
            "rows_better": int((~reference_correct & correct).sum())}


def drop_upper_bound(rows_worse: int, rows_better: int, rows: int, confidence: float) -> float:
    """One-sided upper confidence bound, in accuracy points, on how far a model falls below a reference on rows
    drawn like these, from paired counts (exact McNemar-style bound).

    Only discordant rows move the difference: of ``m = rows_worse + rows_better`` of them, each is a "worse" row
    with some probability p, and the drop is ``(2p - 1) * m / rows``. p gets its one-sided Clopper-Pearson upper
    bound at ``confidence`` (conditional on m, as McNemar's exact test). No discordant row: the bound is 0.
    """
    from scipy.stats import beta  # scipy comes with scikit-learn

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    discordant = rows_worse + rows_better
    if discordant == 0:
        return 0.0
    p_upper = 1.0 if rows_worse == discordant else float(beta.ppf(confidence, rows_worse + 1, rows_better))
    return 100.0 * (2.0 * p_upper - 1.0) * discordant / rows


def certified_prefix(sweep: list[dict], max_drop: float, rows: int, confidence: float,
                     bound: Callable[[dict], float] | None = None, strict_first: bool = False) -> list[dict]:
    """Fixed-sequence testing over one threshold sweep (Learn-then-Test, as in CALM): walk the thresholds from the
    strictest (highest tau, closest to the reference) to the loosest and keep each while its drop's upper bound is
    at most ``max_drop``; stop at the first that fails. Every kept threshold then meets ``max_drop`` with
    probability >= ``confidence`` jointly, without paying for the many thresholds looked at. Each row gets its
    ``drop_upper_bound``.

    ``bound``: the row's upper bound at ``confidence`` when the exact paired accuracy bound does not apply (a
    paired bootstrap for Matthews, F1 or Pearson); ``strict_first``: the lowest tau is the strictest (regression
    rules, whose tau is how much the heads may still move)."""
    certified = []
    for row in sorted(sweep, key=lambda r: r["tau"] if strict_first else -r["tau"]):
        row["drop_upper_bound"] = (bound(row) if bound is not None else
                                   drop_upper_bound(row["rows_worse"], row["rows_better"], rows, confidence))
        if row["drop_upper_bound"] > max_drop:
            break
        certified.append(row)
    return certified


# the thresholds `tune --certify` walks (strict to loose): fixed-sequence testing pays nothing for more of them, and
# between 1.0 and 0.99 the mean exit layer of a confident model already falls from 6 to about 3, so the top tenth
# is walked in steps of 0.001. The point-estimate tuner keeps steps of 0.01: each extra threshold there is one more
# chance for a lucky dip.
CERTIFY_TAU_GRID: tuple[float, ...] = tuple(sorted({round(x, 3) for x in np.linspace(0.5, 0.9, 41)}
                                                   | {round(x, 3) for x in np.linspace(0.9, 1.0, 101)}))


def tuning_tau_grid(num_labels: int, certified: bool) -> list[float]:
    """The thresholds :func:`tune` walks when given none: :data:`CERTIFY_TAU_GRID` with ``certified``, else
    :data:`TAU_GRID`. With more than two classes a head's top probability can be as low as 1 / classes, so the grid
    then also covers chance to 0.5 in steps of 0.01 (e.g. 0.34-0.49 for MNLI's three classes)."""
    base = CERTIFY_TAU_GRID if certified else TAU_GRID
    if num_labels <= 2:
        return list(base)
    return sorted({k / 100 for k in range(100 // num_labels + 1, 50)} | set(base))


# the regression rules `tune` walks by default ("rule:patience"): PABEE's change rule over 2 and 3 heads, and the
# band rule over 3 heads (over 2 heads it is the change rule)
REGRESSION_TUNE_POLICIES: tuple[str, ...] = ("delta:2", "delta:3", "spread:3")


def regression_tau_grid(labels: Sequence[float], certified: bool = False) -> list[float]:
    """Thresholds for the regression exit rules, in the label's units: 0.5% to 50% of the labels' standard
    deviation (STS-B: about 0.008 to 0.77 on its 0-5 scale); 60 steps when certifying (fixed-sequence testing pays
    nothing for more), else 30. Geometric, so small thresholds, where the rules are strict, are walked finely."""
    scale = float(np.std(np.asarray(labels, dtype=np.float64))) or 1.0
    steps = 60 if certified else 30
    return sorted({float(f"{scale * x:.4g}") for x in np.geomspace(0.005, 0.5, steps)})


def exit_depth_grid(num_layers: int, exit_depths: Sequence[int] | str | None = "all") -> list[int]:
    """The depth caps :func:`tune` searches, ascending, always ending with ``num_layers`` (no cap): "all" = every
    layer from 2 on (a cap at 1 is a one-layer model), None = no cap only, or the layers given (:func:`tune`
    resolves its "auto" first)."""
    if exit_depths is None:
        return [num_layers]
    if isinstance(exit_depths, str):
        if exit_depths != "all":
            raise ValueError(f"exit_depths: 'all', None or a list of layers, not {exit_depths!r}")
        return list(range(2, num_layers + 1))
    depths = sorted({int(d) for d in exit_depths} | {num_layers})
    if depths[0] < 1 or depths[-1] > num_layers:
        raise ValueError(f"exit_depths: layers within 1..{num_layers}, got {list(exit_depths)}")
    return depths


def rule_sweeps(policies: Sequence[str], depths: Sequence[int],
                first_heads: Sequence[int] = (1,)) -> list[tuple[str, int, int, int]]:
    """(policy, patience, first head, cap) of every threshold sweep :func:`tune` walks per keep schedule:
    ``policies`` as "rule" or "rule:patience" (patience default 2), each from every first head in ``first_heads``
    to every cap in ``depths`` that leaves the rule room to fire before the cap (more heads than the rule reads at
    once: one for confidence and entropy, else ``patience``; with fewer the rule only ever answers at the cap,
    which the truncation at that cap does without the heads before it). The last of ``depths`` (no cap) is always
    walked from the first head: the uncapped sweep of every rule."""
    sweeps = []
    for entry in policies:
        policy, _, patience_text = entry.partition(":")
        patience = int(patience_text) if patience_text else 2
        needs = 1 if policy in ("confidence", "entropy") else patience
        for first in sorted(set(first_heads)):
            for depth in depths:
                if depth - first + 1 > needs or (first == 1 and depth == depths[-1]):
                    sweeps.append((policy, patience, first, depth))
    return sweeps


# the keep schedules `tune` searches by default: no pruning, then from mild to strong
TUNE_KEEP_GRID: tuple[float | list[float], ...] = (1.0, [1.0, 0.8], [0.9, 0.7], [0.9, 0.6], [0.8, 0.5])


@dataclass
class TuneResult:
    """The chosen operating point and how it was chosen (all on the calibration split)."""

    knobs: dict[str, Any]
    calibration_accuracy: float
    reference_accuracy: float
    calibration_p50_ms: float | None
    candidates: list[dict[str, Any]]
    criterion: str
    certify: float | None = None  # the joint confidence of the drop bound, when the tuner certified its choice
    drop_upper_bound: float | None = None  # the chosen point's certified bound on the drop (accuracy points)
    keep_grid: list[Any] | None = None  # the keep schedules searched
    # what calibration_accuracy / reference_accuracy hold (the task's primary metric; the field names are historical)
    metric: str = "accuracy"
    drop_interval: dict[str, Any] | None = None  # metrics other than accuracy: the chosen drop's paired bootstrap


def tune(checkpoint: str, calibration: EncodedDataset, *, precision: str = "fp32", max_drop: float | None = None,
         latency_budget_ms: float | None = None, keep_grid: Sequence[float | list[float]] = TUNE_KEEP_GRID,
         tau_grid: Sequence[float] | None = None, timing_rows: int = 150, device: str = "cpu", pad_id: int = 0,
         warmup: int = 5, policies: Sequence[str] | None = None,
         reference_checkpoint: str | None = None, batch_size: int = 1, certify: float | None = None,
         task: Task | None = None, backend: str = "torch",
         exit_depths: Sequence[int] | str | None = "auto", first_heads: Sequence[int] | None = None) -> TuneResult:
    """Pick the exit rule (``policies``: confidence, or agreement of the last two heads plus confidence), ``tau``
    and a keep schedule on the calibration split.

    ``max_drop``: the fastest point whose calibration accuracy is at most ``max_drop`` points below the same
    checkpoint with every mechanism off, in PyTorch fp32 even when the tuned model is int8 or on ONNX Runtime (so
    the quantization's own cost is inside the drop), or below ``reference_checkpoint`` (e.g. the static model the
    targets compare with, which must have held out the same calibration rows). ``latency_budget_ms``: the most accurate point whose measured batch-1
    median fits the budget. For each keep schedule the smallest qualifying tau comes from one cached pass
    (exact); the finalists are then timed side by side on ``timing_rows`` calibration examples.

    ``batch_size`` > 1 (with ``max_drop``): "fastest" means the highest throughput on batches of that many
    calibration rows (at least :data:`THROUGHPUT_TIMING_BATCHES` batches, arrival order, the same batches for
    every finalist, best of 3 passes taken in turns) instead of the batch-1 median: the operating point for
    batched serving, where pruning pays.

    ``certify`` (e.g. 0.9, with ``max_drop``): a threshold qualifies only if the drop is at most ``max_drop`` with
    that probability for rows drawn like the calibration rows, not merely on them: the exact paired bound of
    :func:`drop_upper_bound`, fixed-sequence over each sweep's thresholds (:func:`certified_prefix`), the error
    split evenly (Bonferroni) over the ``len(keep_grid) * len(policies)`` sweeps and, with a reference run, the
    exits-off point (which must itself be certified, or there is nothing to choose). Without it the smallest
    qualifying tau is picked on the point estimate, which on a few thousand rows is often a lucky dip.

    Finalists timed within :data:`TIMING_TIE` of the fastest are a tie, broken by the least token-layer work
    (:func:`fastest_within_noise`).

    ``exit_depths``: the depth caps searched (:func:`exit_depth_grid`; the ``exit_depth`` knob): each rule's
    thresholds are walked with the pass capped at every one of them (the model's depth = no cap), and every cap
    is also a candidate with no rule (every row leaves there). ``first_heads``: the rule reads the heads from each
    of these layers on (those before are not evaluated: at batch 1 a head costs a third of a layer or more, and a
    rule comparing heads gains little from the weakest, first ones). Per rule and first head the qualifying
    threshold with the least work over every cap is a finalist. A cap pays where a middle
    head is as good as the last (STS-B's frozen heads: layer 4 scores above layer 6): the rows that never settle
    stop there instead of running every layer. Each (keep, rule, cap) sweep is one test of the ``certify``
    correction, as is each first head.

    Defaults: "auto" searches the caps for a regression model only; a classifier walks its rules uncapped from the
    first head unless asked (``exit_depths="all"``). Every sweep is one more chance for a lucky dip on the
    calibration rows, and a cap adds room: on the SST-2 demo (500 calibration rows) the layer-5 head scored 0.6
    points above the last there, the point-estimate tuner spent that room on a lower threshold, and its point was
    3.2 points below static on dev; with ``certify`` every sweep costs the others confidence (Bonferroni).
    ``first_heads`` (None): (1, 2, 3) when caps are searched, else (1,).

    ``backend`` "onnxruntime" (with ``precision`` fp32 or int8): the model is the one `eat.deploy` runs on ONNX
    Runtime; its cached sweep runs in batches of ``batch_size`` (dynamic int8 quantizes each call's activations
    with one scale, so a row's outputs depend on its batch mates: the sweep sees what the deployment computes)
    and the finalists are timed on it (the batch-1 exit cascade where the knobs allow, the segments otherwise).

    ``task``: the drop is in the task's primary metric (Matthews, F1, Pearson... points; default accuracy, or
    Pearson for a one-output model). Where that metric is not accuracy the exact paired bound does not apply:
    ``certify`` then bounds each threshold's drop by a paired bootstrap (:mod:`eat.bootstrap`), and the chosen
    point always gets a 90% paired-bootstrap bound (``drop_interval``). A regression model walks the regression
    rules (``policies`` default :data:`REGRESSION_TUNE_POLICIES`, "rule:patience") over thresholds in the label's
    units (:func:`regression_tau_grid`); a classifier the confidence and agreement rules.
    """
    if (max_drop is None) == (latency_budget_ms is None):
        raise ValueError("give exactly one of max_drop or latency_budget_ms")
    if batch_size < 1 or (batch_size > 1 and latency_budget_ms is not None):
        raise ValueError("batch_size > 1 ranks by throughput and needs max_drop (a latency budget is for batch 1)")
    if certify is not None and (max_drop is None or not 0.0 < certify < 1.0):
        raise ValueError("certify is a confidence strictly between 0 and 1 and needs max_drop")
    if not keep_grid:
        raise ValueError("keep_grid: give at least one keep schedule (1.0 = no pruning)")

    if backend not in BACKENDS:
        raise ValueError(f"backend: {' or '.join(BACKENDS)}, not {backend!r}")
    # the cached sweeps' batches: as deployed on ONNX Runtime (see above); PyTorch keeps its batches of 64
    sweep_batch = batch_size if backend == "onnxruntime" else 64

    deployed = (precision, backend) != ("fp32", "torch")  # the tuned model is not the fp32 PyTorch one

    def everything_off(path: str, tuned: bool) -> tuple[np.ndarray, int, int]:
        """(N,) the predictions of the model with every mechanism off on the calibration rows; depth; outputs."""
        # ``tuned``: the model at its own ``precision`` and backend (int8: exits and pruning read the int8 model's
        # outputs); a reference stays PyTorch fp32, so the allowed drop is counted from the model as trained
        model = tuner_model(path, {}, precision if tuned else "fp32", backend if tuned else "torch", device)
        model.config.set_knobs(**MECHANISMS_OFF)
        off = predict_encoded(model, calibration, device=device, pad_id=pad_id,
                              batch_size=sweep_batch if tuned else 64)
        outputs = off.logits[:, 0] if model.config.num_labels == 1 else off.predictions
        return outputs, model.config.num_hidden_layers, model.config.num_labels

    off_predicted, num_layers, num_labels = everything_off(checkpoint, True)  # also the exits-off candidate below
    task = task or task_for_model(num_labels)
    labels = np.asarray(calibration.labels)
    regression = task.is_regression
    if policies is None:
        policies = REGRESSION_TUNE_POLICIES if regression else ("confidence", "agreement")
    if tau_grid is None:
        tau_grid = (regression_tau_grid(labels, certify is not None) if regression
                    else tuning_tau_grid(num_labels, certify is not None))
    tau_grid = list(tau_grid)
    # another run, or this checkpoint as trained when the tuned model is quantized or on another backend
    separate_reference = reference_checkpoint is not None or deployed
    reference_predicted = (everything_off(reference_checkpoint or checkpoint, False)[0] if separate_reference
                           else off_predicted)
    off_correct, reference_correct = off_predicted == labels, reference_predicted == labels
    off_accuracy, reference_accuracy = task.primary(labels, off_predicted), task.primary(labels, reference_predicted)
    rows = len(labels)
    # the exact paired bound is for accuracy; any other metric is bounded by a paired bootstrap on fixed resamples
    exact = task.primary_metric == "accuracy"
    resamples = None if exact else bootstrap_indices(rows)
    if exit_depths == "auto":
        exit_depths = "all" if regression else None
    depths = exit_depth_grid(num_layers, exit_depths)
    if first_heads is None:
        first_heads = (1, 2, 3) if len(depths) > 1 else (1,)
    # a latency budget times every sampled threshold: its rules are walked uncapped from the first head (the caps
    # enter as truncations), or the finalists would multiply by the caps and first heads
    sweeps = rule_sweeps(policies, depths if max_drop is not None else depths[-1:],
                         first_heads if max_drop is not None else (1,))
    # The confidence each test is made at, so that all of them hold together with probability >= certify: one
    # fixed-sequence test per (keep, rule, first head, cap) sweep and per (keep, cap) truncation, plus exits off
    # against a separate reference (against itself it is exact).
    tests = len(keep_grid) * (len(sweeps) + len(depths) - 1) + (1 if separate_reference else 0)
    per_sweep = None if certify is None else 1.0 - (1.0 - certify) / tests
    def bootstrap_bound(confidence: float):
        return lambda row: paired_bootstrap_drop(task, labels, reference_predicted, row["_predicted"], confidence,
                                                 resamples)["upper"]

    def qualifying(sweep: list[dict]) -> list[dict]:
        """The rows of one sweep that meet max_drop (certified: the fixed-sequence prefix)."""
        if per_sweep is not None:
            return certified_prefix(sweep, max_drop, rows, per_sweep,
                                    bound=None if exact else bootstrap_bound(per_sweep), strict_first=regression)
        return [r for r in sweep if r["metric_value"] >= reference_accuracy - max_drop]

    candidates = []
    for keep in keep_grid:
        model = tuner_model(checkpoint, {"keep_ratio": keep, "exit_layers": "all"}, precision, backend, device)
        cached = predict_encoded(model, calibration, device=device, cache_exits=True, pad_id=pad_id,
                                 batch_size=sweep_batch)  # every head, once per keep schedule
        finalists: dict[tuple, list[dict]] = {}  # (rule, first head) -> its qualifying rows over every cap
        for policy, patience, first, depth in sweeps:
            sweep = replay_sweep(cached, tau_grid, policy=policy,
                                 reference_correct=None if regression else reference_correct, task=task,
                                 patience=patience, keep_predictions=True, first_head=first,
                                 exit_depth=None if depth == num_layers else depth)
            for row in sweep:
                row["keep_ratio"], row["exit_policy"] = keep, policy
                if policy in REGRESSION_EXIT_POLICIES:
                    row["exit_patience"] = patience
            if max_drop is None:
                candidates.extend(sweep[:: max(1, len(sweep) // 8)])
            else:
                finalists.setdefault((policy, patience, first), []).extend(qualifying(sweep))
        # one finalist per keep schedule, rule and first head: the least work, whatever its cap (which heads cost
        # what next to a layer is left to the timing of the finalists)
        candidates.extend(min(rows_, key=lambda r: r["token_layer_fraction"]) for rows_ in finalists.values() if rows_)
        for depth in depths[:-1]:  # no rule at all: every row leaves at the cap (the exit head there answers)
            truncated = replay_sweep(cached, [1.0], policy="none", task=task, exit_depth=depth, keep_predictions=True,
                                     reference_correct=None if regression else reference_correct)
            truncated[0]["keep_ratio"], truncated[0]["exit_policy"] = keep, "none"
            candidates.extend(truncated if max_drop is None else qualifying(truncated))
    # A threshold no calibration row meets still pays for evaluating every head (~10% at batch 1): such a point is
    # "exits off" in disguise. Drop it, and always time the real exits-off point so the tuner can choose it.
    candidates = [c for c in candidates if c["mean_exit_layer"] < num_layers or c["keep_ratio"] != 1.0]
    exits_off = {"tau": 1.0, "keep_ratio": 1.0, "metric_value": off_accuracy, "token_layer_fraction": 1.0,
                 "mean_exit_layer": float(num_layers), "exit_policy": "none", "_predicted": off_predicted,
                 **({"accuracy": off_accuracy} if exact else {}),
                 **({} if regression else discordant_rows(reference_correct, off_correct))}
    if per_sweep is not None:
        exits_off["drop_upper_bound"] = (
            drop_upper_bound(exits_off["rows_worse"], exits_off["rows_better"], rows, per_sweep) if exact
            else bootstrap_bound(per_sweep)(exits_off))
        if exits_off["drop_upper_bound"] > max_drop:
            raise ValueError(f"not even the EAT model with every mechanism off can be certified within {max_drop} "
                             f"points of the reference at {certify:.0%} confidence on {rows} calibration rows "
                             f"(bound {exits_off['drop_upper_bound']:.2f}): allow a larger drop, a lower confidence, "
                             "or a larger calibration split")
    candidates.append(exits_off)
    _time_finalists(candidates, checkpoint, calibration, precision=precision, batch_size=batch_size,
                    timing_rows=timing_rows, warmup=warmup, device=device, pad_id=pad_id, backend=backend)
    if max_drop is not None:
        drop_from = ("reference run" if reference_checkpoint else "fp32 reference" if deployed else "reference")
        if certify is None:
            condition = f"calibration {task.primary_title} >= {drop_from} - {max_drop}"
        else:
            condition = (f"{task.primary_title} >= {drop_from} - {max_drop} certified at {certify:.0%} confidence (exact paired "
                         f"bound on {rows} calibration rows, fixed-sequence over tau, Bonferroni over "
                         f"{tests} test{'s' if tests != 1 else ''})")
        best, criterion = _fastest_finalist(candidates, batch_size, condition)
    else:
        best, criterion = _most_accurate_within(candidates, latency_budget_ms, task)
    knobs = _tuned_knobs(best)
    interval = None
    if not exact:  # an uncertainty the exact bound cannot give: the chosen point's paired-bootstrap drop
        interval = {"method": "paired percentile bootstrap", "confidence": 0.9, "samples": len(resamples),
                    **paired_bootstrap_drop(task, labels, reference_predicted, best["_predicted"], 0.9, resamples)}
        if max_drop is not None:
            criterion = criterion.replace("exact paired bound", "paired bootstrap bound")
    for candidate in candidates:
        candidate.pop("_predicted", None)
    return TuneResult(knobs, best["metric_value"], reference_accuracy, best.get("calibration_p50_ms"), candidates,
                      criterion, certify, best.get("drop_upper_bound"), [list(k) if isinstance(k, (list, tuple)) else k
                                                                        for k in keep_grid],
                      task.primary_metric, interval)


def tuner_model(checkpoint: str, knobs: dict[str, Any], precision: str, backend: str, device: str):
    """The model the tuner reads and times: ``checkpoint`` with ``knobs`` at ``precision``, in PyTorch or (backend
    "onnxruntime") the ONNX Runtime runner of :mod:`eat.deploy` (the export is made once per process)."""
    if backend == "torch":
        return apply_precision(load_classifier(checkpoint, knobs=knobs), precision, inplace=True).to(device)
    from .deploy import load_for_inference

    return load_for_inference(checkpoint, knobs=knobs, precision=precision, backend=backend).model


def _time_finalists(candidates: list[dict[str, Any]], checkpoint: str, calibration: EncodedDataset, *, precision: str,
                    batch_size: int, timing_rows: int, warmup: int, device: str, pad_id: int,
                    backend: str = "torch") -> None:
    """Time every tuning finalist side by side on calibration rows, each loaded with its own knobs at
    ``precision`` on ``backend``: the batch-1 median on ``timing_rows`` rows (``calibration_p50_ms``), or with
    ``batch_size`` > 1 the throughput on at least :data:`THROUGHPUT_TIMING_BATCHES` batches
    (``calibration_rows_per_s``)."""
    models = {str(i): tuner_model(checkpoint, _tuned_knobs(cand), precision, backend, device)
              for i, cand in enumerate(candidates)}
    if batch_size > 1:
        _time_throughput(models, _first_rows(calibration, max(timing_rows, THROUGHPUT_TIMING_BATCHES * batch_size)),
                         candidates, batch_size, device, pad_id)
        return
    timing_set = _first_rows(calibration, timing_rows)
    singles = [collate(timing_set, [i], pad_id) for i in range(len(timing_set))]
    calls = {name: (lambda b, m=m: m(b["input_ids"].to(device), None, b["token_type_ids"].to(device)))
             for name, m in models.items()}
    latency = interleaved_latency(calls, singles, warmup=warmup, device=device)
    for i, cand in enumerate(candidates):
        cand["calibration_p50_ms"] = latency[str(i)].p50_ms


def _fastest_finalist(candidates: list[dict[str, Any]], batch_size: int, condition: str) -> tuple[dict[str, Any], str]:
    """(the fastest finalist, the criterion in words): highest batch throughput, or lowest batch-1 median, the
    finalists within :data:`TIMING_TIE` of it tied (:func:`fastest_within_noise`). ``condition``: what every
    finalist met."""
    tie = (f"; finalists within {TIMING_TIE:.0%} of the fastest count as tied and the one with the least "
           "token-layer work wins")
    if batch_size > 1:
        best = fastest_within_noise(candidates, "calibration_rows_per_s", higher_is_faster=True)
        return best, f"highest batch-{batch_size} throughput with {condition}{tie}"
    best = fastest_within_noise(candidates, "calibration_p50_ms", higher_is_faster=False)
    return best, f"fastest with {condition}{tie}"


def _most_accurate_within(candidates: list[dict[str, Any]], latency_budget_ms: float,
                          task: Task) -> tuple[dict[str, Any], str]:
    """(the most accurate finalist whose batch-1 median fits the budget, the criterion in words); ValueError when
    none fits."""
    fitting = [c for c in candidates if c["calibration_p50_ms"] <= latency_budget_ms]
    if not fitting:
        raise ValueError(f"no operating point fits {latency_budget_ms} ms on this machine; the fastest "
                         f"measured {min(c['calibration_p50_ms'] for c in candidates):.2f} ms")
    best = max(fitting, key=lambda c: c["metric_value"])
    return best, f"highest calibration {task.primary_title} with calibration p50 <= {latency_budget_ms} ms"


# batches of calibration rows the batch-N tuner times each finalist on (8 left the MNLI choice to noise)
THROUGHPUT_TIMING_BATCHES = 16

# Two finalists whose timings differ by less than this are a tie. On this project's shared 2-core VMs two certified
# MNLI finalists 3% apart in work measured 1.7% apart one way in one tuner run and 3.5% the other way in the next;
# the work a point does (token-layers, from the cached sweep) has no noise, so it breaks the tie.
TIMING_TIE = 0.04


def fastest_within_noise(candidates: list[dict[str, Any]], metric: str, *, higher_is_faster: bool,
                         tolerance: float = TIMING_TIE) -> dict[str, Any]:
    """The finalist to choose by a timing ``metric`` (rows/s when ``higher_is_faster``, else ms): of those within
    ``tolerance`` (relative) of the fastest, the one with the least ``token_layer_fraction`` (then the fastest), so
    that noise between near-equal finalists does not decide which point a user gets."""
    def speed(candidate: dict[str, Any]) -> float:
        return candidate[metric] if higher_is_faster else 1.0 / candidate[metric]

    fastest = max(speed(c) for c in candidates)
    tied = [c for c in candidates if speed(c) >= fastest * (1.0 - tolerance)]
    return min(tied, key=lambda c: (c["token_layer_fraction"], -speed(c)))


def batch_forward(model) -> Callable[[dict[str, Any]], Any]:
    """A timing call for ``model`` on one padded batch (a dict from :func:`batches`)."""
    return lambda b: model(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def _first_rows(encoded: EncodedDataset, rows: int) -> EncodedDataset:
    """The first ``rows`` rows of ``encoded`` (all of it when shorter)."""
    return EncodedDataset(encoded.input_ids[:rows], encoded.token_type_ids[:rows], encoded.labels[:rows], 0,
                          encoded.lengths[:rows])


def _time_throughput(models: dict[str, Any], timing_set: EncodedDataset, candidates: list[dict[str, Any]],
                     batch_size: int, device: str, pad_id: int) -> None:
    """Rows/s of every finalist on the same batches of ``timing_set`` (best of 3 passes, interleaved batch by batch
    so drift favours nobody); stored as ``calibration_rows_per_s`` in each candidate."""
    batched = [{k: v.to(device) for k, v in b.items()}
               for b in batches(timing_set, batch_size, bucket=False, pad_id=pad_id)]
    calls = {name: batch_forward(model) for name, model in models.items()}
    timing = interleaved_throughput(calls, batched, len(timing_set), warmup=1, device=device, repeats=3)
    for i, cand in enumerate(candidates):
        cand["calibration_rows_per_s"] = timing[str(i)][0]


def _tuned_knobs(candidate: dict[str, Any]) -> dict[str, Any]:
    """The EAT knobs of a tuning candidate (agreement = the last 2 heads agree and confidence >= tau).

    With the confidence rule each head decides alone, so a head that no calibration row leaves at is dropped from
    ``exit_layers`` (it would be evaluated for every example for nothing; the calibration decisions are unchanged).
    The agreement rule compares neighbouring heads, so it keeps every head.
    """
    if candidate["exit_policy"] == "none":
        if candidate.get("exit_depth") is not None:  # truncated: only the cap's head runs, and answers every row
            return {"keep_ratio": candidate["keep_ratio"], "exit_layers": [int(candidate["exit_depth"])],
                    "exit_depth": int(candidate["exit_depth"]), "exit_policy": "none", "exit_threshold": candidate["tau"]}
        # exits off: no head is evaluated
        return {"keep_ratio": candidate["keep_ratio"], "exit_layers": None, "exit_policy": "none",
                "exit_threshold": candidate["tau"]}
    exit_layers: str | list[int] = list(candidate["exit_heads"]) if candidate.get("exit_heads") else "all"
    if candidate["exit_policy"] == "confidence" and candidate.get("exit_layers_used"):
        exit_layers = list(candidate["exit_layers_used"])
    depth = candidate.get("exit_depth")
    if depth is not None and isinstance(exit_layers, list) and depth not in exit_layers:
        exit_layers = sorted(exit_layers + [depth])  # the cap's head answers the rows still running there
    knobs = {"keep_ratio": candidate["keep_ratio"], "exit_layers": exit_layers,
             "exit_policy": candidate["exit_policy"], "exit_threshold": candidate["tau"]}
    if depth is not None:
        knobs["exit_depth"] = int(depth)
    if candidate["exit_policy"] == "agreement":
        knobs["exit_patience"] = 2
    if candidate["exit_policy"] in REGRESSION_EXIT_POLICIES:
        knobs["exit_patience"] = int(candidate.get("exit_patience", 2))
    return knobs


def save_json(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`eat.results.atomic_write_json`)."""
    atomic_write_json(path, data)


__all__ = ["BenchConfig", "bench_config_from_preset", "OperatingPoint", "ablation_points",
           "sweep_points", "mechanism_knobs", "measure_points", "tau_sweep", "drop_upper_bound",
           "certified_prefix", "fastest_within_noise", "tune", "tuner_model", "tuning_tau_grid", "TuneResult",
           "MECHANISMS",
           "TAU_GRID", "CERTIFY_TAU_GRID", "TIMING_TIE", "THROUGHPUT_TIMING_BATCHES", "TUNE_KEEP_GRID", "encode",
           "save_json", "LatencyStats", "batch_forward"]
