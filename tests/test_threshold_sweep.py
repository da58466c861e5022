"""benchmarks/threshold_sweep.py: which thresholds it replays (a grid that starts near 0.8 hides where a
three-class task's exits happen) and its refusal of thresholds outside (0, 1]."""

from __future__ import annotations

import sys

import pytest

from .conftest import benchmark_script


def _script():
    """The script as a module."""
    return benchmark_script("threshold_sweep")


def test_binary_tasks_keep_the_fine_grid_near_one():
    sweep = _script()
    assert sweep.default_thresholds(2) == sweep.THRESHOLDS
    assert min(sweep.THRESHOLDS) == 0.8


@pytest.mark.parametrize("num_labels", [3, 5])
def test_multi_class_tasks_also_sweep_above_chance(num_labels):
    sweep = _script()
    grid = sweep.default_thresholds(num_labels)
    assert grid[0] == 0.4 and 0.5 in grid  # MNLI's heads exit at confidence 0.5-0.7
    assert all(t > 1.0 / num_labels for t in grid)
    assert list(grid) == sorted(set(grid))  # ascending, each once
    assert grid[-len(sweep.THRESHOLDS):] == sweep.THRESHOLDS


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2"])
def test_thresholds_outside_the_unit_interval_are_refused(bad, monkeypatch, capsys):
    sweep = _script()
    monkeypatch.setattr(sys, "argv", ["threshold_sweep.py", "--run", "nowhere", "--thresholds", "0.9", bad])
    with pytest.raises(SystemExit) as stopped:
        sweep.main()
    assert stopped.value.code == 2
    assert "--thresholds must lie in (0, 1]" in capsys.readouterr().err
