"""Timing, results logs, sweeps and the report: statistics on known values, resume, atomic appends."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from eat.bench import ablation_points, bench_config_from_preset, measure_points, tau_sweep
from eat.checkpoints import load_classifier
from eat.data import EncodedDataset
from eat.evaluation import predict_encoded
from eat.report import ReportError, build_report, load_results, pareto_front, run_speedups
from eat.results import ResultsError, ResultsLog
from eat.timing import LatencyStats, interleaved_latency, interleaved_throughput, throughput

from eat.modeling_eat import EATForSequenceClassification
from eat.tasks import TASKS

from .conftest import tiny_config, tiny_model


def test_latency_stats_on_known_values():
    stats = LatencyStats.from_seconds([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats.count == 100
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.min_ms == pytest.approx(1.0) and stats.max_ms == pytest.approx(100.0)
    assert stats.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert LatencyStats.from_seconds([0.002]).std_ms == 0.0
    with pytest.raises(ValueError):
        LatencyStats.from_seconds([])


def test_interleaved_timing_path_on_tiny_model():
    model = tiny_model()
    inputs = [torch.randint(3, 120, (1, n)) for n in (5, 9, 14, 20)]
    seen = []
    stats = interleaved_latency({"a": model, "b": lambda x: model(x[:, :3])}, inputs, warmup=1,
                                on_result=lambda name, i, out: seen.append((name, i)))
    assert set(stats) == {"a", "b"} and stats["a"].count == 4
    assert sorted(seen) == sorted((n, i) for n in "ab" for i in range(4))
    # the order rotates: input 1 starts with "b"
    assert seen[2][0] == "b"
    rows_per_s, per_batch = throughput(lambda x: model(x), [torch.randint(3, 120, (4, 8))] * 3, rows=12)
    assert rows_per_s > 0 and per_batch.count == 3


def test_interleaved_throughput_rotates_configurations_batch_by_batch():
    """Every configuration runs every batch once per pass, and the order rotates from batch to batch, so no
    configuration is timed only in one stretch of the run (the batch-32 columns of every bench row)."""
    model = tiny_model()
    batches = [torch.randint(3, 120, (4, n)) for n in (6, 9, 12)]
    order = []

    def call_for(name, keep):
        def call(x):
            order.append(name)
            return model(x[:, :keep])
        return call

    result = interleaved_throughput({"a": call_for("a", 6), "b": call_for("b", 3), "c": call_for("c", 2)},
                                    batches, rows=12, warmup=1, repeats=2)
    assert order[:3] == ["a", "b", "c"]  # warm-up: one batch each, one configuration at a time
    timed = order[3:]
    assert len(timed) == 2 * 3 * 3  # 2 passes x 3 batches x 3 configurations
    assert [timed[i * 3:i * 3 + 3] for i in range(3)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for name in "abc":
        rows_per_s, per_batch = result[name]
        assert rows_per_s > 0 and per_batch.count == 3  # the best pass's three batches
        assert rows_per_s == pytest.approx(12 / (per_batch.mean_ms * 3 / 1e3))


def _encoded(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 30, (n,), generator=generator).tolist()
    ids = [[1] + torch.randint(3, 120, (length - 2,), generator=generator).tolist() + [102 % 120] for length in lengths]
    labels = torch.randint(0, 3, (n,), generator=generator).tolist()
    return EncodedDataset(ids, [[0] * len(row) for row in ids], labels, 0, lengths)


def test_tau_sweep_from_cache_equals_rerunning_at_that_tau():
    model = tiny_model(seed=11, exit_layers="all", keep_ratio=0.7)
    encoded = _encoded()
    cached = predict_encoded(model, encoded, cache_exits=True)
    confidence = torch.tensor(cached.exit_logits).softmax(-1).amax(-1)  # (N, E)
    taus = [float(q) for q in confidence[:, :2].flatten().quantile(torch.tensor([0.2, 0.5, 0.8]))] + [1.01]
    sweep = tau_sweep(model, encoded, taus)
    for row in sweep:
        model.config.set_knobs(exit_policy="confidence", exit_threshold=row["tau"])
        rerun = predict_encoded(model, encoded)
        assert row["accuracy"] == pytest.approx(100.0 * float((rerun.predictions == rerun.labels).mean()))
        assert row["mean_exit_layer"] == pytest.approx(float(rerun.exit_layer.mean()))
        lengths = rerun.input_length
        assert row["token_layer_fraction"] == pytest.approx(rerun.tokens_per_layer.sum() / (lengths.sum() * 4))
    assert len({row["mean_exit_layer"] for row in sweep}) > 1  # the thresholds really differ


def test_bench_reports_accuracy_on_all_rows_beside_the_timed_sample(tmp_path):
    """With all_rows, every row also carries the accuracy of its point on the whole split (what `eat eval` computes
    there), and the rows get other hashes than a bench of the sample alone (not mistaken for one another)."""
    folder = tmp_path / "ckpt"
    tiny_model().save_pretrained(folder)
    bench = bench_config_from_preset("smoke", rows=None, batch_size=8)
    whole, sample = _encoded(40, seed=3), _encoded(10, seed=4)
    points = ablation_points(str(folder), bench, tau=0.6)[:3]
    log = ResultsLog(tmp_path / "results")
    rows = measure_points(points, sample, bench, log, dataset_source="fixture", all_rows=whole)
    for point, row in zip(points, rows):
        reference = predict_encoded(load_classifier(str(folder), knobs=point.knobs), whole)
        expected = 100.0 * float((reference.logits.argmax(-1) == reference.labels).mean())
        assert row["rows"] == 10 and row["rows_all"] == 40
        assert row["accuracy_all_rows"] == pytest.approx(expected)
    assert len({row["accuracy_all_rows"] for row in rows} | {rows[0]["accuracy"]}) > 1  # not one number copied
    sample_only = measure_points(points, sample, bench, log, dataset_source="fixture")
    assert len(sample_only) == 3 and "accuracy_all_rows" not in sample_only[0]
    assert {row["config_hash"] for row in rows}.isdisjoint(row["config_hash"] for row in sample_only)


def test_bench_times_length_sorted_batches_beside_arrival_order(tmp_path):
    """Every row carries throughput on the same rows in length-sorted batches and the padding share of both
    orders (sorted pays less); with sorted_throughput off neither is measured."""
    folder = tmp_path / "ckpt"
    tiny_model().save_pretrained(folder)
    encoded = _encoded(24, seed=5)
    assert len(set(encoded.lengths)) > 1  # mixed lengths, so the two orders pad differently
    points = ablation_points(str(folder), bench_config_from_preset("smoke"), tau=0.6)[:2]
    bench = bench_config_from_preset("smoke", rows=None, batch_size=4)
    rows = measure_points(points, encoded, bench, ResultsLog(tmp_path / "a"), dataset_source="fixture")
    for row in rows:
        assert row["throughput_sorted_rows_per_s"] > 0 and row["throughput_rows_per_s"] > 0
        assert 0.0 <= row["padding_share_sorted"] < row["padding_share_arrival"]
    off = bench_config_from_preset("smoke", rows=None, batch_size=4, sorted_throughput=False)
    plain = measure_points(points, encoded, off, ResultsLog(tmp_path / "b"), dataset_source="fixture")
    assert all("throughput_sorted_rows_per_s" not in row and "padding_share_arrival" not in row for row in plain)


def test_the_row_schema_names_every_key_measure_points_writes(tmp_path):
    """eat.results names a measured row's keys (ResultRow; the latency statistics come as b1_* and bN_batch_*), its
    column and point-name constants are what measure_points writes, and the file helpers keep the names on disk."""
    import re

    from eat.results import (B1_P50_MS, EXITS_OFF, STATIC, THROUGHPUT, THROUGHPUT_SORTED, TUNED, ResultRow,
                             batch_tuned_files, run_config_file, tuned_file, tuned_point_name)

    folder = tmp_path / "ckpt"
    tiny_model().save_pretrained(folder)
    points = ablation_points(str(folder), bench_config_from_preset("smoke"), tau=0.6, static_checkpoint=str(folder))
    assert points[0].name == EXITS_OFF and points[-1].name == STATIC
    bench = bench_config_from_preset("smoke", rows=None, batch_size=4)
    rows = measure_points([points[0], points[-1]], _encoded(8), bench, ResultsLog(tmp_path / "r"),
                          dataset_source="fixture", examples_dir=tmp_path / "r" / "examples")
    latency = re.compile(r"b\d+(_batch)?_(count|[a-z0-9]+_ms)$")
    for row in rows:
        assert {B1_P50_MS, THROUGHPUT, THROUGHPUT_SORTED} <= set(row)
        assert [key for key in row if key not in ResultRow.__annotations__ and not latency.match(key)] == []
    assert tuned_point_name() == TUNED and tuned_point_name(32) == "eat:tuned-b32"
    assert [tuned_file(tmp_path, "mnli", *args).name for args in ((), (32,), (1, "int8"), (32, "int8"))] == [
        "tuned_mnli.json", "tuned_mnli_b32.json", "tuned_mnli_int8.json", "tuned_mnli_b32_int8.json"]
    for name in ("tuned_mnli_b32.json", "tuned_mnli_b32_int8.json", "tuned_mnli_int8.json", "tuned_qqp_b8.json"):
        (tmp_path / name).write_text("{}")
    assert batch_tuned_files(tmp_path, "mnli") == {32: tmp_path / "tuned_mnli_b32.json"}
    assert batch_tuned_files(tmp_path, "mnli", "int8") == {32: tmp_path / "tuned_mnli_b32_int8.json"}
    assert run_config_file(tmp_path, "sst2") == tmp_path / "run_config_sst2.json"


def test_results_log_resume_skip_and_corrupt_file(tmp_path, tiny_backbone):
    folder = tmp_path / "ckpt"
    tiny = tiny_model()
    tiny.save_pretrained(folder)
    bench = bench_config_from_preset("smoke", rows=None, batch_size=8)
    encoded = _encoded(16)
    log = ResultsLog(tmp_path / "results")
    points = ablation_points(str(folder), bench)
    assert len(points) == 8 and len({json.dumps(p.knobs, sort_keys=True) for p in points}) == 8
    # a tuned point that chose no pruning still yields ablation rows that really prune
    tuned = ablation_points(str(folder), bench, tau=0.9, keep=1.0)
    assert len({json.dumps(p.knobs, sort_keys=True) for p in tuned}) == 8
    assert all(p.mechanisms()["prune"] == ("prune" in p.name) for p in tuned)
    first = measure_points(points[:3], encoded, bench, log, dataset_source="fixture")
    assert len(first) == 3 and len(log.rows()) == 3
    assert measure_points(points[:3], encoded, bench, log, dataset_source="fixture") == []  # all measured: skipped
    import eat.bench

    here = eat.bench.environment(bench.device)
    with pytest.MonkeyPatch.context() as patch:  # the same folder on another CPU: measured there, not reused
        patch.setattr(eat.bench, "environment", lambda device: {**here, "cpu": here["cpu"] + " (another machine)"})
        elsewhere = measure_points(points[:3], encoded, bench, log, dataset_source="fixture")
    assert len(elsewhere) == 3 and {row["cpu"] for row in log.rows()} == {here["cpu"], elsewhere[0]["cpu"]}
    log = ResultsLog(tmp_path / "results-here")  # a folder measured here only, for the rest of the test
    measure_points(points[:3], encoded, bench, log, dataset_source="fixture")
    again = measure_points(points[:4], encoded, bench, log, dataset_source="fixture")
    # one new point: the whole table is timed again side by side (one run_id), old rows replaced, not duplicated
    assert [row["point"] for row in again] == [p.name for p in points[:4]]
    assert len(log.rows()) == 4 and len({row["run_id"] for row in log.rows()}) == 1
    forced = measure_points(points[:1], encoded, bench, log, dataset_source="fixture", force=True)
    assert len(forced) == 1 and len(log.rows()) == 4  # replaced, not duplicated
    row = log.rows()[0]
    for key in ("task", "knobs", "tau", "device", "threads", "torch", "transformers", "cpu", "seed", "git_commit",
                "timestamp", "config_hash", "b1_p50_ms", "b1_p99_ms", "throughput_rows_per_s", "accuracy"):
        assert key in row
    assert row["accuracy"] == row["accuracy_batched"]  # batched and one-at-a-time agree
    csv_rows = pd.read_csv(log.csv)
    assert len(csv_rows) == 4
    good = log.jsonl.read_text()
    log.jsonl.write_text(good + '{"config_hash": "x", "broken": \n')
    with pytest.raises(ResultsError, match="line 5 is not valid JSON"):
        log.append({"config_hash": "new"})
    assert log.jsonl.read_text().startswith(good)  # nothing was overwritten


def test_interrupted_append_leaves_a_readable_file(tmp_path, monkeypatch):
    import eat.results as results

    log = ResultsLog(tmp_path)
    log.append({"config_hash": "a", "value": 1})
    original = results.os.replace

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        log.append({"config_hash": "b", "value": 2})
    monkeypatch.setattr(results.os, "replace", original)
    assert [row["config_hash"] for row in log.rows()] == ["a"]
    assert pd.read_csv(log.csv)["config_hash"].tolist() == ["a"]


def _fixture_rows():
    base = dict(task="sst2", split="validation", role="ablation", layers=6, device="cpu", threads=2, cpu="test cpu",
                gpu="", torch="2", transformers="5", git_commit="abc", dataset="fixture", rows=10,
                batch_size_throughput=32, b1_p90_ms=1.0, b1_p99_ms=1.0, mech_prune=False, mech_sparse=False,
                mech_exit=False, exit_distribution={"6": 10}, mean_exit_layer=6.0, token_layer_fraction=1.0)
    return [
        {**base, "point": "static", "role": "baseline", "accuracy": 90.0, "b1_p50_ms": 10.0,
         "throughput_rows_per_s": 100.0, "config_hash": "1"},
        {**base, "point": "half-depth", "role": "baseline", "accuracy": 87.0, "b1_p50_ms": 5.0,
         "throughput_rows_per_s": 200.0, "config_hash": "2", "layers": 3, "exit_distribution": {"3": 10},
         "mean_exit_layer": 3.0},
        {**base, "point": "eat:exit", "accuracy": 89.8, "b1_p50_ms": 4.0, "throughput_rows_per_s": 220.0,
         "config_hash": "3", "mech_exit": True, "exit_distribution": {"2": 6, "6": 4}, "mean_exit_layer": 3.6},
        {**base, "point": "eat:none", "accuracy": 90.0, "b1_p50_ms": 10.5, "throughput_rows_per_s": 98.0,
         "config_hash": "4"},
    ]


def test_report_builds_from_fixture_results(tmp_path):
    log = ResultsLog(tmp_path)
    for row in _fixture_rows():
        log.append(row)
    path = build_report(tmp_path)
    text = path.read_text()
    assert "plots/sst2_frontier.png" in text and (tmp_path / "plots" / "sst2_frontier.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "sst2_ablation.png").is_file() and (tmp_path / "plots" / "sst2_exit_layers.png").is_file()
    assert "| eat:exit | ablation | 89.80 | 4.00 |" in text and "2.50x" in text  # 10 ms static / 4 ms
    frame = pd.DataFrame(_fixture_rows())
    assert pareto_front(frame).tolist() == [True, False, True, False]


def test_report_takes_speedups_within_each_run(tmp_path):
    """A row timed in another run (e.g. the dev rows `eat tune` logs) is divided by its own run's reference, never
    by a static row it was not timed beside; a run without a reference shows no speedup."""
    log = ResultsLog(tmp_path)
    for row in _fixture_rows():
        log.append({**row, "run_id": "bench-run"})
    base = {**_fixture_rows()[3], "run_id": "tune-run"}
    log.append({**base, "config_hash": "5", "b1_p50_ms": 20.0, "throughput_rows_per_s": 50.0})  # a slower spell
    log.append({**base, "config_hash": "6", "point": "eat:tuned", "role": "tuned", "b1_p50_ms": 8.0,
                "throughput_rows_per_s": 100.0, "mech_exit": True})
    log.append({**base, "config_hash": "7", "point": "eat:exit", "run_id": "lonely-run", "b1_p50_ms": 4.0})
    text = build_report(tmp_path).read_text()
    assert "| run |" in text
    assert "| eat:tuned | tuned | tune-run | 90.00 | 8.00 |" in text and "| 2.50x | 100 | 2.00x |" in text  # 20 / 8
    assert "| eat:exit | ablation | bench-run | 89.80 | 4.00 |" in text and "| 2.50x | 220 | 2.20x |" in text
    assert "| eat:exit | ablation | lonely-run | 90.00 | 4.00 | 1.00 | 1.00 | - | 98 | - |" in text
    # the frontier plot's axes come from the same per-run ratios (tuned: 20 / 8 ms, not the bench run's 10 / 8)
    speeds = run_speedups(load_results(tmp_path)).set_index(["run_id", "point"])
    assert speeds.loc[("tune-run", "eat:tuned"), "speedup_b1"] == pytest.approx(2.5)
    assert speeds.loc[("tune-run", "eat:tuned"), "speedup_batch"] == pytest.approx(2.0)
    assert speeds.loc[("bench-run", "eat:exit"), "speedup_b1"] == pytest.approx(2.5)
    assert pd.isna(speeds.loc[("lonely-run", "eat:exit"), "speedup_b1"])


def test_report_shows_length_sorted_throughput_when_every_row_has_it(tmp_path):
    """Rows with length-sorted throughput get two more columns (rows/s and speedup against the same run's static)
    and a line naming both orders' padding; a log where some row lacks it keeps the old table."""
    sorted_rates = {"static": 250.0, "half-depth": 480.0, "eat:exit": 400.0, "eat:none": 245.0}
    log = ResultsLog(tmp_path / "both")
    for row in _fixture_rows():
        arrival = 0.57 if row["point"] == "half-depth" else 0.5  # as if sampled otherwise: a range is shown
        log.append({**row, "throughput_sorted_rows_per_s": sorted_rates[row["point"]],
                    "padding_share_arrival": arrival, "padding_share_sorted": 0.04})
    text = build_report(tmp_path / "both").read_text()
    assert "| rows/s (sorted) | speedup sorted |" in text
    assert "| 220 | 2.20x | 400 | 1.60x |" in text  # eat:exit: 220 / 100 arrival, 400 / 250 sorted
    assert "arrival order (padding share 50-57%)" in text and "(padding 4%)" in text
    mixed = ResultsLog(tmp_path / "mixed")
    for i, row in enumerate(_fixture_rows()):
        mixed.append({**row, **({"throughput_sorted_rows_per_s": 1.0} if i else {})})
    assert "rows/s (sorted)" not in build_report(tmp_path / "mixed").read_text()


def test_tuner_breaks_near_ties_in_timing_by_work():
    """Finalists timed within TIMING_TIE of the fastest are a tie won by the least token-layer work; a clearly
    faster finalist still wins even with more work. Both for throughput (higher is faster) and latency."""
    from eat.bench import TIMING_TIE, fastest_within_noise

    near = [{"name": "a", "calibration_rows_per_s": 79.0, "token_layer_fraction": 0.70},
            {"name": "b", "calibration_rows_per_s": 76.3, "token_layer_fraction": 0.68},  # 3.4% slower, less work
            {"name": "off", "calibration_rows_per_s": 48.5, "token_layer_fraction": 1.0}]
    assert 0.034 < TIMING_TIE
    assert fastest_within_noise(near, "calibration_rows_per_s", higher_is_faster=True)["name"] == "b"
    far = [dict(near[0], calibration_rows_per_s=90.0), *near[1:]]
    assert fastest_within_noise(far, "calibration_rows_per_s", higher_is_faster=True)["name"] == "a"
    latency = [{"name": "a", "calibration_p50_ms": 19.75, "token_layer_fraction": 0.70},
               {"name": "b", "calibration_p50_ms": 20.10, "token_layer_fraction": 0.68},
               {"name": "c", "calibration_p50_ms": 25.0, "token_layer_fraction": 0.50}]
    assert fastest_within_noise(latency, "calibration_p50_ms", higher_is_faster=False)["name"] == "b"
    assert fastest_within_noise(latency, "calibration_p50_ms", higher_is_faster=False, tolerance=0.0)["name"] == "a"


def test_report_refuses_to_compare_different_thread_counts(tmp_path):
    log = ResultsLog(tmp_path)
    rows = _fixture_rows()
    rows[2]["threads"] = 8
    for row in rows:
        log.append(row)
    with pytest.raises(ReportError, match="measured differently.*threads: 2 vs 8"):
        build_report(tmp_path)


def test_report_without_data_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no results"):
        build_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("not json\n")
    with pytest.raises(ReportError, match="not valid JSON"):
        build_report(tmp_path)
    assert (tmp_path / "results.jsonl").read_text() == "not json\n"


def test_tune_prefers_exits_off_to_a_threshold_that_never_fires(tmp_path, tiny_backbone):
    """A tau no row meets would evaluate every head for nothing: the tuner must choose real exits-off instead."""
    from eat.bench import tune

    folder = tmp_path / "ckpt"
    tiny_model(seed=3, exit_layers="all").save_pretrained(folder)
    result = tune(str(folder), _encoded(24), max_drop=0.0, keep_grid=(1.0,), tau_grid=[1.01], timing_rows=4,
                  warmup=1, policies=("confidence",), exit_depths=None, first_heads=(1,))
    assert result.knobs["exit_policy"] == "none" and result.knobs["exit_layers"] is None
    assert [c["exit_policy"] for c in result.candidates] == ["none"]
    assert result.calibration_accuracy == result.reference_accuracy


def test_tune_measures_the_drop_against_a_reference_run(tmp_path, tiny_backbone):
    """--reference: the allowed drop is counted from another model's calibration accuracy (e.g. static)."""
    from eat.bench import tune

    eat_folder, static_folder = tmp_path / "eat", tmp_path / "static"
    tiny_model(seed=3, exit_layers="all").save_pretrained(eat_folder)
    tiny_model(seed=8).save_pretrained(static_folder)
    encoded = _encoded(24)
    static = predict_encoded(tiny_model(seed=8), encoded)
    expected = 100.0 * float((static.predictions == static.labels).mean())
    result = tune(str(eat_folder), encoded, max_drop=0.0, keep_grid=(1.0,), tau_grid=[1.01], timing_rows=4,
                  warmup=1, policies=("confidence",), reference_checkpoint=str(static_folder))
    assert result.reference_accuracy == pytest.approx(expected)
    assert "reference run" in result.criterion
    off = predict_encoded(tiny_model(seed=3, exit_layers="all"), encoded)
    assert result.candidates[-1]["accuracy"] == pytest.approx(100.0 * float((off.predictions == off.labels).mean()))


def test_tune_drops_exit_heads_no_calibration_row_leaves_at(tmp_path, tiny_backbone):
    """Confidence rule: a head nobody exits at is removed from exit_layers; the calibration decisions stay the same."""
    from eat.bench import _tuned_knobs, tune

    model = tiny_model(seed=3, exit_layers="all")
    with torch.no_grad():  # the layer-1 head predicts uniformly (max probability 1/3): it can never fire
        model.exit_heads["1"].classifier.weight.zero_()
        model.exit_heads["1"].classifier.bias.zero_()
        model.exit_heads["2"].classifier.bias.copy_(torch.tensor([0.0, 0.3, 0.0]))  # max prob ~0.403
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    encoded = _encoded(24)
    result = tune(str(folder), encoded, max_drop=100.0, keep_grid=(1.0,), tau_grid=[0.403], timing_rows=4,
                  warmup=1, policies=("confidence",))
    chosen = result.candidates[0]  # the confidence candidate (which one is faster on a tiny model is timing noise)
    assert chosen["exit_policy"] == "confidence" and chosen["exit_layers_used"][0] == 2
    knobs = _tuned_knobs(chosen)
    assert 1 not in knobs["exit_layers"] and knobs["exit_layers"] == chosen["exit_layers_used"]
    tuned = load_classifier(str(folder), knobs=knobs)
    assert "1" not in [str(layer) for layer in tuned.config.exit_layer_list]
    every_head = load_classifier(str(folder), knobs={**knobs, "exit_layers": "all"})
    with_fewer, with_all = predict_encoded(tuned, encoded), predict_encoded(every_head, encoded)
    assert (with_fewer.predictions == with_all.predictions).all() and (with_fewer.exit_layer == with_all.exit_layer).all()
    assert sorted(set(with_all.exit_layer.tolist())) == chosen["exit_layers_used"]


def test_tune_for_batch_throughput_ranks_by_rows_per_second(tmp_path, tiny_backbone):
    """batch_size > 1: every finalist gets a measured calibration throughput and the winner has the highest."""
    from eat.bench import tune

    folder = tmp_path / "ckpt"
    tiny_model(seed=3, exit_layers="all").save_pretrained(folder)
    result = tune(str(folder), _encoded(40), max_drop=100.0, keep_grid=(1.0, [0.9, 0.6]), tau_grid=[0.34, 0.9],
                  timing_rows=16, warmup=1, policies=("confidence",), batch_size=8)
    speeds = [c["calibration_rows_per_s"] for c in result.candidates]
    assert len(speeds) >= 2 and all(s > 0 for s in speeds)
    assert "highest batch-8 throughput" in result.criterion
    # the fastest, or a finalist timed within the tie tolerance of it with less work: which one depends on this
    # machine's timing, so the rule is checked on the timings recorded, not a winner assumed
    from eat.bench import fastest_within_noise

    best = fastest_within_noise(result.candidates, "calibration_rows_per_s", higher_is_faster=True)
    assert result.calibration_accuracy == best["accuracy"]
    with pytest.raises(ValueError, match="needs max_drop"):
        tune(str(folder), _encoded(8), latency_budget_ms=5.0, batch_size=8)


def test_drop_upper_bound_on_known_counts():
    """Exact paired bound: 0 with no discordant row; all discordant rows worse -> p = 1; otherwise the p at which
    seeing so few worse rows has probability 1 - confidence (the Clopper-Pearson definition)."""
    from scipy.stats import binom

    from eat.bench import drop_upper_bound

    assert drop_upper_bound(0, 0, 500, 0.9) == 0.0
    assert drop_upper_bound(10, 0, 100, 0.9) == pytest.approx(10.0)  # p <= 1: drop <= 10 of 100 rows
    bound = drop_upper_bound(60, 40, 2000, 0.9)
    p_upper = (bound / 100.0 * 2000 / 100 + 1.0) / 2.0
    assert binom.cdf(60, 100, p_upper) == pytest.approx(0.1, abs=1e-6)
    assert bound > 100.0 * (60 - 40) / 2000  # above the point estimate (1.0 point)
    assert drop_upper_bound(60, 40, 2000, 0.99) > bound  # more confidence, wider
    assert drop_upper_bound(600, 400, 20000, 0.9) < bound  # same rates, 10x the rows: tighter
    with pytest.raises(ValueError, match="strictly between"):
        drop_upper_bound(1, 1, 10, 1.0)


def test_drop_upper_bound_covers_the_true_drop():
    """Simulated calibration sets whose true drop is exactly 1 point (5.5% rows worse, 4.5% better): the bound
    certifies "drop <= 1" in at most ~10% of them at 90% confidence, while the point estimate does in about half."""
    from eat.bench import drop_upper_bound

    rng = np.random.default_rng(0)
    rows, trials = 2000, 2000
    counts = rng.multinomial(rows, [0.055, 0.045, 0.90], size=trials)
    certified = [drop_upper_bound(int(w), int(b), rows, 0.9) <= 1.0 for w, b, _ in counts]
    point_estimate = [100.0 * (w - b) / rows <= 1.0 for w, b, _ in counts]
    assert np.mean(certified) <= 0.10 + 3 * np.sqrt(0.1 * 0.9 / trials)
    assert np.mean(point_estimate) > 0.4


def test_certified_prefix_stops_at_the_first_threshold_that_fails():
    """Fixed-sequence: a looser threshold that happens to look fine after a failing one is not certified."""
    from eat.bench import certified_prefix

    sweep = [{"tau": 0.6, "rows_worse": 5, "rows_better": 5},      # a lucky dip below the failure
             {"tau": 0.7, "rows_worse": 60, "rows_better": 10},    # fails: ~2.5 points worse
             {"tau": 0.8, "rows_worse": 12, "rows_better": 10},
             {"tau": 0.9, "rows_worse": 2, "rows_better": 1}]
    kept = certified_prefix(sweep, max_drop=1.0, rows=2000, confidence=0.9)
    assert [row["tau"] for row in kept] == [0.9, 0.8]
    assert all(row["drop_upper_bound"] <= 1.0 for row in kept)
    assert sweep[1]["drop_upper_bound"] > 1.0 and "drop_upper_bound" not in sweep[0]


def test_tune_with_certify_only_keeps_points_it_can_bound(tmp_path, tiny_backbone):
    """Every row leaving at layer 1 (tau 0): with room to spare the tuner certifies that point and records its
    bound; with max_drop 0 against the checkpoint itself it cannot (the exit turns right rows wrong), so it falls
    back to exits off, whose bound is 0."""
    from eat.bench import tune

    model = tiny_model(seed=3, exit_layers="all")
    with torch.no_grad():  # the layer-1 head always says class 0: rows of other classes the model got right turn wrong
        model.exit_heads["1"].classifier.weight.zero_()
        model.exit_heads["1"].classifier.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    encoded = _encoded(40)
    common = dict(keep_grid=(1.0,), tau_grid=[0.0], timing_rows=4, warmup=1, policies=("confidence",), certify=0.9,
                  exit_depths=None, first_heads=(1,))  # no caps, every head: one sweep (caps: see test_tune_searches_depth_caps...)
    loose = tune(str(folder), encoded, max_drop=100.0, **common)
    exit_point = next(c for c in loose.candidates if c["exit_policy"] == "confidence")
    assert exit_point["mean_exit_layer"] == 1.0 and exit_point["rows_worse"] > 0
    assert 0.0 < exit_point["drop_upper_bound"] <= 100.0
    strict = tune(str(folder), encoded, max_drop=0.0, **common)
    assert strict.knobs["exit_policy"] == "none" and strict.certify == 0.9
    assert [c["exit_policy"] for c in strict.candidates] == ["none"]
    assert strict.drop_upper_bound == 0.0 and "certified at 90% confidence" in strict.criterion
    assert "Bonferroni over 1 test)" in strict.criterion  # one sweep; exits off against itself is exact
    # against a reference run, exits off is one more test sharing the error
    referenced = tune(str(folder), encoded, max_drop=100.0, reference_checkpoint=str(folder), **common)
    assert "Bonferroni over 2 tests)" in referenced.criterion
    # a reference that even exits-off falls short of (it always says the most common label, EAT another one):
    # a clear error, not a silent choice
    common_label = int(np.bincount(encoded.labels).argmax())
    for name, label in (("reference", common_label), ("eat", (common_label + 1) % 3)):
        constant = tiny_model(seed=3, exit_layers="all")
        with torch.no_grad():
            constant.classifier.weight.zero_()
            constant.classifier.bias.copy_(10.0 * torch.nn.functional.one_hot(torch.tensor(label), 3).float())
        constant.save_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match="every mechanism off can be certified"):
        tune(str(tmp_path / "eat"), encoded, max_drop=0.0, reference_checkpoint=str(tmp_path / "reference"), **common)
    with pytest.raises(ValueError, match="needs max_drop"):
        tune(str(folder), encoded, latency_budget_ms=5.0, certify=0.9)


def test_certified_tuning_walks_a_finer_grid_near_one(tmp_path, monkeypatch):
    """Without a tau_grid, --certify walks 0.001 steps above 0.9 (fixed-sequence testing pays nothing for them);
    the point-estimate tuner keeps 0.01 steps (each extra threshold is one more chance of a lucky dip). Both start
    just above chance: 0.5 for two classes, 0.34 for three."""
    import eat.bench as bench_module

    assert {0.99, 0.994, 0.999, 1.0} <= set(bench_module.CERTIFY_TAU_GRID) and 0.5 in bench_module.CERTIFY_TAU_GRID
    assert 0.505 not in bench_module.CERTIFY_TAU_GRID and len(bench_module.CERTIFY_TAU_GRID) == 141
    folder = tmp_path / "ckpt"
    tiny_model(seed=3, exit_layers="all").save_pretrained(folder)
    seen = []
    real_sweep = bench_module.replay_sweep

    def recording_sweep(cached, taus, **kwargs):
        if kwargs.get("policy") != "none":  # the rules' sweeps, not the depth truncations
            seen.append(list(taus))
        return real_sweep(cached, taus, **kwargs)

    monkeypatch.setattr(bench_module, "replay_sweep", recording_sweep)
    common = dict(keep_grid=(1.0,), timing_rows=4, warmup=1, policies=("confidence",), exit_depths=None,
                  first_heads=(1,))
    binary = tmp_path / "binary"
    tiny_model(seed=3, exit_layers="all", num_labels=2).save_pretrained(binary)
    binary_rows = _encoded(24)
    binary_rows.labels = [label % 2 for label in binary_rows.labels]
    bench_module.tune(str(binary), binary_rows, max_drop=100.0, certify=0.9, **common)
    bench_module.tune(str(binary), binary_rows, max_drop=100.0, **common)
    assert seen[0] == list(bench_module.CERTIFY_TAU_GRID) and len(seen[1]) == 51 and 0.994 not in seen[1]
    # three classes: a head's top probability can be as low as 1/3, so both grids also cover 0.34-0.49
    bench_module.tune(str(folder), _encoded(24), max_drop=100.0, certify=0.9, **common)
    bench_module.tune(str(folder), _encoded(24), max_drop=100.0, **common)
    below_half = [k / 100 for k in range(34, 50)]
    assert seen[2] == below_half + list(bench_module.CERTIFY_TAU_GRID)
    assert seen[3] == below_half + list(bench_module.TAU_GRID)


def test_an_interrupted_mnli_run_that_measured_one_split_keeps_its_sweep_plot(tmp_path):
    """The pipeline names MNLI's sweep file by split (it is evaluated on two); the report must find it even when
    only one split has been measured so far (it used to call the series plain 'mnli' and lose the plot)."""
    from eat.results import series_name, sweep_file

    log = ResultsLog(tmp_path)
    for row in _fixture_rows():
        log.append({**row, "task": "mnli", "split": "validation_matched"})
    sweep = sweep_file(tmp_path, series_name("mnli", "validation_matched", 2))
    assert sweep.name == "tau_sweep_mnli_validation_matched.csv"
    pd.DataFrame({"tau": [0.5, 0.9], "accuracy": [80.0, 84.0], "mean_exit_layer": [2.0, 4.0]}).to_csv(sweep,
                                                                                                        index=False)
    text = build_report(tmp_path).read_text()
    assert "mnli:validation_matched" in text
    assert "plots/mnli_validation_matched_tau_sweep.png" in text


def test_a_capped_replay_equals_the_capped_model():
    """replay_sweep(exit_depth=D) on the uncapped cache says what the model run with exit_depth=D does: exit layers,
    accuracy and token-layer work, for a rule and for a pure truncation."""
    from eat.bench import _tuned_knobs, replay_sweep

    model = tiny_model(seed=11, exit_layers="all")
    encoded = _encoded()
    cached = predict_encoded(model, encoded, cache_exits=True)
    confidence = torch.tensor(cached.exit_logits).softmax(-1).amax(-1)  # (N, E)
    tau = float(confidence[:, 0].median())
    capped = replay_sweep(cached, [tau], policy="confidence", exit_depth=3)[0]
    truncated = replay_sweep(cached, [1.0], policy="none", exit_depth=2)[0]
    for row, policy in ((capped, "confidence"), (truncated, "none")):
        row.update(keep_ratio=1.0, exit_policy=policy)
        knobs = _tuned_knobs(row)
        assert knobs["exit_depth"] == row["exit_depth"]
        model.config.set_knobs(**knobs)
        rerun = predict_encoded(model, encoded)
        assert rerun.exit_layer.max() <= row["exit_depth"]
        assert row["accuracy"] == pytest.approx(100.0 * float((rerun.predictions == rerun.labels).mean()))
        assert row["mean_exit_layer"] == pytest.approx(float(rerun.exit_layer.mean()))
        lengths = rerun.input_length
        assert row["token_layer_fraction"] == pytest.approx(rerun.tokens_per_layer.sum() / (lengths.sum() * 4))
    assert 1.0 < capped["mean_exit_layer"] < 3.0 and truncated["mean_exit_layer"] == 2.0
    assert _tuned_knobs(truncated)["exit_layers"] == [2]  # only the cap's head is evaluated
    with pytest.raises(ValueError, match="exit_depth 5 is not one of the cached heads"):
        replay_sweep(cached, [tau], exit_depth=5)


def test_exit_depth_grid():
    from eat.bench import exit_depth_grid

    assert exit_depth_grid(6) == [2, 3, 4, 5, 6] and exit_depth_grid(6, None) == [6]
    assert exit_depth_grid(6, [4, 3]) == [3, 4, 6]
    with pytest.raises(ValueError, match="within 1..6"):
        exit_depth_grid(6, [7])
    with pytest.raises(ValueError, match="'all', None or a list"):
        exit_depth_grid(6, "some")


def test_tune_searches_depth_caps_and_finds_a_middle_head_better_than_the_last(tmp_path, tiny_backbone,
                                                                              monkeypatch):
    """The last head is made useless (always class 0) and head 2's cached outputs are set right but unconfident
    (max probability 0.45, under every tau): no confidence rule ever leaves at head 2, so without caps every row
    reaches the useless last head; with caps the tuner finds the point capped at 2, right on every row. Head 3's
    cached outputs are wrong on every row, so no point capped at 3 qualifies either: the choice between the
    qualifying points (all capped at 2) and exits off cannot turn on this machine's timing noise."""
    import eat.bench as bench_module
    from eat.evaluation import Predictions

    model = tiny_model(seed=3, exit_layers="all")
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    encoded = _encoded(40)
    real_predict = bench_module.predict_encoded

    def predict(model, rows, **kwargs):  # the tuner's cached pass, with head 2 replaced as above
        result = real_predict(model, rows, **kwargs)
        if kwargs.get("cache_exits"):
            exit_logits = result.exit_logits.copy()  # (N, 4, 3)
            exit_logits[:, 1] = 0.5 * np.eye(3)[np.asarray(result.labels)]
            exit_logits[:, 2] = 0.5 * np.eye(3)[(np.asarray(result.labels) + 1) % 3]
            result = Predictions(**{**result.__dict__, "exit_logits": exit_logits})
        return result

    monkeypatch.setattr(bench_module, "predict_encoded", predict)
    common = dict(max_drop=0.0, keep_grid=(1.0,), tau_grid=[0.5, 0.99], timing_rows=4, warmup=1,
                  policies=("confidence",))
    default = bench_module.tune(str(folder), encoded, **common)  # a classifier: no caps unless asked
    assert all(c.get("exit_depth") is None and not c.get("exit_heads") for c in default.candidates)
    capped = bench_module.tune(str(folder), encoded, **common, exit_depths="all")
    assert capped.knobs.get("exit_depth") == 2 and capped.calibration_accuracy == 100.0
    assert capped.calibration_accuracy > capped.reference_accuracy
    uncapped = bench_module.tune(str(folder), encoded, **common, exit_depths=None, first_heads=(1,))
    assert all(c.get("exit_depth") is None for c in uncapped.candidates)
    assert uncapped.calibration_accuracy < 100.0


def test_rule_sweeps_walk_each_rule_from_each_first_head_to_each_cap_it_can_fire_before():
    from eat.bench import rule_sweeps

    sweeps = rule_sweeps(("delta:2", "confidence"), [2, 3, 4], (1, 2))
    assert [s for s in sweeps if s[0] == "delta"] == [("delta", 2, 1, 3), ("delta", 2, 1, 4), ("delta", 2, 2, 4)]
    assert [s for s in sweeps if s[0] == "confidence"] == [("confidence", 2, 1, 2), ("confidence", 2, 1, 3),
                                                           ("confidence", 2, 1, 4), ("confidence", 2, 2, 3),
                                                           ("confidence", 2, 2, 4)]
    assert rule_sweeps(("spread:3",), [4], (1, 2, 3)) == [("spread", 3, 1, 4)]  # uncapped: always from head 1


def test_a_replay_from_a_later_first_head_equals_the_model_with_those_heads():
    """first_head=2 with a cap at 4 of 4 (a regression delta rule): the replay reads heads 2-4 only and says what
    the model run with exit_layers [2, 3, 4] does; the tuned knobs name those heads."""
    from eat.bench import _tuned_knobs, replay_sweep

    torch.manual_seed(4)
    model = EATForSequenceClassification(tiny_config(num_labels=1, exit_layers="all")).eval()
    encoded = _encoded()
    encoded.labels = [float(label) for label in encoded.labels]
    cached = predict_encoded(model, encoded, cache_exits=True)
    values = cached.exit_logits[..., 0]  # (N, 4)
    tau = float(np.median(np.abs(values[:, 2] - values[:, 1])))  # about half the rows settle at head 3
    row = replay_sweep(cached, [tau], policy="delta", patience=2, first_head=2, task=TASKS["stsb"])[0]
    assert row["exit_heads"] == [2, 3, 4] and 3.0 < row["mean_exit_layer"] < 4.0
    row.update(keep_ratio=1.0, exit_policy="delta", exit_patience=2)
    knobs = _tuned_knobs(row)
    assert knobs["exit_layers"] == [2, 3, 4] and "exit_depth" not in knobs
    model.config.set_knobs(**knobs)
    rerun = predict_encoded(model, encoded)
    assert row["mean_exit_layer"] == pytest.approx(float(rerun.exit_layer.mean()))
    assert row["metric_value"] == pytest.approx(TASKS["stsb"].primary(rerun.labels, rerun.logits[:, 0]))
    assert rerun.work.exit_head_rows == len(encoded) * 2 + int((rerun.exit_layer == 4).sum())  # head 1 never ran
