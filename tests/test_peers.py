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


def test_peers_of_a_tuned_point_run_the_point_tuned_for_their_backend_and_precision(tmp_path):
    """`eat tune --precision int8` saves tuned_<task>_int8.json, with --backend onnxruntime tuned_<task>_ort-int8.json:
    the bench's peers of the tuned point run the knobs of their own tuner (an ORT int8 peer: its own, else the int8
    tuner's), the fp32 peers and the static ones keep theirs; bench_points reads the files from the results folder."""
    from eat.pipeline import BenchRequest, bench_points, peer_tuned_points
    from eat.runners import SequenceRunner

    fp32, int8 = {"exit_threshold": 0.8}, {"exit_threshold": 0.95, "exit_policy": "agreement"}
    ort_int8 = {"exit_threshold": 0.9}
    points = [OperatingPoint("static", "s", {}, "baseline", "static"),
              OperatingPoint("eat:tuned", "e", fp32, "tuned")]
    new, notes = peer_points(points, ["torch-int8", "ort-fp32", "ort-int8"],
                             {"torch-int8": {"eat:tuned": int8}, "ort-int8": {"eat:tuned": ort_int8}})
    knobs = {p.name: p.knobs for p in new}
    assert knobs == {"static:torch-int8": {}, "static:ort-fp32": {}, "static:ort-int8": {},
                     "eat:tuned:torch-int8": int8, "eat:tuned:ort-fp32": fp32, "eat:tuned:ort-int8": ort_int8}
    assert len(notes) == 2 and all("runs the point tuned for" in note for note in notes)

    (tmp_path / "tuned_sst2.json").write_text(json.dumps({"knobs": fp32}))
    assert all(points == {} for points in peer_tuned_points(tmp_path, "sst2").values())  # only fp32: its knobs
    (tmp_path / "tuned_sst2_int8.json").write_text(json.dumps({"knobs": int8}))
    (tmp_path / "tuned_sst2_b32_int8.json").write_text(json.dumps({"knobs": {"keep_ratio": 0.7}}))
    saved = peer_tuned_points(tmp_path, "sst2")
    assert saved["torch-int8"] == saved["ort-int8"] == {"eat:tuned": int8, "eat:tuned-b32": {"keep_ratio": 0.7}}
    assert saved["ort-fp32"] == saved["torch-bf16"] == {}
    (tmp_path / "tuned_sst2_ort-int8.json").write_text(json.dumps({"knobs": ort_int8}))
    saved = peer_tuned_points(tmp_path, "sst2")
    assert saved["ort-int8"] == {"eat:tuned": ort_int8, "eat:tuned-b32": {"keep_ratio": 0.7}}
    assert saved["torch-int8"]["eat:tuned"] == int8
    request = BenchRequest(frozenset({"tuned"}), static="s", peers="torch-int8,ort-int8")
    chosen = {p.name: p.knobs for p in bench_points("e", BenchConfig(task="sst2"), request, {"eat:tuned": fp32},
                                                    SequenceRunner(None), tuned_at=saved)}
    assert (chosen["eat:tuned"], chosen["eat:tuned:torch-int8"], chosen["eat:tuned:ort-int8"]) == (fp32, int8, ort_int8)


def test_tuner_on_onnx_runtime_reads_and_times_the_deployed_model(tmp_path, monkeypatch):
    """`eat tune --backend onnxruntime --precision int8`: the cached sweep and the finalists run the ONNX Runtime
    int8 runner (the sweep in batches of the objective's size, as deployed), the reference stays PyTorch fp32."""
    pytest.importorskip("onnxruntime")
    import eat.bench
    from eat.bench import tune
    from eat.deploy.onnx_runtime import OrtSequenceClassifier

    loaded, batches = [], []
    original_model, original_predict = eat.bench.tuner_model, eat.bench.predict_encoded

    def spy_model(checkpoint, knobs, precision, backend, device):
        model = original_model(checkpoint, knobs, precision, backend, device)
        loaded.append((checkpoint, precision, backend, type(model)))
        return model

    def spy_predict(model, encoded, **kwargs):
        batches.append((type(model), kwargs.get("batch_size")))
        return original_predict(model, encoded, **kwargs)

    monkeypatch.setattr(eat.bench, "tuner_model", spy_model)
    monkeypatch.setattr(eat.bench, "predict_encoded", spy_predict)
    checkpoint = _saved(tmp_path / "eat", seed=3)
    reference = _saved(tmp_path / "static", seed=4)
    result = tune(checkpoint, _encoded(12), precision="int8", backend="onnxruntime", max_drop=100.0,
                  keep_grid=(1.0,), tau_grid=[0.4, 0.9], timing_rows=3, warmup=1, policies=("confidence",),
                  reference_checkpoint=reference)
    assert result.knobs["exit_policy"] in ("confidence", "none")
    assert {(precision, backend, kind) for path, precision, backend, kind in loaded if path == checkpoint} == {
        ("int8", "onnxruntime", OrtSequenceClassifier)}
    assert [(precision, backend) for path, precision, backend, _ in loaded if path == reference] == [("fp32", "torch")]
    assert (OrtSequenceClassifier, 1) in batches and all(size == 1 for kind, size in batches
                                                         if kind is OrtSequenceClassifier)
    assert all(c["calibration_p50_ms"] > 0 for c in result.candidates)
    with pytest.raises(ValueError, match="torch or onnxruntime"):
        tune(checkpoint, _encoded(12), backend="tensorrt", max_drop=1.0)
    from eat.runners import SequenceRunner, TuneRequest

    with pytest.raises(ValueError, match="fp32 or int8, not bf16"):
        SequenceRunner(None).check_tune(TuneRequest(max_drop=1.0, precision="bf16", backend="onnxruntime"))


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


def test_quantized_tuner_counts_the_drop_from_the_fp32_model_without_a_reference(tmp_path, monkeypatch):
    """`eat tune --precision int8` without --reference: the drop counts from the same checkpoint in fp32 PyTorch with
    every mechanism off (the quantization's own cost inside it), not from the int8 model with exits off."""
    import eat.bench
    from eat.bench import tune

    loaded = []
    original = eat.bench.tuner_model

    def spy(checkpoint, knobs, precision, backend, device):
        loaded.append((precision, backend, dict(knobs)))
        return original(checkpoint, knobs, precision, backend, device)

    monkeypatch.setattr(eat.bench, "tuner_model", spy)
    checkpoint = _saved(tmp_path / "eat", seed=3)
    result = tune(checkpoint, _encoded(16), precision="int8", max_drop=100.0, keep_grid=(1.0,), tau_grid=[0.4],
                  timing_rows=2, warmup=1, policies=("confidence",))
    assert ("fp32", "torch", {}) in loaded and loaded.count(("int8", "torch", {})) == 1  # reference, int8 exits off
    assert "fp32 reference" in result.criterion
    before = len(loaded)
    fp32 = tune(checkpoint, _encoded(16), max_drop=100.0, keep_grid=(1.0,), tau_grid=[0.4], timing_rows=2, warmup=1,
                policies=("confidence",))
    assert [entry[:2] for entry in loaded[before:]].count(("fp32", "torch")) == len(loaded) - before  # fp32 only
    assert "fp32 reference" not in fp32.criterion


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


# ------------------------------------------------------------------------------------------- token tasks (D4)

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _saved_tagger(folder, seed=0):
    """A random tiny token classifier with BIO tags and an exit head after every layer, saved to ``folder``."""
    from eat.modeling_eat import EATForTokenClassification

    torch.manual_seed(seed)
    config = tiny_config(num_labels=len(TAGS), exit_layers="all", initializer_range=0.3,
                         id2label=dict(enumerate(TAGS)), label2id={tag: i for i, tag in enumerate(TAGS)})
    model = EATForTokenClassification(config).eval()
    model.save_pretrained(folder)
    return str(folder), model


def _tagged_sentences(model, sentences=14, seed=0):
    """(encoded chunks, sentences) of random words, some of two subwords, whose gold tags are the fp32 eager
    model's own with every exit off: the static model scores entity F1 100 on them, so an equal F1 on another
    backend means the same entities predicted."""
    import random

    from eat.ner_data import IGNORE, EncodedTagged, TaggedData, TaggedSentence
    from eat.token_tasks import predict_tagged

    rng = random.Random(seed)
    ids, labels, starts = [], [], []
    for _ in range(sentences):
        row, flags = [1], [False]  # [CLS]
        for _word in range(rng.randint(3, 9)):
            row.append(rng.randint(3, 119))
            flags.append(True)  # the word's first subword carries its label
            if rng.random() < 0.3:
                row.append(rng.randint(3, 119))
                flags.append(False)
        row.append(102 % 120)  # [SEP]
        flags.append(False)
        ids.append(row)
        starts.append(flags)
        labels.append([0 if flag else IGNORE for flag in flags])
    encoded = EncodedTagged(ids, labels, starts, list(range(sentences)), [len(row) for row in ids])
    words = [sum(flags) for flags in starts]
    placeholder = TaggedData([TaggedSentence([f"w{i}" for i in range(n)], ["O"] * n) for n in words], TAGS,
                             "synthetic")
    gold = predict_tagged(model, encoded, placeholder, disable_exit=True).tags
    data = TaggedData([TaggedSentence([f"w{i}" for i in range(len(tags))], tags) for tags in gold], TAGS,
                      "synthetic tagged ids")
    return encoded, data


def test_token_peers_measured_in_the_same_run_with_their_own_f1(tmp_path):
    """Issue #24 D4: a token task's static model and tuned point on PyTorch int8 and ONNX Runtime fp32 / int8, each
    its own row of one interleaved run with the backend and precision it ran at and entity F1 from its own calls;
    ONNX Runtime fp32 tags exactly as eager fp32; the report's fastest-static-peer table lists them."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("seqeval")
    from eat.results import ResultRow, row_metric
    from eat.tasks import named_task

    checkpoint, model = _saved_tagger(tmp_path / "tagger")
    encoded, data = _tagged_sentences(model)
    base = [OperatingPoint("static", checkpoint, {"exit_layers": None, "exit_policy": "none"}, "baseline", "static"),
            OperatingPoint("eat:tuned", checkpoint, {"exit_layers": "all", "exit_policy": "confidence",
                                                     "exit_threshold": 0.5}, "tuned")]
    points = base + peer_points(base, ["torch-int8", "ort-fp32", "ort-int8"])[0]
    bench = BenchConfig(task="conll2003", rows=None, warmup=1, throughput_repeats=1, batch_size=4)
    log = ResultsLog(tmp_path / "results")
    rows = {r["point"]: r for r in measure_points(points, encoded, bench, log, dataset_source="synthetic",
                                                  task=named_task("conll2003"), data=data)}
    assert set(rows) == {p.name for p in points} and len(rows) == 8
    assert len({r["run_id"] for r in rows.values()}) == 1  # one interleaved run
    assert len({r["config_hash"] for r in rows.values()}) == 8
    for point in points:
        row = rows[point.name]
        # the row keeps the precision it ran at (the entity precision has its own field)
        assert (row["backend"], row["precision"]) == (point.backend, point.precision)
        assert row["metric"] == "entity_f1" and row_metric(row) == ("entity_f1", row["entity_f1"])
        assert 0.0 <= row["entity_f1"] <= 100.0 and row["accuracy"] == row["entity_f1"]
        assert row["rows"] == len(encoded) and row["b1_p50_ms"] > 0 and row["throughput_rows_per_s"] > 0
        assert [key for key in row if key not in ResultRow.__annotations__ and not key.startswith(("b1_", "b4_"))] \
            == []
    assert rows["static"]["entity_f1"] == pytest.approx(100.0)  # the gold tags are its own
    assert rows["eat:tuned"]["mean_exit_layer"] < 4.0  # its token exits are on
    for name in ("static", "eat:tuned"):  # ONNX Runtime fp32 computes the eager function: the same tags and exits
        eager, ort = rows[name], rows[f"{name}:ort-fp32"]
        for key in ("entity_f1", "entity_precision", "entity_recall", "exit_distribution", "token_layer_fraction"):
            assert ort[key] == pytest.approx(eager[key]), (name, key)
    report_rows = pd.DataFrame(log.rows()).assign(series="conll2003")
    table = peer_speedup_table(report_rows, "conll2003")
    for name in ("static:torch-int8", "static:ort-int8", "eat:tuned:ort-fp32", "eat:tuned:ort-int8"):
        assert name in table
    assert "| static:ort-int8 | onnxruntime | int8 |" in table


def test_token_tuner_at_int8_runs_the_int8_model_and_counts_the_drop_from_fp32(tmp_path, monkeypatch):
    """`eat tune --precision int8` on a token task: every rule runs on a quantized copy (its exits read the int8
    model's outputs), the reference F1 is the fp32 model's with exits off; bf16 is refused."""
    pytest.importorskip("seqeval")
    from types import SimpleNamespace

    import eat.token_tasks
    from eat.deploy.quantize import quantize_int8
    from eat.runners import TuneRequest
    from eat.tasks import named_task
    from eat.token_tasks import evaluate_tagged, tune_token_exits

    _, model = _saved_tagger(tmp_path / "tagger")
    encoded, data = _tagged_sentences(model)
    runner = named_task("conll2003").runner()
    runner.check_tune(TuneRequest(max_drop=1.0, precision="int8"))
    with pytest.raises(ValueError, match="fp32 or int8"):
        runner.check_tune(TuneRequest(max_drop=1.0, precision="bf16"))
    with pytest.raises(ValueError, match="tuned in PyTorch"):
        runner.check_tune(TuneRequest(max_drop=1.0, precision="int8", backend="onnxruntime"))
    for asked in ("all", [3, 4]):  # a depth cap a token tuner would silently ignore
        with pytest.raises(ValueError, match="--exit-depths: a token model has no depth cap"):
            runner.check_tune(TuneRequest(max_drop=1.0, exit_depths=asked))
    grid = [{"exit_policy": "confidence", "exit_threshold": 0.5}]
    quantized = torch.ao.nn.quantized.dynamic.Linear
    int8 = quantize_int8(model)
    result = tune_token_exits(int8, encoded, data, max_drop=100.0, grid=grid, reference_model=model)
    assert result["reference_f1"] == pytest.approx(100.0)  # the gold tags are the fp32 model's own
    int8.config.set_knobs(exit_layers="all", token_exit_window=0, **grid[0])
    assert result["candidates"][0]["f1"] == pytest.approx(evaluate_tagged(int8, encoded, data)["f1"])
    assert isinstance(int8.classifier, quantized) and not isinstance(model.classifier, quantized)

    # the runner's tune: rules on a quantized copy, the fp32 model as the reference, the caller's model left fp32
    seen = {}

    def spy(tuned, encoded, data, **kwargs):
        seen.update(tuned=tuned, reference=kwargs["reference_model"])
        return {"knobs": dict(grid[0]), "calibration_f1": 99.0, "reference_f1": 100.0, "token_layer_ratio": 0.5,
                "mean_sentence_layers": 2.0, "criterion": "spy"}

    monkeypatch.setattr(eat.token_tasks, "tune_token_exits", spy)
    monkeypatch.setattr(runner, "encode", lambda data, tokenizer, max_length: encoded)
    outcome = runner.tune(model, tmp_path, SimpleNamespace(pad_token_id=0), data, 16,
                          TuneRequest(max_drop=1.0, precision="int8"))
    assert seen["reference"] is model and not isinstance(model.classifier, quantized)
    assert isinstance(seen["tuned"].classifier, quantized)
    assert outcome.saved["precision"] == "int8" and "at int8" in outcome.lines[0]


def test_token_bench_points_get_peers(tmp_path):
    """`eat bench` on a token task adds the peers of its static and tuned points (the token runner supports them)."""
    from eat.pipeline import BenchRequest, bench_points
    from eat.tasks import named_task

    runner = named_task("conll2003").runner()
    assert runner.supports_peers
    bench = BenchConfig(task="conll2003")
    request = BenchRequest(frozenset({"tuned"}), static="s", peers="torch-int8")
    points = bench_points("e", bench, request, {"eat:tuned": {"exit_threshold": 0.9}}, runner)
    peers = {p.name: (p.backend, p.precision) for p in points if (p.backend, p.precision) != ("torch", "fp32")}
    assert peers == {"static:torch-int8": ("torch", "int8"), "eat:tuned:torch-int8": ("torch", "int8")}


def test_deploy_peers_judge_reads_the_primary_metric_and_older_rows(tmp_path):
    """benchmarks/deploy_peers.py judges drops in the rows' primary metric (metric_value), and still reads rows and
    D5 tables written before it (accuracy only)."""
    from argparse import Namespace

    from .conftest import benchmark_script

    script = benchmark_script("deploy_peers")
    env = {"run_id": "r", "split": "validation", "rows": 10, "cpu": "cpu", "threads": 1, "git_commit": "c",
           "mean_exit_layer": 4.0}

    def row(point, score, ms, rate, **extra):
        return {**env, "point": point, "config_hash": point, "b1_p50_ms": ms, "throughput_rows_per_s": rate,
                **score, **extra}

    old = [row(point, {"accuracy": accuracy}, ms, rate, throughput_sorted_rows_per_s=2 * rate)
           for point, accuracy, ms, rate in (("static", 90.0, 10.0, 100.0), ("static:ort-int8", 89.0, 5.0, 200.0),
                                             ("eat:tuned", 89.8, 4.0, 260.0), ("eat:tuned:ort-int8", 88.0, 2.0, 500.0))]
    d5_old = [{"model": m, "backend": b, "precision": p, "rows": 10, "accuracy": 90.0}
              for m in ("static", "eat:tuned") for b, p in (("torch", "fp32"), ("torch", "int8"))]
    ResultsLog(tmp_path / "old").append_rows(old)
    lines = script.judge(Namespace(task="sst2"), tmp_path / "old", d5_old, tmp_path)
    # eat:tuned:ort-int8 is 2 points below static: the fastest within 0.5 is eat:tuned (1.25x the ORT int8 peer)
    assert lines[2].startswith("- D1 batch 1: EAT eat:tuned vs fastest static peer static:ort-int8: 1.25x in the full "
                               "table")
    assert "its accuracy 89.80" in lines[2] and lines[2].endswith("MISSED")
    f1 = {"metric": "entity_f1"}
    new = [row("static", {**f1, "metric_value": 90.0, "accuracy": 90.0}, 10.0, 100.0),
           row("static:ort-int8", {**f1, "metric_value": 89.5, "accuracy": 89.5}, 5.0, 150.0),
           row("eat:tuned:ort-int8", {**f1, "metric_value": 89.2, "accuracy": 89.2}, 3.0, 200.0)]
    ResultsLog(tmp_path / "new").append_rows(new)
    d5 = [{**row_, "metric": "entity_f1", "entity_f1": 90.0 - 0.6 * (row_["precision"] == "int8")} for row_ in d5_old]
    lines = script.judge(Namespace(task="conll2003"), tmp_path / "new", d5, tmp_path)
    assert [line.split(":")[0] for line in lines if line.startswith("- D4")] == ["- D4 batch 1",
                                                                               "- D4 batch 32, arrival order"]
    assert "1.67x" in lines[2] and "its entity_f1 89.20 vs static fp32 90.00 (-0.80" in lines[2]
    assert lines[2].endswith("MET")
    assert "1.33x" in lines[3] and lines[3].endswith("MET")
    assert "## D5: int8 entity_f1 cost (10 dev sentences, untimed)" in lines
    assert lines[-1] == "- eat:tuned torch int8: 89.40 vs fp32 90.00 (cost +0.60 points; goal <= 0.50) -> MISSED"


def test_deploy_peers_judges_mnli_on_its_matched_run(tmp_path):
    """MNLI's bench writes one run per dev split (matched, then mismatched): D3 is judged on the matched run even
    though the mismatched one came last."""
    from argparse import Namespace

    from .conftest import benchmark_script

    script = benchmark_script("deploy_peers")

    def row(run_id, split, point, accuracy, ms):
        return {"run_id": run_id, "split": split, "rows": 10, "cpu": "cpu", "threads": 1, "git_commit": "c",
                "mean_exit_layer": 3.0, "point": point, "config_hash": point, "b1_p50_ms": ms,
                "throughput_rows_per_s": 100.0 / ms, "throughput_sorted_rows_per_s": 200.0 / ms,
                "accuracy": accuracy}

    rows = [row("m", "validation_matched", "static", 60.0, 10.0), row("m", "validation_matched", "eat:tuned", 59.5, 5.0),
            row("mm", "validation_mismatched", "static", 70.0, 10.0),
            row("mm", "validation_mismatched", "eat:tuned", 60.0, 9.0)]
    ResultsLog(tmp_path / "mnli").append_rows(rows)
    d5 = [{"model": m, "backend": "torch", "precision": p, "rows": 10, "accuracy": 60.0}
          for m in ("static", "eat:tuned") for p in ("fp32", "int8")]
    lines = script.judge(Namespace(task="mnli"), tmp_path / "mnli", d5, tmp_path)
    assert lines[0].startswith("# Issue #24 targets: mnli validation_matched") and "run m" in lines[0]
    assert "2.00x" in lines[2] and "its accuracy 59.50 vs static fp32 60.00" in lines[2] and lines[2].endswith("MET")


def test_deploy_peers_judges_on_the_best_head_to_head_pair(tmp_path):
    """With head-to-head timings (benchmarks/deploy_peers.py run_head_to_head: the fastest static peer against each
    EAT row within the bar, two at a time) a target is judged on its best pair, whichever row was fastest in the full
    table; a pair with a row outside the bar, or another peer, does not count."""
    from argparse import Namespace

    from .conftest import benchmark_script

    script = benchmark_script("deploy_peers")
    env = {"run_id": "r", "split": "validation", "rows": 10, "cpu": "cpu", "threads": 1, "git_commit": "c",
           "mean_exit_layer": 3.0}
    rows = [{**env, "point": point, "config_hash": point, "accuracy": accuracy, "b1_p50_ms": ms,
             "throughput_rows_per_s": 100.0 / ms, "throughput_sorted_rows_per_s": 100.0 / ms}
            for point, accuracy, ms in (("static", 90.0, 10.0), ("static:ort-int8", 90.0, 4.0),
                                        ("eat:tuned:ort-int8", 90.0, 2.0), ("eat:tuned:torch-int8", 90.0, 2.5),
                                        ("eat:tuned:torch-bf16", 80.0, 1.0))]
    ResultsLog(tmp_path / "bench").append_rows(rows)
    d5 = [{"model": m, "backend": "torch", "precision": p, "rows": 10, "accuracy": 90.0}
          for m in ("static", "eat:tuned") for p in ("fp32", "int8")]
    assert script._pairs(script._judged_rows(Namespace(task="sst2"), tmp_path / "bench")[0], "sst2")[0][5:] == \
        ("static:ort-int8", ["eat:tuned:ort-int8", "eat:tuned:torch-int8"])  # bf16: 10 points below, not a candidate
    peer = "static:ort-int8"
    alone = [{"target": "D1 batch 1", "peer": peer, "eat": "eat:tuned:ort-int8", "ratio": 1.5},
             {"target": "D1 batch 1", "peer": peer, "eat": "eat:tuned:torch-int8", "ratio": 1.6},
             {"target": "D1 batch 1", "peer": peer, "eat": "eat:tuned:torch-bf16", "ratio": 3.0},
             {"target": "D2 batch 32, arrival order", "peer": peer, "eat": "eat:tuned:torch-int8", "ratio": 1.9},
             {"target": "D2 batch 32, length-sorted (reported)", "peer": "static", "eat": "eat:tuned:ort-int8",
              "ratio": 9.0}]
    for entry in alone:
        entry.update(column="b1_p50_ms" if entry["target"].startswith("D1") else "throughput_rows_per_s",
                     eat_value=1.0, peer_value=2.0)
    lines = script.judge(Namespace(task="sst2"), tmp_path / "bench", d5, tmp_path, alone)
    # D1: the torch-int8 row's pair is the best counted (bf16 is outside the bar); 1.6 < 1.8: missed
    assert lines[2].startswith("- D1 batch 1: EAT eat:tuned:torch-int8 vs fastest static peer static:ort-int8: 1.60x "
                               "timed head to head (the full table: 1.60x)") and lines[2].endswith("MISSED")
    assert "1.90x timed head to head (the full table: 1.60x)" in lines[3] and lines[3].endswith("MET")
    # another peer's pair does not count: the full table decides
    assert "2.00x in the full table" in lines[4] and lines[4].endswith("MET")
    assert "- D1 batch 1: eat:tuned:torch-bf16 3.00x (1.00 vs 2.00 ms p50)" in lines
