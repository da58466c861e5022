"""benchmarks/targets.py: the target arithmetic on hand-written result rows (no timing here), and its refusal to
compare rows measured with different thread counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from eat.report import ReportError
from eat.results import ResultsLog

from .conftest import benchmark_script


def _row(point: str, role: str, accuracy: float, p50: float, rows_per_s: float, *, split: str = "validation",
         threads: int = 2, task: str = "qqp", exit_layer: float = 6.0) -> dict:
    return {"config_hash": f"{point}-{split}-{threads}", "run_id": "run-1", "task": task, "split": split,
            "point": point, "role": role, "accuracy": accuracy, "f1": accuracy - 5, "b1_p50_ms": p50,
            "throughput_rows_per_s": rows_per_s, "batch_size_throughput": 32, "mean_exit_layer": exit_layer,
            "rows": 100, "cpu": "test cpu", "device": "cpu", "threads": threads, "dataset": "d",
            "git_commit": "abc", "mech_exit": point != "static", "mech_prune": False}


def _targets(folder: Path, task: str, monkeypatch, capsys, *extra: str) -> str:
    """Run the script's main() in this process (as its command line would) and return what it printed."""
    module = benchmark_script("targets")
    monkeypatch.setattr(sys, "argv", ["targets.py", "--results", str(folder), "--task", task, *extra])
    module.main()
    return capsys.readouterr().out


@pytest.mark.parametrize("tuned_accuracy, tuned_ms, verdict", [
    (84.2, 6.0, "MET"),  # 2.0x, -0.8 points
    (83.5, 6.0, "MISSED"),  # -1.5 points
    (84.9, 8.0, "MISSED"),  # 1.5x
])
def test_pair_task_target_six(tmp_path, monkeypatch, capsys, tuned_accuracy, tuned_ms, verdict):
    log = ResultsLog(tmp_path)
    log.append(_row("static", "baseline", 85.0, 12.0, 100))
    log.append(_row("eat:tuned", "tuned", tuned_accuracy, tuned_ms, 180, exit_layer=2.5))
    printed = _targets(tmp_path, "qqp", monkeypatch, capsys)
    line = [x for x in printed.splitlines() if x.startswith("T6")][0]
    assert line.endswith("(needs >= 1.6x and <= 1.0 point below)")
    assert f"-> {verdict}" in line


def test_pair_task_target_six_judges_the_batch_tuned_point_on_throughput(tmp_path, monkeypatch, capsys):
    """With an eat:tuned-b32 row, T6 gets a second line judged on batch-32 throughput; the batch-1 line stays."""
    log = ResultsLog(tmp_path)
    log.append(_row("static", "baseline", 85.0, 12.0, 100))
    log.append(_row("eat:tuned", "tuned", 84.8, 9.0, 140))  # 1.33x at batch 1
    log.append(_row("eat:tuned-b32", "tuned", 84.3, 9.5, 170))  # 1.70x at batch 32, -0.7 points
    lines = [x for x in _targets(tmp_path, "qqp", monkeypatch, capsys).splitlines() if x.startswith("T6")]
    assert len(lines) == 2
    assert lines[0].startswith("T6 batch 1, tuned point") and "1.33x" in lines[0] and "-> MISSED" in lines[0]
    assert lines[1].startswith("T6 batch 32, point tuned for batch 32") and "1.70x" in lines[1]
    assert "(-0.70 points) -> MET" in lines[1]


def test_batch_lines_show_the_length_sorted_ratio_when_measured(tmp_path, monkeypatch, capsys):
    """Rows that carry length-sorted throughput get that ratio printed beside the judged arrival-order one; the
    verdict stays on arrival order."""
    log = ResultsLog(tmp_path)
    log.append({**_row("static", "baseline", 85.0, 12.0, 100), "throughput_sorted_rows_per_s": 250.0})
    log.append({**_row("eat:tuned-b32", "tuned", 84.3, 9.5, 170), "throughput_sorted_rows_per_s": 350.0})
    line = [x for x in _targets(tmp_path, "qqp", monkeypatch, capsys).splitlines() if x.startswith("T6")][0]
    assert "1.70x static in arrival order, 1.40x on length-sorted batches" in line and "-> MET" in line


def test_targets_refuse_rows_measured_with_other_threads(tmp_path, monkeypatch, capsys):
    log = ResultsLog(tmp_path)
    log.append(_row("static", "baseline", 85.0, 12.0, 100, threads=2))
    log.append(_row("eat:tuned", "tuned", 84.9, 5.0, 200, threads=1))
    with pytest.raises(ReportError, match="measured differently.*threads: 2 vs 1"):
        _targets(tmp_path, "qqp", monkeypatch, capsys)


def test_sst2_batched_target_is_judged_on_the_tuned_point(tmp_path, monkeypatch, capsys):
    """A faster ablation row picked on dev must not stand in for the tuned point in T3."""
    log = ResultsLog(tmp_path)
    rows = [_row("static", "baseline", 89.0, 10.0, 100, task="sst2"),
            _row("half-depth", "baseline", 88.0, 5.0, 200, task="sst2"),
            {**_row("eat:tuned", "tuned", 88.7, 4.5, 140, task="sst2"), "mech_prune": True},
            {**_row("eat:prune+exit", "ablation", 88.9, 4.0, 190, task="sst2"), "mech_prune": True}]
    for row in rows:
        log.append(row)
    printed = _targets(tmp_path, "sst2", monkeypatch, capsys)
    t1 = [x for x in printed.splitlines() if x.startswith("T1")][0]
    t3 = [x for x in printed.splitlines() if x.startswith("T3")][0]
    assert "2.22x static" in t1 and t1.endswith("MET (needs >= 2.0x and <= 0.5 points below)")
    assert "1.40x static" in t3 and "-> MISSED" in t3  # the tuned point, not the 1.90x ablation row
    assert "reference only, picked on dev: eat:prune+exit 1.90x" in printed


def test_sst2_batched_target_prefers_the_point_tuned_for_that_batch_size(tmp_path, monkeypatch, capsys):
    """`eat tune --batch-size 32` writes eat:tuned-b32: T3 is judged on it, T1 still on the batch-1 tuned point."""
    log = ResultsLog(tmp_path)
    rows = [_row("static", "baseline", 89.0, 10.0, 100, task="sst2"),
            _row("half-depth", "baseline", 88.0, 5.0, 200, task="sst2"),
            _row("eat:tuned", "tuned", 88.7, 4.5, 140, task="sst2"),  # exits only
            {**_row("eat:tuned-b32", "tuned", 88.6, 6.0, 160, task="sst2"), "mech_prune": True}]
    for row in rows:
        log.append(row)
    printed = _targets(tmp_path, "sst2", monkeypatch, capsys)
    t3 = [x for x in printed.splitlines() if x.startswith("T3")][0]
    assert "eat:tuned-b32 (tuned for batch 32" in t3 and "1.60x static" in t3 and t3.endswith(
        "MET (needs >= 1.5x and <= 0.5 points below)")
    t1 = [x for x in printed.splitlines() if x.startswith("T1")][0]
    assert "2.22x static" in t1


def test_every_split_is_judged_on_its_own_interleaved_run(tmp_path, monkeypatch, capsys):
    """MNLI matched and mismatched are timed in separate runs: both splits are reported, each from its own run."""
    log = ResultsLog(tmp_path)
    for split, run, static_ms in (("validation_matched", "run-a", 12.0), ("validation_mismatched", "run-b", 10.0)):
        for row in (_row("static", "baseline", 70.0, static_ms, 100, split=split, task="mnli"),
                    _row("eat:tuned", "tuned", 69.5, 5.0, 200, split=split, task="mnli")):
            log.append({**row, "run_id": run, "config_hash": f"{row['config_hash']}-{run}"})
    printed = _targets(tmp_path, "mnli", monkeypatch, capsys)
    t6 = [x for x in printed.splitlines() if x.startswith("T6")]
    assert len(t6) == 2 and "2.40x static" in t6[0] and "2.00x static" in t6[1]


@pytest.mark.parametrize("device, tuned_ms, tuned_accuracy, verdict", [
    ("cuda", 2.0, 89.0, "-> MET"),  # 2.0x at no loss, on a GPU
    ("cuda", 3.0, 89.0, "-> MISSED"),  # 1.67x
    ("cuda", 2.0, 88.0, "-> MISSED"),  # fast, but 1.0 point below (T1's condition applied)
    ("cpu", 2.0, 89.0, "-> MISSED"),  # the script's dry run on CPU never counts
])
def test_gpu_target_eight(tmp_path, monkeypatch, capsys, device, tuned_ms, tuned_accuracy, verdict):
    """A CUDA run (benchmarks/gpu_t8.sh) is judged on T8 without a half-depth row; a CPU dry run says it is one."""
    log = ResultsLog(tmp_path)
    log.append({**_row("static", "baseline", 89.0, 4.0, 300, task="sst2"), "device": device, "b1_p90_ms": 5.0})
    log.append({**_row("eat:tuned", "tuned", tuned_accuracy, tuned_ms, 500, task="sst2", exit_layer=2.5),
                "device": device, "b1_p90_ms": 4.0})
    module = benchmark_script("targets")
    monkeypatch.setattr(sys, "argv", ["targets.py", "--results", str(tmp_path), "--task", "sst2", "--t8"])
    module.main()
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("T8")][0]
    assert verdict in line and ("dry run" in line) == (device == "cpu")


def test_target_two_is_judged_on_the_tuned_point_first(tmp_path, monkeypatch, capsys):
    """T2's first line is the calibration-chosen point; a better ablation row picked on dev only follows it."""
    log = ResultsLog(tmp_path)
    log.append(_row("static", "baseline", 90.0, 20.0, 80, task="sst2"))
    log.append(_row("half-depth", "baseline", 87.5, 10.0, 160, task="sst2"))
    log.append(_row("eat:tuned", "tuned", 88.0, 9.0, 170, task="sst2"))  # +0.5: misses
    log.append(_row("eat:exit", "ablation", 89.0, 9.5, 165, task="sst2"))  # +1.5, but picked on dev
    lines = [x for x in _targets(tmp_path, "sst2", monkeypatch, capsys).splitlines() if x.startswith("T2")]
    assert lines[0].startswith("T2 vs half-depth (tuned point, chosen on calibration): eat:tuned at 9.00 ms")
    assert lines[0].endswith("(+0.50 points) -> MISSED")
    assert lines[1].startswith("T2 vs half-depth (any measured point, picked on dev): eat:exit")
    assert lines[1].endswith("-> MET")


def test_accuracy_conditions_are_judged_on_all_rows_when_measured(tmp_path, monkeypatch, capsys):
    """`eat bench --accuracy-all-rows` rows: T6 is judged on the whole split's accuracies, the timed rows' drop is
    shown beside it. Here the timed rows say -0.6 (met) and the whole split -1.4 (missed)."""
    log = ResultsLog(tmp_path)
    log.append({**_row("static", "baseline", 85.0, 12.0, 100), "accuracy_all_rows": 86.0, "rows_all": 1000})
    log.append({**_row("eat:tuned", "tuned", 84.4, 6.0, 180, exit_layer=2.5), "accuracy_all_rows": 84.6,
                "rows_all": 1000})
    line = [x for x in _targets(tmp_path, "qqp", monkeypatch, capsys).splitlines() if x.startswith("T6")][0]
    assert "accuracy 84.60 (-1.40 points on all 1000 rows; -0.60 on the 100 timed rows) -> MISSED" in line


def test_a_folder_with_two_runs_names_them_and_judges_the_one_asked_for(tmp_path, monkeypatch, capsys):
    """A sample-only bench and a later all-rows bench in one folder: by default the latest static row's run is
    judged and the other run is named; --run-id judges the other one; an unknown run id says which exist."""
    log = ResultsLog(tmp_path)
    for run, tuned_ms, extra in (("run-sample", 6.0, {}), ("run-all", 8.0, {"accuracy_all_rows": 84.5, "rows_all": 900})):
        for row in (_row("static", "baseline", 85.0, 12.0, 100), _row("eat:tuned", "tuned", 84.8, tuned_ms, 180)):
            log.append({**row, **extra, "run_id": run, "config_hash": f"{row['config_hash']}-{run}"})
    printed = _targets(tmp_path, "qqp", monkeypatch, capsys)
    assert "judging run run-all; other runs here: run-sample (100 timed rows) (choose one with --run-id)" in printed
    assert "1.50x static" in [x for x in printed.splitlines() if x.startswith("T6")][0]
    printed = _targets(tmp_path, "qqp", monkeypatch, capsys, "--run-id", "run-sample")
    assert "judging run run-sample; other runs here: run-all (100 timed rows, all 900 rows)" in printed
    assert "2.00x static" in [x for x in printed.splitlines() if x.startswith("T6")][0]
    printed = _targets(tmp_path, "qqp", monkeypatch, capsys, "--run-id", "run-x")
    assert "no static row of run run-x (runs with one: run-sample (100 timed rows), run-all" in printed
