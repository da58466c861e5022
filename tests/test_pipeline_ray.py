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
