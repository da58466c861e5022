"""`eat run --ray` (eat.pipeline_ray) on a local Ray: the same results as without Ray, timing stages never
co-scheduled on a node."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_pipeline_on_ray_matches_plain_run(tmp_path, data_dir, tiny_backbone, monkeypatch):
    from eat.pipeline import run_task
    from eat.pipeline_ray import TIMING_RESOURCE, overlapping_timing, run_tasks_ray

    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"train_overrides": {"model": tiny_backbone}}
    ray.init(num_cpus=2, resources={TIMING_RESOURCE: 1}, include_dashboard=False,
             object_store_memory=80 * 1024**2, runtime_env={"env_vars": {"EAT_DATA_DIR": str(data_dir)}})
    try:
        summaries = run_tasks_ray(["sst2", "qqp"], "smoke", tmp_path / "runs", tmp_path / "results",
                                  run_kwargs=kwargs, log=lambda message: None)
        assert overlapping_timing(summaries) == []
        assert {s["task"] for s in summaries} == {"sst2", "qqp"} and all(s["threads"] == 2 for s in summaries)
        # a rerun reuses every training and measured point
        before = (tmp_path / "results" / "results.jsonl").read_text()
        run_tasks_ray(["sst2", "qqp"], "smoke", tmp_path / "runs", tmp_path / "results", run_kwargs=kwargs,
                      log=lambda message: None)
        assert (tmp_path / "results" / "results.jsonl").read_text() == before
    finally:
        ray.shutdown()
    run_task("sst2", "smoke", tmp_path / "plain-runs", tmp_path / "plain", **kwargs)
    on_ray = [json.loads(line) for line in (tmp_path / "results" / "results.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "plain" / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in on_ray} == {"sst2", "qqp"}
    # same models, same points: equal accuracy everywhere but at the tuned point, which the tuner may pick among
    # near-equal finalists by their measured latency (timing noise, with or without Ray)
    sst2 = {(r["point"], r["split"]): r["accuracy"] for r in on_ray if r["task"] == "sst2"}
    assert sst2.keys() == {(r["point"], r["split"]) for r in plain}
    assert {k: v for k, v in sst2.items() if k[0] != "eat:tuned"} == \
        {(r["point"], r["split"]): r["accuracy"] for r in plain if r["point"] != "eat:tuned"}
    for name in ("tuned_sst2.json", "run_config_sst2.json", "tau_sweep_sst2.csv", "report.md"):
        assert (tmp_path / "results" / name).is_file() and (tmp_path / "plain" / name).is_file(), name


def test_eat_run_ray_passes_the_run_settings(tmp_path, monkeypatch):
    """`eat run --ray ADDRESS` hands the tasks and the same run settings to run_tasks_ray (no Ray started here)."""
    from typer.testing import CliRunner

    import eat.pipeline_ray
    from eat.cli import app

    seen = {}

    def capture(tasks, preset, runs_dir, results_dir, **kwargs):
        seen.update(tasks=tuple(tasks), preset=preset, runs=runs_dir, **kwargs)
        return []

    monkeypatch.setattr(eat.pipeline_ray, "run_tasks_ray", capture)
    result = CliRunner().invoke(app, ["run", "--preset", "smoke", "--task", "all", "--runs", str(tmp_path),
                                      "--ray", "ray://head:10001", "--train-cpus", "2", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert seen["tasks"] == ("sst2", "qqp", "mnli") and seen["address"] == "ray://head:10001"
    assert seen["train_cpus"] == 2 and seen["run_kwargs"]["train_overrides"] == {"epochs": 1.0}
    assert seen["run_kwargs"]["recipe"] == "two-stage"


def test_a_cluster_without_timing_slots_is_refused(monkeypatch):
    import eat.pipeline_ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0}}])
    with pytest.raises(ValueError, match="offers the 'timing_slot' resource"):
        eat.pipeline_ray.timing_node_cpus()
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "timing_slot": 1.0}},
                                               {"Alive": True, "Resources": {"CPU": 4.0, "timing_slot": 1.0}},
                                               {"Alive": False, "Resources": {"CPU": 2.0, "timing_slot": 1.0}}])
    assert eat.pipeline_ray.timing_node_cpus() == 4
