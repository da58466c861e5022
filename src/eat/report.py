"""Analysis and report: accuracy-latency frontier (Pareto points marked, static baselines shown), exit-layer
distribution, tokens kept vs input length, ablation bars, and a Markdown summary that links the PNGs.

Reads only the results files (``results.jsonl``, ``tau_sweep_*.csv``, ``examples/*.csv``); never writes to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .results import (B1_P50_MS, EXITS_OFF, STATIC, THROUGHPUT, THROUGHPUT_SORTED, ResultsError,  # noqa: E402
                      ResultsLog, atomic_write_text, run_config_file, series_name, tuned_file)
from .results import sweep_file as results_sweep_file  # noqa: E402
from .tasks import METRICS, TASKS, metric_title  # noqa: E402


class ReportError(RuntimeError):
    """Nothing to report, or the inputs are unusable; the message says which file."""


def pareto_front(frame: pd.DataFrame, cost: str = B1_P50_MS, value: str = "accuracy") -> pd.Series:
    """Boolean mask of rows no other row beats on both cost (lower) and value (higher)."""
    mask = []
    for _, row in frame.iterrows():
        dominated = ((frame[cost] <= row[cost]) & (frame[value] >= row[value]) &
                     ((frame[cost] < row[cost]) | (frame[value] > row[value]))).any()
        mask.append(not dominated)
    return pd.Series(mask, index=frame.index)


def load_results(folder: Path) -> pd.DataFrame:
    """The results of a folder as a frame; ReportError when there are none."""
    try:
        rows = ResultsLog(folder).rows()
    except ResultsError as error:
        raise ReportError(str(error)) from None
    if not rows:
        raise ReportError(f"{folder}: no results to report (run `eat bench` or `eat run` first)")
    frame = pd.DataFrame(rows)
    # one series per task and evaluation split (MNLI has two)
    # (by the splits the task is evaluated on, not those measured so far: an interrupted MNLI run that measured one
    # split still names its series, and finds its sweep file, as the pipeline did)
    measured_splits = frame.groupby("task")["split"].nunique()
    frame["series"] = [series_name(t, s, len(TASKS[t].eval_splits) if t in TASKS else measured_splits[t])
                       for t, s in zip(frame["task"], frame["split"])]
    # the value every table and plot shows: the row's primary metric (``metric_value``); rows written before
    # metrics had names hold it in ``accuracy`` (entity F1 for token tasks, which ``metric`` names)
    legacy = frame["accuracy"] if "accuracy" in frame.columns else pd.Series(float("nan"), index=frame.index)
    frame["metric_named"] = frame["metric_value"].notna() if "metric_value" in frame.columns else False
    frame["metric_value"] = frame["metric_value"].fillna(legacy) if "metric_value" in frame.columns else legacy
    return frame


COMPARABLE_FIELDS = ("threads", "device", "dataset", "rows", "cpu", "gpu", "batch_size_throughput", "task", "split")


def check_comparable(reference, row) -> None:
    """Refuse to compare two measurements made with different threads, devices, datasets or rows."""
    differ = [f for f in COMPARABLE_FIELDS if f in reference and f in row and str(reference[f]) != str(row[f])]
    if differ:
        details = ", ".join(f"{f}: {reference[f]} vs {row[f]}" for f in differ)
        raise ReportError(f"cannot compare {reference['point']!r} with {row['point']!r}: measured differently "
                          f"({details})")


def metric_name(data: pd.DataFrame) -> str:
    """The name of the primary metric these rows' ``metric_value`` holds ("accuracy", "Matthews corr.", "Pearson r",
    "entity F1"...): their ``metric`` field; "accuracy" for rows written before metrics had names."""
    if "metric" in data.columns:
        named = data["metric"].dropna()
        if len(named):
            return metric_title(str(named.iloc[-1]))
    return "accuracy"


def _static_row(frame: pd.DataFrame, name: str) -> pd.Series | None:
    match = frame[frame["point"] == name]
    return match.iloc[-1] if len(match) else None


def _frame_reference(data: pd.DataFrame) -> pd.Series | None:
    """The frame's own reference row, for rows without a run id: its "static" row, else its "eat:none" row."""
    static = _static_row(data, STATIC)
    return static if static is not None else _static_row(data, EXITS_OFF)


def run_speedups(data: pd.DataFrame) -> pd.DataFrame:
    """``data`` with ``speedup_b1`` and ``speedup_batch`` columns: each row against the reference ("static", else
    "eat:none") of its own ``run_id`` (rows without a run id: against the frame's static row). NaN where that run
    has no reference. Ratios across runs are never formed: two runs can sit on a faster or slower spell of the
    machine, so only a run's own static row tells what its latencies mean."""
    data = data.copy()
    by_run = "run_id" in data.columns and data["run_id"].notna().all()
    fallback = _frame_reference(data)
    timings = [B1_P50_MS, THROUGHPUT] + [c for c in (THROUGHPUT_SORTED,) if c in data]
    references = [_run_reference(data, run_id) if by_run else fallback for run_id in data.get("run_id", data.index)]
    # (rows, timings): each row's reference timings, NaN where its run has none
    reference = pd.DataFrame([{} if ref is None else {c: ref[c] for c in timings} for ref in references],
                             index=data.index).reindex(columns=timings)
    data["speedup_b1"] = reference[B1_P50_MS] / data[B1_P50_MS]
    data["speedup_batch"] = data[THROUGHPUT] / reference[THROUGHPUT]
    if THROUGHPUT_SORTED in timings:  # length-sorted batches (rows measured since a2fe6d9)
        data["speedup_sorted"] = data[THROUGHPUT_SORTED] / reference[THROUGHPUT_SORTED]
    return data


def _frontier_panel(ax, data: pd.DataFrame, x: str, higher_is_better: bool, label: str) -> None:
    """One accuracy-vs-cost scatter with the Pareto points circled and joined; x is a column of ``data``."""
    cost = data.assign(_cost=-data[x] if higher_is_better else data[x])
    front = pareto_front(cost, cost="_cost", value="metric_value")
    colors = {"ablation": "tab:blue", "tau": "tab:orange", "keep": "tab:green", "window": "tab:purple",
              "tuned": "tab:red", "baseline": "black"}
    for role, group in data.groupby("role"):
        marker = "*" if role == "baseline" else "o"
        ax.scatter(group[x], group["metric_value"], label=role, c=colors.get(role, "gray"), marker=marker,
                   s=140 if role == "baseline" else 40, zorder=3)
    frontier = data[front].sort_values(x)
    ax.plot(frontier[x], frontier["metric_value"], "--", color="gray", zorder=2, label="Pareto frontier")
    ax.scatter(frontier[x], frontier["metric_value"], facecolors="none", edgecolors="red", s=160, zorder=4)
    for _, row in data.iterrows():
        if row["role"] in ("baseline", "tuned") or front.loc[row.name]:
            ax.annotate(row["point"], (row[x], row["metric_value"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_ylabel(f"{metric_name(data)} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_frontier(frame: pd.DataFrame, task: str, path: Path) -> None:
    """Accuracy against speed; Pareto points circled; static baselines as stars.

    When every row has a reference in its own run, two panels: batch-1 speedup and batch throughput speedup,
    each against that run's static row (rows of several runs, e.g. `eat tune`'s dev rows beside `eat bench`'s,
    share the axes honestly); rows whose run has no reference are left out and counted in the title. When no
    row has one, one panel of raw batch-1 median latency."""
    everything = run_speedups(frame[frame["series"] == task])
    env = everything.iloc[0]
    data = everything[everything["speedup_b1"].notna() & everything["speedup_batch"].notna()]
    if len(data):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        _frontier_panel(left, data, "speedup_b1", True, "batch-1 speedup over static (median latency, same run)")
        batch = int(env["batch_size_throughput"]) if pd.notna(env.get("batch_size_throughput")) else "N"
        _frontier_panel(right, data, "speedup_batch", True,
                        f"batch-{batch} throughput speedup over static (arrival order, same run)")
        for ax, column in ((left, "speedup_b1"), (right, "speedup_batch")):
            _mark_fastest_static_peer(ax, data, column)
        left_out = len(everything) - len(data)
        note = f"; {left_out} row(s) of runs without a static row not shown" if left_out else ""
        fig.suptitle(f"{task}: {metric_name(data)} vs speedup ({env['device']}, {env['threads']} threads{note})",
                     fontsize=10)
    else:
        data = everything
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _frontier_panel(ax, data, B1_P50_MS, False, "batch-1 median latency (ms)")
        ax.set_title(f"{task}: {metric_name(data)} vs latency ({env['device']}, {env['threads']} threads)",
                     fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_exit_distribution(row: pd.Series, path: Path) -> None:
    """How many examples left at each layer, for one operating point."""
    distribution = row["exit_distribution"]
    if isinstance(distribution, str):
        distribution = json.loads(distribution)
    layers = list(range(1, int(row["layers"]) + 1))
    counts = [int(distribution.get(str(layer), distribution.get(layer, 0))) for layer in layers]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(layers, counts, color="tab:orange")
    ax.set_xlabel("exit layer")
    ax.set_ylabel("examples")
    ax.set_title(f"{row['task']} {row['point']}: exit layers (mean {row['mean_exit_layer']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tokens_vs_length(examples: pd.DataFrame, title: str, path: Path) -> None:
    """Tokens entering layers 2, middle and last (rows that reached them) against input length."""
    token_columns = [c for c in examples.columns if c.startswith("tokens_l")]
    depth = len(token_columns)
    layers = sorted({min(2, depth), max(1, depth // 2 + 1), depth})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for layer in layers:
        reached = examples[examples[f"tokens_l{layer}"] > 0]
        ax.scatter(reached["input_tokens"], reached[f"tokens_l{layer}"], s=8, alpha=0.5,
                   label=f"entering layer {layer} ({len(reached)} rows)")
    top = int(examples["input_tokens"].max())
    ax.plot([0, top], [0, top], "--", color="gray", label="no pruning")
    ax.set_xlabel("input tokens")
    ax.set_ylabel("tokens processed")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(frame: pd.DataFrame, task: str, path: Path) -> None:
    """Latency (batch 1 and batch-B per row) and accuracy of the ablation grid and the baselines."""
    data = frame[(frame["series"] == task) & frame["role"].isin(["ablation", "baseline", "tuned"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = data["point"].tolist()
    axes[0].barh(names, data[B1_P50_MS], color="tab:blue")
    axes[0].set_xlabel("batch-1 median latency (ms)")
    axes[1].barh(names, data[THROUGHPUT], color="tab:green")
    axes[1].set_xlabel(f"throughput at batch {int(data.iloc[0]['batch_size_throughput'])} (rows/s)")
    axes[2].barh(names, data["metric_value"], color="tab:orange")
    lowest = float(data["metric_value"].min())
    low = max(0.0, lowest - 5) if lowest >= 0 else lowest - 5  # a correlation can fall below 0
    axes[2].set_xlim(low, 100)
    axes[2].set_xlabel(f"{metric_name(data)} (%)")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"{task}: ablation (each row its own measurement)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_reference(data: pd.DataFrame, run_id) -> pd.Series | None:
    """The row a run's speedups are taken against: its "static" row, else its "eat:none" row, else None."""
    return _frame_reference(data[data["run_id"] == run_id])


def _percent_range(shares: pd.Series) -> str:
    """"48%", or "48-57%" when the rows (e.g. several runs on other samples) differ."""
    low, high = round(100 * shares.min()), round(100 * shares.max())
    return f"{low}%" if low == high else f"{low}-{high}%"


def summary_table(frame: pd.DataFrame, task: str) -> str:
    """Markdown table: every point with accuracy, latency percentiles, throughput and speedups vs static.

    Speedups are ratios within one interleaved run: each row is divided by the "static" row (else "eat:none") of
    its own ``run_id``, never by a row timed in another run (e.g. the dev rows `eat tune` measures next to its
    point). A row whose run has neither shows "-". With more than one run in the table a "run" column says
    which is which. Every row must still have been measured like the reference (threads, device, data)."""
    data = frame[frame["series"] == task].copy()
    static = _frame_reference(data)
    by_run = "run_id" in data.columns and data["run_id"].notna().all()
    several_runs = by_run and data["run_id"].nunique() > 1
    run_header, run_rule = ("run | ", "---|") if several_runs else ("", "")
    # length-sorted throughput, when every row has it (rows measured before it existed do not)
    has_sorted = THROUGHPUT_SORTED in data.columns and data[THROUGHPUT_SORTED].notna().all()
    sorted_header, sorted_rule = (" rows/s (sorted) | speedup sorted |", "---|---|") if has_sorted else ("", "")
    lines = [f"| point | role | {run_header}{metric_name(data)} | b1 p50 ms | b1 p90 ms | b1 p99 ms | speedup b1 | "
             f"rows/s (batch) | speedup batch |{sorted_header} mean exit layer | token-layer fraction |",
             f"|---|---|{run_rule}---|---|---|---|---|---|---|{sorted_rule}---|---|"]
    data = run_speedups(data)
    order = data.sort_values("run_id", kind="stable") if several_runs else data
    for _, row in order.iterrows():
        if static is not None:
            check_comparable(static, row)
        speed1, speedb = (f"{row[c]:.2f}x" if pd.notna(row[c]) else "-" for c in ("speedup_b1", "speedup_batch"))
        if has_sorted:
            speeds = f"{row['speedup_sorted']:.2f}x" if pd.notna(row["speedup_sorted"]) else "-"
        sorted_cells = f" {row[THROUGHPUT_SORTED]:.0f} | {speeds} |" if has_sorted else ""
        accuracy = f"{row['metric_value']:.2f}{_other_metrics(row)}"
        run = f"{row['run_id']} | " if several_runs else ""
        lines.append(f"| {row['point']} | {row['role']} | {run}{accuracy} | {row[B1_P50_MS]:.2f} | "
                     f"{row['b1_p90_ms']:.2f} | {row['b1_p99_ms']:.2f} | {speed1} | "
                     f"{row[THROUGHPUT]:.0f} | {speedb} |{sorted_cells} {row['mean_exit_layer']:.2f} | "
                     f"{row['token_layer_fraction']:.3f} |")
    if has_sorted:
        lines += ["", "Batch throughput is timed twice on the same rows: in arrival order (padding share "
                  f"{_percent_range(data['padding_share_arrival'])}) and in length-sorted batches (padding "
                  f"{_percent_range(data['padding_share_sorted'])}). An exiting model trims the padding of "
                  "rows that left, so part of its arrival-order speedup is padding a length-sorting server never "
                  "pays."]
    if several_runs:
        lines += ["", "Speedups are against the static (else eat:none) row of the same run; rows from different runs "
                  "were not timed side by side, so compare their latencies only loosely."]
    return "\n".join(lines)


def _other_metrics(row: pd.Series) -> str:
    """" (F1 88.10)": a row's metrics besides its primary one. Rows that name their metric list every other one
    the task has (e.g. Spearman beside Pearson); older rows only F1, which they had when the task reports it."""
    if bool(row.get("metric_named", False)) and row.get("metric") in METRICS:
        others = [f"{metric_title(name)} {row[name]:.2f}" for name in METRICS
                  if name != row["metric"] and name in row and pd.notna(row.get(name)) and METRICS[name].function]
        return f" ({', '.join(others)})" if others else ""
    return f" (F1 {row['f1']:.2f})" if "f1" in row and pd.notna(row.get("f1")) else ""


def _is_static(points: pd.Series) -> pd.Series:
    """Rows of the static model on any backend: ``static`` and its peers ``static:<backend>-<precision>``."""
    return (points == STATIC) | points.astype(str).str.startswith(f"{STATIC}:")


def _mark_fastest_static_peer(ax, data: pd.DataFrame, column: str) -> None:
    """A dotted vertical line at the fastest static peer's speedup (x = ``column``), when the rows have peers."""
    statics = data[_is_static(data["point"])]
    if len(statics) < 2 or statics[column].isna().all():
        return
    best = statics.loc[statics[column].idxmax()]
    ax.axvline(best[column], color="black", linestyle=":", linewidth=1, zorder=1)
    ax.annotate(f"fastest static peer ({best['point']})", (best[column], ax.get_ylim()[0]), fontsize=6,
                rotation=90, xytext=(2, 4), textcoords="offset points")


def peer_speedups(data: pd.DataFrame) -> pd.DataFrame:
    """``data`` with ``peer_speedup_b1``, ``peer_speedup_batch`` (and ``peer_speedup_sorted``) and the names of
    the peers they are against: each row against the FASTEST static peer of its own run (``static`` or any
    ``static:<backend>-<precision>`` row; the fastest by each measure separately: batch-1 median, throughput).
    As :func:`run_speedups`, ratios are never formed across runs. NaN where a run has no static row."""
    data = data.copy()
    runs = data["run_id"] if "run_id" in data.columns and data["run_id"].notna().all() else pd.Series(0, data.index)
    measures = [("b1", B1_P50_MS, False), ("batch", THROUGHPUT, True)]
    if THROUGHPUT_SORTED in data.columns and data[THROUGHPUT_SORTED].notna().all():
        measures.append(("sorted", THROUGHPUT_SORTED, True))
    for key, column, higher in measures:
        data[f"peer_speedup_{key}"] = float("nan")
        data[f"peer_{key}"] = None
        for run in runs.unique():
            in_run = runs == run
            statics = data[in_run & _is_static(data["point"])]
            if not len(statics):
                continue
            best = statics.loc[statics[column].idxmax() if higher else statics[column].idxmin()]
            ratio = data.loc[in_run, column] / best[column] if higher else best[column] / data.loc[in_run, column]
            data.loc[in_run, f"peer_speedup_{key}"] = ratio
            data.loc[in_run, f"peer_{key}"] = best["point"]
    return data


def peer_speedup_table(frame: pd.DataFrame, task: str) -> str:
    """Markdown table of every row's speedups against the fastest static peer of its run (batch 1, batch
    throughput, length-sorted throughput when measured), or "" when no run of this task has static peers."""
    data = frame[frame["series"] == task]
    if not data["point"].astype(str).str.startswith(f"{STATIC}:").any():
        return ""
    data = peer_speedups(data)
    has_sorted = "peer_speedup_sorted" in data.columns
    lines = ["| point | backend | precision | vs fastest static, b1 | vs fastest static, batch |"
             + (" vs fastest static, sorted |" if has_sorted else ""),
             "|---|---|---|---|---|" + ("---|" if has_sorted else "")]
    for _, row in data.iterrows():
        cells = [f"{row[f'peer_speedup_{k}']:.2f}x ({row[f'peer_{k}']})" if pd.notna(row[f"peer_speedup_{k}"])
                 else "-" for k in (("b1", "batch", "sorted") if has_sorted else ("b1", "batch"))]
        lines.append(f"| {row['point']} | {row.get('backend') if pd.notna(row.get('backend')) else 'torch'} | "
                     f"{row.get('precision') if pd.notna(row.get('precision')) else 'fp32'} | {' | '.join(cells)} |")
    lines += ["", "Each row against the fastest static deployment of its own run (in parentheses), by each measure "
              "separately: static as Hugging Face-style eager fp32 and its peers (PyTorch int8, ONNX Runtime fp32 and "
              "int8), timed interleaved with every other row on the same rows."]
    return "\n".join(lines)


def build_report(folder: str | Path) -> Path:
    """Build ``report.md`` and its PNGs from a results folder; returns the report path."""
    folder = Path(folder)
    frame = load_results(folder)
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    sections: list[str] = ["# EAT benchmark report", ""]
    first = frame.iloc[0]
    sections += [f"Measured on {first['cpu']}{' / ' + first['gpu'] if first.get('gpu') else ''}, device "
                 f"{first['device']}, {first['threads']} threads, torch {first['torch']}, transformers "
                 f"{first['transformers']}, commit {first['git_commit']}. Latency: batch 1, every point timed "
                 "interleaved on the same examples; accuracy from the same calls. Throughput: same batches for "
                 "every point, arrival order.", ""]
    for task in frame["series"].unique():
        sections += _series_section(frame, task, folder, plots)
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path


def _series_section(frame: pd.DataFrame, task: str, folder: Path, plots: Path) -> list[str]:
    """The report's section on one series (a task's split): data, plots, summary tables, the tuned point and how
    the main job built the models."""
    data = frame[frame["series"] == task]
    safe = task.replace(":", "_")
    sections = [f"## {task}", "", f"Data: {data.iloc[0]['dataset']} ({int(data.iloc[0]['rows'])} rows).", ""]
    if bool(data["metric_named"].any()):  # rows that name their metric and its value (since #27)
        sections += [f"Primary metric: {metric_name(data)} (`{data['metric'].dropna().iloc[-1]}`, in percent); "
                     "every table, plot and tuner below uses it.", ""]
    plot_frontier(frame, task, plots / f"{safe}_frontier.png")
    sections += [f"![frontier](plots/{safe}_frontier.png)", ""]
    if len(data[data["role"].isin(["ablation", "baseline"])]):
        plot_ablation(frame, task, plots / f"{safe}_ablation.png")
        sections += [f"![ablation](plots/{safe}_ablation.png)", ""]
    exits = data[data["mech_exit"] == True]  # noqa: E712 - pandas column of bools
    focus = exits[exits["role"] == "tuned"]
    focus = focus if len(focus) else exits
    if len(focus):
        row = focus.iloc[-1]
        plot_exit_distribution(row, plots / f"{safe}_exit_layers.png")
        sections += [f"![exit layers](plots/{safe}_exit_layers.png)", ""]
    sections += _tokens_kept_section(data, task, folder, plots, safe)
    sweep_file = results_sweep_file(folder, task)
    if sweep_file.is_file():
        plot_tau_sweep(pd.read_csv(sweep_file), task, plots / f"{safe}_tau_sweep.png")
        sections += [f"![tau sweep](plots/{safe}_tau_sweep.png)", ""]
    sections += ["### Summary", "", summary_table(frame, task), ""]
    peers = peer_speedup_table(frame, task)
    if peers:
        sections += ["### Against the fastest static peer", "", peers, ""]
    tuned_path = tuned_file(folder, task.split(":")[0])
    if tuned_path.is_file():
        sections += [_tuned_note(json.loads(tuned_path.read_text()), metric_name(data)), ""]
    run_file = run_config_file(folder, task.split(":")[0])
    if run_file.is_file():  # written by `eat run`: how the models were built
        run = json.loads(run_file.read_text())
        sections += [f"Main job: `eat run --preset {run.get('preset')} --recipe {run.get('recipe')}` "
                     f"(settings in `{run_file.name}`).", ""]
    return sections


def _tokens_kept_section(data: pd.DataFrame, task: str, folder: Path, plots: Path, safe: str) -> list[str]:
    """The tokens-kept plot of a pruning row whose examples file is on disk (the tuned point when it prunes, else
    the pruning-only ablation row, else any pruning row); [] when there is none."""
    pruned = data[(data["mech_prune"] == True) & data.get("examples_file", pd.Series(dtype=str)).notna()]  # noqa: E712
    if not (len(pruned) and "examples_file" in pruned):
        return []
    preferred = [pruned[pruned["role"] == "tuned"], pruned[pruned["point"] == "eat:prune"], pruned]
    row = next(group for group in preferred if len(group)).iloc[-1]
    examples_path = folder / str(row["examples_file"])
    if not examples_path.is_file():
        return []
    plot_tokens_vs_length(pd.read_csv(examples_path), f"{task} {row['point']}: tokens kept",
                          plots / f"{safe}_tokens_vs_length.png")
    return [f"![tokens kept](plots/{safe}_tokens_vs_length.png)", ""]


def plot_tau_sweep(sweep: pd.DataFrame, task: str, path: Path) -> None:
    """The primary metric against the mean exit layer over a threshold sweep from cached head outputs."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    value = sweep["metric_value"] if "metric_value" in sweep.columns else sweep["accuracy"]
    ax.plot(sweep["mean_exit_layer"], value, "-o", markersize=3)
    ax.set_xlabel("mean exit layer")
    ax.set_ylabel(f"{metric_title(str(sweep['metric'].iloc[0])) if 'metric' in sweep.columns else 'accuracy'} (%)")
    ax.set_title(f"{task}: tau sweep from cached head outputs", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tuned_note(tuned: dict, metric: str) -> str:
    """How the operating point was chosen on the calibration split: criterion, knobs, calibration and reference
    scores, and the certified bound or bootstrap interval when the tuner gave one."""
    kind = "f1" if "calibration_f1" in tuned else "accuracy"
    return (f"Operating point chosen on the calibration split ({tuned.get('criterion', '')}): "
            f"`{json.dumps(tuned.get('knobs'))}`, calibration {metric} "
            f"{tuned.get('calibration_' + kind, float('nan')):.2f} vs reference "
            f"{tuned.get('reference_' + kind, float('nan')):.2f}"
            + (f"; certified bound on the drop {tuned['drop_upper_bound']:.2f} points"
               if tuned.get("drop_upper_bound") is not None else "")
            + (f"; {tuned['drop_interval']['method']}: drop {tuned['drop_interval']['drop']:.2f}, "
               f"{tuned['drop_interval']['confidence']:.0%} upper bound "
               f"{tuned['drop_interval']['upper']:.2f} points"
               if tuned.get("drop_interval") else "") + ".")


__all__ = ["build_report", "pareto_front", "summary_table", "ReportError", "load_results"]
