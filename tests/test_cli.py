"""The `eat` command: smoke runs on a tiny model and real data slices, the README quickstart, and bad input."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eat.cli import app

from .conftest import REPO

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, tiny_backbone, data_dir):
    import os

    os.environ["EAT_DATA_DIR"] = str(data_dir)
    out = tmp_path_factory.mktemp("cli") / "tiny-run"
    result = _invoke("train", "--task", "sst2", "--model", tiny_backbone, "--preset", "smoke", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert re.search(r"sst2 validation accuracy: \d+\.\d+%", result.output)
    return out


def test_train_eval_predict_on_tiny_model(trained_tiny, tmp_path):
    result = _invoke("eval", "--checkpoint", str(trained_tiny), "--task", "sst2", "--limit", "40", "--tau", "0.6")
    assert result.exit_code == 0, result.output
    assert "per-exit accuracy: L1:" in result.output
    written = json.loads((trained_tiny / "eval-exit_policy=confidence-exit_threshold=0.6.json").read_text())
    assert written["validation"]["rows"] == 40 and "exit_distribution" in written["validation"]
    texts = tmp_path / "texts.txt"
    texts.write_text("a wonderful film\nthe worst thing ever made\n", encoding="utf-8")
    result = _invoke("predict", "--checkpoint", str(trained_tiny), "--file", str(texts), "--json")
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["text"] for line in lines] == ["a wonderful film", "the worst thing ever made"]
    assert all(line["label"] in ("negative", "positive") and 1 <= line["exit_layer"] <= 2 for line in lines)


def test_finished_run_is_not_overwritten(trained_tiny, tiny_backbone):
    before = (trained_tiny / "model" / "model.safetensors").read_bytes()
    result = _invoke("train", "--task", "sst2", "--model", tiny_backbone, "--preset", "smoke", "--out",
                     str(trained_tiny))
    assert result.exit_code == 2 and "finished run" in result.output and "Traceback" not in result.output
    assert (trained_tiny / "model" / "model.safetensors").read_bytes() == before


def test_cli_bad_input_is_one_clear_line(trained_tiny, tmp_path):
    result = _invoke("eval", "--checkpoint", str(trained_tiny), "--task", "mnli")
    assert result.exit_code == 2 and "trained for task 'sst2', not 'mnli'" in result.output
    result = _invoke("eval", "--checkpoint", str(tmp_path / "nothing"), "--task", "sst2")
    assert result.exit_code == 2 and "no such checkpoint" in result.output
    result = _invoke("eval", "--checkpoint", str(trained_tiny), "--knob", "keep_ration=0.5")
    assert result.exit_code == 2 and "did you mean 'keep_ratio'" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nfine,1\n")
    result = _invoke("eval", "--checkpoint", str(trained_tiny), "--eval-file", str(bad))
    assert result.exit_code == 2 and "no column 'text'" in result.output
    result = _invoke("run", "--preset", "enormous")
    assert result.exit_code == 2 and "unknown preset" in result.output
    result = _invoke("run", "--preset", "smoke", "--recipe", "three-stage", "--runs", str(tmp_path / "never"))
    assert result.exit_code == 2 and "unknown recipe 'three-stage'" in result.output and not (tmp_path / "never").exists()
    result = _invoke("report", "--results", str(tmp_path / "empty"))
    assert result.exit_code == 2 and "no results" in result.output
    for depths, message in (("four", "'auto', 'all', 'none' or a comma list"), ("0,3", "numbered from 1"),
                            ("2,99", "exit_depths: layers within 1..")):
        result = _invoke("tune", "--checkpoint", str(trained_tiny), "--max-drop", "1", "--exit-depths", depths,
                         "--results", str(tmp_path / "tuned-never"))
        assert result.exit_code == 2 and message in result.output and not (tmp_path / "tuned-never").exists()
    empty_input = tmp_path / "blank.txt"
    empty_input.write_text("\n\n")
    result = _invoke("predict", "--checkpoint", str(trained_tiny), "--file", str(empty_input))
    assert result.exit_code == 2 and "no text to classify" in result.output


def test_bench_appends_and_resumes(trained_tiny, tmp_path):
    results = tmp_path / "results"
    args = ("bench", "--checkpoint", str(trained_tiny), "--task", "sst2", "--preset", "smoke", "--results",
            str(results), "--points", "ablation", "--rows", "12")
    first = _invoke(*args)
    assert first.exit_code == 0, first.output
    assert "8 point(s) measured in this run, 0 already measured" in first.output
    # output to a pipe or file (here captured) gets room for the whole table: names and headers are not cut short
    assert "eat:prune+exit" in first.output and "rows/s sorted" in first.output and "token-layer frac" in first.output
    second = _invoke(*args)
    assert "0 point(s) measured in this run, 8 already measured" in second.output
    assert len((results / "results.jsonl").read_text().splitlines()) == 8
    # the short table: exits off, exit, prune+exit and the tuned point (no baselines given here)
    short = tmp_path / "short"
    args = ("bench", "--checkpoint", str(trained_tiny), "--task", "sst2", "--preset", "smoke", "--results",
            str(short), "--points", "tuned", "--rows", "12", "--peers", "none")  # peers: tests/test_peers.py
    missing = _invoke(*args)
    assert missing.exit_code == 2 and "no " in missing.output and "tuned_sst2.json" in missing.output
    short.mkdir()
    (short / "tuned_sst2.json").write_text(json.dumps({"knobs": {
        "keep_ratio": [0.9, 0.7], "exit_layers": "all", "exit_policy": "confidence", "exit_threshold": 0.8}}))
    measured = _invoke(*args)
    assert measured.exit_code == 0, measured.output
    rows = [json.loads(line) for line in (short / "results.jsonl").read_text().splitlines()]
    assert sorted(r["point"] for r in rows) == ["eat:exit", "eat:none", "eat:prune+exit", "eat:tuned"]
    # a point tuned for batch throughput (`eat tune --batch-size N` writes tuned_sst2_bN.json) joins the short table
    (short / "tuned_sst2_b8.json").write_text(json.dumps({"knobs": {
        "keep_ratio": [0.9, 0.7], "exit_layers": "all", "exit_policy": "confidence", "exit_threshold": 0.9}}))
    again = _invoke(*args)
    assert again.exit_code == 0, again.output
    assert "5 point(s) measured in this run" in again.output  # a new point: the whole table is re-timed
    rows = [json.loads(line) for line in (short / "results.jsonl").read_text().splitlines()]
    assert sorted(r["point"] for r in rows) == ["eat:exit", "eat:none", "eat:prune+exit", "eat:tuned", "eat:tuned-b8"]
    # --accuracy-all-rows: 12 timed rows, and every point's accuracy on all 872 SST-2 dev rows beside them
    whole = _invoke(*args, "--accuracy-all-rows")
    assert whole.exit_code == 0, whole.output
    assert "5 point(s) measured in this run" in whole.output  # other hashes: not taken for the sample-only rows
    rows = [json.loads(line) for line in (short / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and sum("accuracy_all_rows" in r for r in rows) == 5
    assert all(r["rows_all"] == 872 and r["rows"] == 12 for r in rows if "accuracy_all_rows" in r)


def test_bench_arrival_only_skips_the_length_sorted_pass(trained_tiny, tmp_path):
    """--arrival-only: rows carry arrival-order throughput only, and the table has no sorted column."""
    results = tmp_path / "arrival"
    result = _invoke("bench", "--checkpoint", str(trained_tiny), "--task", "sst2", "--preset", "smoke", "--results",
                     str(results), "--points", "ablation", "--rows", "8", "--arrival-only")
    assert result.exit_code == 0, result.output
    assert "rows/s sorted" not in result.output and "rows/s" in result.output
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["throughput_rows_per_s"] > 0 for r in rows)
    assert not any("throughput_sorted_rows_per_s" in r or "padding_share_sorted" in r for r in rows)
    saved = [json.loads(line) for line in (results / "bench_configs.jsonl").read_text().splitlines()]
    assert len(saved) == 1 and saved[0]["bench"]["sorted_throughput"] is False and saved[0]["preset"] == "smoke"


def test_tune_for_a_batch_size_writes_its_own_point(trained_tiny, tmp_path):
    results = tmp_path / "r"
    result = _invoke("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--max-drop", "100",
                     "--batch-size", "4", "--rows", "8", "--results", str(results))
    assert result.exit_code == 0, result.output
    assert "highest batch-4 throughput" in result.output and "rows/s" in result.output
    tuned = json.loads((results / "tuned_sst2_b4.json").read_text())
    assert all(c["calibration_rows_per_s"] > 0 for c in tuned["candidates"])
    assert not (results / "tuned_sst2.json").exists()  # the batch-1 choice is not overwritten
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert sorted(r["point"] for r in rows) == ["eat:none", "eat:tuned-b4"]
    assert {r["batch_size_throughput"] for r in rows} == {4}


def test_both_tuners_keep_their_own_reference_rows(trained_tiny, tmp_path):
    """The batch-1 and the batch-32 tuner both log an `eat:none` row timed beside their point; in one results folder
    the second must not replace the first's (each speedup needs its own run's reference)."""
    results = tmp_path / "r"
    common = ("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--max-drop", "100", "--rows", "8",
              "--results", str(results))
    assert _invoke(*common).exit_code == 0
    assert _invoke(*common, "--batch-size", "32").exit_code == 0
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert sorted(r["point"] for r in rows) == ["eat:none", "eat:none", "eat:tuned", "eat:tuned-b32"]
    assert len({r["run_id"] for r in rows if r["point"] == "eat:none"}) == 2


def test_tune_certify_from_the_command_line(trained_tiny, tmp_path):
    """`--certify`: the choice carries its bound in the JSON and the output; without --max-drop it is refused.
    `--preset smoke`: the dev report is measured with the smoke preset's bench settings (batch 8, not demo's 32)."""
    results = tmp_path / "r"
    result = _invoke("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--max-drop", "100",
                     "--certify", "0.9", "--rows", "8", "--results", str(results), "--preset", "smoke")
    assert result.exit_code == 0, result.output
    assert {row["batch_size_throughput"] for row in map(json.loads, (results / "results.jsonl").read_text().splitlines())
            } == {8}
    unknown = _invoke("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--max-drop", "1", "--preset",
                      "huge", "--results", str(tmp_path / "never"))
    assert unknown.exit_code == 2 and "unknown preset 'huge'" in unknown.output and not (tmp_path / "never").exists()
    tuned = json.loads((results / "tuned_sst2.json").read_text())
    assert tuned["certify"] == 0.9 and "certified at 90% confidence" in tuned["criterion"]
    assert 0.0 <= tuned["drop_upper_bound"] <= 100.0 and "certified: the drop is at most" in result.output
    bad = _invoke("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--latency-budget", "5",
                  "--certify", "0.9", "--results", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "needs max_drop" in bad.output
    # --keep-grid: only those schedules are searched, and the error is split over fewer tests (2 policies x 1)
    narrow = tmp_path / "narrow"
    result = _invoke("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--max-drop", "100",
                     "--certify", "0.9", "--keep-grid", "1.0", "--rows", "8", "--results", str(narrow))
    assert result.exit_code == 0, result.output
    narrow_tuned = json.loads((narrow / "tuned_sst2.json").read_text())
    assert narrow_tuned["keep_grid"] == [1.0] and narrow_tuned["knobs"]["keep_ratio"] == 1.0
    assert "Bonferroni over 2 tests" in narrow_tuned["criterion"] and "over 10 tests" in tuned["criterion"]
    assert {c["keep_ratio"] for c in narrow_tuned["candidates"]} == {1.0}
    for grid, message in (("1.5", "keep ratios lie in (0, 1]"), ("0.9,x", "expected a number"), (";", "give at least one")):
        refused = _invoke("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--max-drop", "1",
                          "--keep-grid", grid, "--results", str(tmp_path / "never"))
        assert refused.exit_code == 2 and f"--keep-grid: {message}" in refused.output, refused.output
    # `eat eval --tuned` evaluates exactly that point (here on 8 rows; by default on the whole split)
    evaluated = _invoke("eval", "--checkpoint", str(trained_tiny), "--task", "sst2", "--tuned",
                        str(results / "tuned_sst2.json"), "--limit", "8")
    assert evaluated.exit_code == 0, evaluated.output
    reports = sorted(trained_tiny.glob("eval-*.json"), key=lambda path: path.stat().st_mtime)
    knobs = json.loads(reports[-1].read_text())["knobs"]
    assert all(knobs[name] == value for name, value in tuned["knobs"].items()), (knobs, tuned["knobs"])
    (tmp_path / "not-tuned.json").write_text(json.dumps({"accuracy": 90}))
    for path, message in ((tmp_path / "missing.json", "no such file"), (tmp_path / "not-tuned.json", "no 'knobs'")):
        refused = _invoke("eval", "--checkpoint", str(trained_tiny), "--task", "sst2", "--tuned", str(path))
        assert refused.exit_code == 2 and message in refused.output


def test_readme_quickstart_smallest_form(tmp_path, data_dir):
    """The README's first command runs `eat run --preset demo`; here the same job at the smoke preset."""
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"eat run --preset demo --task sst2", makefile)
    result = subprocess.run(
        [str(Path(__import__("sys").executable).parent / "eat"), "run", "--preset", "smoke", "--task", "sst2",
         "--runs", str(tmp_path / "runs"), "--threads", "2"],
        capture_output=True, text=True, env={**__import__("os").environ, "EAT_DATA_DIR": str(data_dir)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"sst2 validation static\s+accuracy \d+\.\d+%", result.stdout)
    assert re.search(r"sst2 validation eat:tuned\s+accuracy \d+\.\d+%", result.stdout)
    report = tmp_path / "runs" / "results" / "report.md"
    assert report.is_file() and (tmp_path / "runs" / "results" / "plots" / "sst2_frontier.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results" / "results.jsonl").read_text().splitlines()]
    assert {"static", "half-depth", "eat:none", "eat:prune+sparse+exit", "eat:tuned"} <= {r["point"] for r in rows}
    # the default two-stage recipe: exit heads on the frozen static model, so with exits off EAT *is* static
    accuracy = {r["point"]: r["accuracy"] for r in rows}
    assert accuracy["eat:none"] == accuracy["static"]
    run_config = json.loads((tmp_path / "runs" / "results" / "run_config_sst2.json").read_text())
    assert run_config["recipe"] == "two-stage" and "--recipe two-stage" in report.read_text()
    eat_config = json.loads((tmp_path / "runs" / "sst2" / "eat" / "train_config.json").read_text())
    assert eat_config["freeze_backbone"] and eat_config["exit_pooling"] == "mean"
    assert eat_config["init_from"] == str(tmp_path / "runs" / "sst2" / "static")


def test_pruning_aware_training_schedule_from_the_command_line(tiny_backbone, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    out = tmp_path / "pruned-run"
    result = _invoke("train", "--task", "sst2", "--model", tiny_backbone, "--preset", "smoke", "--train-limit", "32",
                     "--train-keep-ratio", "0.9,0.6", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_config.json").read_text())["train_keep_ratio"] == [0.9, 0.6]
    assert json.loads((out / "model" / "config.json").read_text())["keep_ratio"] == [0.9, 0.6]
    bad = _invoke("train", "--task", "sst2", "--model", tiny_backbone, "--preset", "smoke",
                  "--train-keep-ratio", "most", "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "--train-keep-ratio: expected a number or 'first,last'" in bad.output


def test_tune_refuses_a_reference_with_another_calibration_slice(trained_tiny, tiny_backbone, data_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    other = tmp_path / "other-seed"
    trained = _invoke("train", "--task", "sst2", "--model", tiny_backbone, "--preset", "smoke", "--variant", "static",
                      "--seed", "7", "--out", str(other))
    assert trained.exit_code == 0, trained.output
    result = _invoke("tune", "--checkpoint", str(trained_tiny), "--task", "sst2", "--max-drop", "1",
                     "--reference", str(other), "--results", str(tmp_path / "r"))
    assert result.exit_code == 2 and "calibration slice differs" in result.output and "seed: 42 vs 7" in result.output


def test_sentence_calibration_and_bf16_from_the_command_line(tiny_backbone, data_dir, tmp_path, monkeypatch):
    """`--calibration-unit sentence` holds out whole SST-2 sentences (and their phrases), and `eat tune` tunes on
    exactly those; `--bf16 on` trains under bf16 autocast on CPU. Bad values are one clear line."""
    from eat.data import carve_sentence_calibration, load_glue

    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    out = tmp_path / "by-sentence"
    result = _invoke("train", "--task", "sst2", "--model", tiny_backbone, "--preset", "smoke", "--train-limit", "32",
                     "--calibration-unit", "sentence", "--bf16", "on", "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["calibration_unit"] == "sentence" and saved["bf16"] == "on"
    tuned = _invoke("tune", "--checkpoint", str(out), "--task", "sst2", "--max-drop", "1",
                    "--results", str(tmp_path / "r"))
    assert tuned.exit_code == 0, tuned.output
    _, sentences = carve_sentence_calibration(load_glue("sst2", "train", data_dir), saved["calibration_rows"],
                                              seed=saved["seed"])
    assert f"chosen on {len(sentences)} calibration rows" in tuned.output
    for option, value in (("--calibration-unit", "paragraph"), ("--bf16", "maybe")):
        bad = _invoke("train", "--task", "sst2", "--model", tiny_backbone, "--preset", "smoke", option, value,
                      "--out", str(tmp_path / "bad"))
        assert bad.exit_code == 2 and option.strip("-").replace("-", "_") in bad.output


def test_gpu_pack_for_target_eight(trained_tiny, tmp_path, data_dir):
    """benchmarks/gpu_pack.py packs a two-stage run in fp16 with SST-2 dev and the tuned points; a jointly trained
    run (its static model is another checkpoint), a missing or knob-less tuned file are refused with one line."""
    import shutil
    import sys

    from safetensors import safe_open

    script = REPO / "benchmarks" / "gpu_pack.py"
    tuned = tmp_path / "tuned_sst2.json"
    tuned.write_text(json.dumps({"knobs": {"exit_layers": "all", "exit_policy": "confidence", "exit_threshold": 0.9}}))
    env = {**__import__("os").environ, "EAT_DATA_DIR": str(data_dir)}

    def pack(run, tuned_file):
        return subprocess.run([sys.executable, str(script), "--run", str(run), "--tuned", str(tuned_file), "--out",
                               str(tmp_path / "pack")], capture_output=True, text=True, env=env, timeout=300)

    refused = pack(trained_tiny, tuned)  # trained jointly: not a two-stage run
    assert refused.returncode != 0 and "not a two-stage run" in refused.stderr
    two_stage = tmp_path / "two-stage"
    shutil.copytree(trained_tiny, two_stage)
    config = json.loads((two_stage / "train_config.json").read_text())
    (two_stage / "train_config.json").write_text(json.dumps({**config, "freeze_backbone": True}))
    for tuned_file, message in ((tmp_path / "missing.json", "no such file"), (REPO / "README.md", "no 'knobs'")):
        refused = pack(two_stage, tuned_file)
        assert refused.returncode != 0 and message in refused.stderr
    packed = pack(two_stage, tuned)
    assert packed.returncode == 0, packed.stderr[-2000:]
    pack_dir = tmp_path / "pack"
    assert (pack_dir / "glue" / "sst2" / "validation.parquet").is_file() and (pack_dir / "tuned_sst2.json").is_file()
    with safe_open(str(pack_dir / "eat" / "model" / "model.safetensors"), "pt") as weights:
        assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {"torch.float16"}


def test_deploy_peers_head_to_head_on_a_sentence_task(trained_tiny, tmp_path):
    """benchmarks/deploy_peers.py on SST-2 end to end (issue #24 D1 / D2): one bench run with the peers, the EAT
    int8 rows at the point the int8 tuner chose (--tuned-int8), each target's fastest static peer timed again
    head to head against the EAT rows with the accuracy of the timed calls, and targets.md judging on those pairs."""
    pytest.importorskip("onnxruntime")
    from .conftest import benchmark_script

    fp32, int8 = ({"exit_layers": "all", "exit_policy": "confidence", "exit_threshold": tau} for tau in (0.3, 0.4))
    (tmp_path / "tuned.json").write_text(json.dumps({"knobs": fp32}))
    (tmp_path / "tuned_int8.json").write_text(json.dumps({"knobs": int8}))
    out = tmp_path / "out"
    benchmark_script("deploy_peers").main(["--runs", str(tmp_path), "--static", str(trained_tiny), "--eat",
                                           str(trained_tiny), "--tuned", str(tmp_path / "tuned.json"),
                                           "--tuned-int8", str(tmp_path / "tuned_int8.json"), "--rows", "10",
                                           "--threads", "1", "--preset", "smoke", "--peers", "ort-fp32,ort-int8",
                                           "--out", str(out)])
    rows = {r["point"]: r for r in map(json.loads, (out / "bench" / "results.jsonl").read_text().splitlines())}
    assert rows["eat:tuned:ort-int8"]["knobs"]["exit_threshold"] == 0.4  # the int8 tuner's point
    assert rows["eat:tuned:ort-fp32"]["knobs"]["exit_threshold"] == 0.3
    assert rows["eat:tuned"]["knobs"]["exit_threshold"] == 0.3
    pairs = json.loads((out / "head_to_head.json").read_text())
    targets = {pair["target"] for pair in pairs}
    assert {"D1 batch 1", "D2 batch 32, arrival order", "D2 batch 32, length-sorted (reported)"} == targets
    for pair in pairs:
        assert pair["peer"].startswith("static") and pair["eat"].startswith("eat:tuned")
        assert pair["rows"] == 10 and pair["peer_value"] > 0 and pair["eat_value"] > 0
        higher = pair["column"] != "b1_p50_ms"
        expected = pair["eat_value"] / pair["peer_value"] if higher else pair["peer_value"] / pair["eat_value"]
        assert pair["ratio"] == pytest.approx(expected)
        if not higher:  # batch 1: the accuracy of the very calls timed, for both systems
            assert set(pair["accuracy"]) == {pair["peer"], pair["eat"]}
            assert all(0.0 <= value <= 100.0 for value in pair["accuracy"].values())
    assert {pair["eat"] for pair in pairs if pair["target"] == "D1 batch 1"} <= {
        name for name in rows if name.startswith("eat:tuned")}
    judged = (out / "targets.md").read_text()
    assert "- D1 batch 1: EAT eat:tuned" in judged and "timed head to head" in judged
    assert "Head to head (OUT/head_to_head.json)" in judged
