"""Peers in the benchmark (eat.deploy.peers), the int8 tuner, the report's fastest-peer speedups, eat export."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from eat.bench import BenchConfig, OperatingPoint, load_point, measure_points
from eat.cli import app
from eat.deploy.peers import available_peers, parse_peers, peer_points
from eat.modeling_eat import EATForSequenceClassification
from eat.report import peer_speedup_table, peer_speedups
from eat.results import ResultsLog

from .conftest import tiny_config
from .test_bench import _encoded


def _saved(folder, seed=0, **knobs):
    torch.manual_seed(seed)
    EATForSequenceClassification(tiny_config(initializer_range=0.3, exit_layers="all", **knobs)).eval() \
        .save_pretrained(folder)
    return str(folder)


def test_parse_peers():
    assert parse_peers(None) == ["torch-int8", "ort-fp32", "ort-int8"]
    assert parse_peers("none") == [] and parse_peers("ort-int8") == ["ort-int8"]
    with pytest.raises(ValueError, match="unknown ort-fp16"):
        parse_peers("ort-fp16")


def test_peer_points_of_static_and_tuned_only():
    points = [OperatingPoint("static", "s", {}, "baseline", "static"), OperatingPoint("eat:none", "e", {}),
              OperatingPoint("eat:tuned", "e", {"exit_threshold": 0.9}, "tuned"),
              OperatingPoint("eat:tuned-b32", "e", {"attention_window": 16}, "tuned")]
    new, notes = peer_points(points, ["torch-int8", "ort-int8"])
    names = [p.name for p in new]
    assert names == ["static:torch-int8", "static:ort-int8", "eat:tuned:torch-int8", "eat:tuned:ort-int8",
                     "eat:tuned-b32:torch-int8"]
    assert notes == ["eat:tuned-b32:ort-int8 left out: attention_window has no ONNX segment form"]
    assert (new[1].backend, new[1].precision, new[1].role, new[1].model_label) == ("onnxruntime", "int8",
                                                                                   "baseline", "static")


def test_missing_onnxruntime_drops_default_peers_with_a_note(monkeypatch):
    import sys

    from eat.deploy.onnx_export import ExportError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    kept, notes = available_peers(["torch-int8", "ort-int8"], explicit=False)
    assert kept == ["torch-int8"] and "pip install 'eat[onnx]'" in notes[0]
    with pytest.raises(ExportError, match="onnxruntime is not installed"):
        available_peers(["ort-int8"], explicit=True)


def test_peers_measured_in_the_same_run_with_their_own_accuracy(tmp_path):
    pytest.importorskip("onnxruntime")
    checkpoint = _saved(tmp_path / "static")
    base = OperatingPoint("static", checkpoint, {}, "baseline", "static")
    points = [base] + peer_points([base], ["torch-int8", "ort-fp32", "ort-int8"])[0]
    bench = BenchConfig(rows=None, warmup=1, throughput_repeats=1, batch_size=8, sorted_throughput=False)
    log = ResultsLog(tmp_path / "results")
    rows = {r["point"]: r for r in measure_points(points, _encoded(12), bench, log, dataset_source="synthetic ids")}
    assert set(rows) == {"static", "static:torch-int8", "static:ort-fp32", "static:ort-int8"}
    assert len({r["run_id"] for r in rows.values()}) == 1  # one interleaved run
    assert rows["static:ort-int8"]["backend"] == "onnxruntime" and rows["static:ort-int8"]["precision"] == "int8"
    assert len({r["config_hash"] for r in rows.values()}) == 4
    # ONNX Runtime fp32 computes the eager function: same predictions on the same rows
    assert rows["static:ort-fp32"]["accuracy"] == rows["static"]["accuracy"]
    assert isinstance(load_point(points[1], "cpu").config.num_labels, int)
    report_rows = pd.DataFrame(log.rows()).assign(series="sst2")
    table = peer_speedup_table(report_rows, "sst2")
    assert "vs fastest static, b1" in table and "static:ort-int8" in table


def test_peer_speedups_are_against_the_fastest_static_row_of_each_run():
    frame = pd.DataFrame([
        {"run_id": "a", "point": "static", "b1_p50_ms": 10.0, "throughput_rows_per_s": 100.0},
        {"run_id": "a", "point": "static:ort-int8", "b1_p50_ms": 4.0, "throughput_rows_per_s": 150.0},
        {"run_id": "a", "point": "static:torch-int8", "b1_p50_ms": 5.0, "throughput_rows_per_s": 300.0},
        {"run_id": "a", "point": "eat:tuned:ort-int8", "b1_p50_ms": 2.0, "throughput_rows_per_s": 450.0},
        {"run_id": "b", "point": "static", "b1_p50_ms": 20.0, "throughput_rows_per_s": 50.0},
        {"run_id": "b", "point": "eat:tuned", "b1_p50_ms": 10.0, "throughput_rows_per_s": 75.0}])
    out = peer_speedups(frame).set_index(["run_id", "point"])
    assert out.loc[("a", "eat:tuned:ort-int8"), "peer_speedup_b1"] == pytest.approx(2.0)
    assert out.loc[("a", "eat:tuned:ort-int8"), "peer_b1"] == "static:ort-int8"
    assert out.loc[("a", "eat:tuned:ort-int8"), "peer_speedup_batch"] == pytest.approx(1.5)  # torch-int8 is faster
    assert out.loc[("a", "eat:tuned:ort-int8"), "peer_batch"] == "static:torch-int8"
    assert out.loc[("b", "eat:tuned"), "peer_speedup_b1"] == pytest.approx(2.0)  # run b: only its own static
    assert peer_speedup_table(frame.assign(series="t").iloc[4:], "t") == ""  # no peers: no table


def test_int8_tuner_tunes_the_int8_model(tmp_path, monkeypatch):
    import eat.bench
    from eat.bench import tune

    seen = []
    original = eat.bench.apply_precision

    def spy(model, precision, **kwargs):
        out = original(model, precision, **kwargs)
        seen.append((precision, type(out.classifier).__module__))
        return out

    monkeypatch.setattr(eat.bench, "apply_precision", spy)
    checkpoint = _saved(tmp_path / "eat", seed=3)
    reference = _saved(tmp_path / "static", seed=4)
    result = tune(checkpoint, _encoded(24), precision="int8", max_drop=100.0, keep_grid=(1.0,),
                  tau_grid=[0.4, 0.9], timing_rows=4, warmup=1, policies=("confidence",),
                  reference_checkpoint=reference)
    assert result.knobs["exit_policy"] in ("confidence", "none")
    # every model the tuner ran is the int8 one, except the fp32 reference the drop is counted from
    assert seen.count(("fp32", "torch.nn.modules.linear")) == 1
    int8 = [module for precision, module in seen if precision == "int8"]
    assert len(int8) == len(seen) - 1 >= 3 and all("quantized" in module for module in int8)


def test_eat_export_cli(tmp_path):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    _saved(run / "model")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "out"), "--precision", "int8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["precisions"] == ["fp32", "int8"] and len(manifest["segments"]["int8"]["layers"]) == 4
    again = runner.invoke(app, ["export", str(run), str(tmp_path / "out")])
    assert again.exit_code == 2 and "not empty" in again.output
    windowed = runner.invoke(app, ["export", str(run), str(tmp_path / "w"), "--knob", "attention_window=8"])
    assert windowed.exit_code == 2 and "attention_window=8" in windowed.output
