"""The token task end to end on a tiny backbone and slices of the real CoNLL-2003 files: train (with resume),
eval, predict, tune, bench and report; user data in JSONL; bad input."""

from __future__ import annotations

import json
import os
import re

import pytest
from typer.testing import CliRunner

from eat.cli import app
from eat.ner_data import CONLL_LABELS, encode_tagged, load_tagged

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def conll_env(data_dir, conll_dir):
    os.environ["EAT_DATA_DIR"] = str(data_dir)
    os.environ["EAT_CONLL_DIR"] = str(conll_dir)
    return conll_dir


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory, tiny_backbone, conll_env):
    out = tmp_path_factory.mktemp("ner") / "run"
    result = _invoke("train", "--task", "conll2003", "--model", tiny_backbone, "--preset", "smoke", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert re.search(r"conll2003 validation entity F1: \d+\.\d+%", result.output)
    return out


def test_load_and_encode_real_slice(conll_env, backbone_path):
    from transformers import AutoTokenizer

    data = load_tagged("conll2003", "validation").subset(40, seed=1)
    assert data.label_names == CONLL_LABELS and len(data) == 40
    assert all(not tag.startswith("I-") or i > 0 for s in data.sentences for i, tag in enumerate(s.tags))
    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    encoded = encode_tagged(data, tokenizer, 16)  # short limit: long sentences become chunks
    assert encoded.split_sentences > 0 and len(encoded) > len(data)
    labelled = sum(sum(flags) for flags in encoded.word_starts)
    assert labelled == sum(len(s.tokens) for s in data.sentences)  # every word labelled exactly once
    assert all(length <= 16 for length in encoded.lengths)


def test_train_eval_predict_tune_bench_report(tagger_run, tmp_path):
    result = _invoke("eval", "--checkpoint", str(tagger_run), "--task", "conll2003", "--limit", "30", "--tau", "0.3")
    assert result.exit_code == 0, result.output
    assert "per-exit F1: L1:" in result.output
    written = json.loads((tagger_run / "eval-exit_policy=confidence-exit_threshold=0.3.json").read_text())
    summary = written["validation"]
    assert summary["sentences"] == 30 and set(summary["word_exit_distribution"]) <= {"1", "2"}
    assert 0 < summary["token_layer_ratio"] <= 1.0
    result = _invoke("predict", "--checkpoint", str(tagger_run), "--json", "EU rejects German call .")
    line = json.loads(result.output.strip())
    assert line["words"] == ["EU", "rejects", "German", "call", "."]
    assert len(line["tags"]) == 5 and all(tag in CONLL_LABELS for tag in line["tags"])
    results = tmp_path / "results"
    result = _invoke("tune", "--checkpoint", str(tagger_run), "--task", "conll2003", "--max-drop", "1.0",
                     "--results", str(results), "--rows", "10")
    assert result.exit_code == 0, result.output
    assert json.loads((results / "tuned_conll2003.json").read_text())["knobs"]["exit_policy"] == "confidence"
    result = _invoke("bench", "--checkpoint", str(tagger_run), "--task", "conll2003", "--preset", "smoke",
                     "--points", "ablation", "--rows", "10", "--batch-size", "32", "--max-length", "48", "--results", str(results),
                     "--static", str(tagger_run))
    assert result.exit_code == 0, result.output
    rows = [json.loads(r) for r in (results / "results.jsonl").read_text().splitlines()]
    assert {"eat:none", "eat:exit", "eat:prune+sparse+exit", "static", "eat:tuned"} <= {r["point"] for r in rows}
    assert all(r["metric"] == "entity_f1" for r in rows)
    result = _invoke("report", "--results", str(results))
    assert result.exit_code == 0, result.output
    assert "entity F1" in (results / "report.md").read_text()
    result = _invoke("bench", "--checkpoint", str(tagger_run), "--task", "conll2003", "--rows", "10",
                     "--accuracy-all-rows", "--results", str(results))
    assert result.exit_code == 2 and "sentence-level tasks only" in result.output


def test_user_jsonl_data_and_bad_input(tiny_backbone, tmp_path, conll_env, tagger_run):
    train = tmp_path / "train.jsonl"
    rows = [{"tokens": ["Alice", "visits", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},
            {"tokens": ["Bob", "likes", "Rome", "a", "lot"], "tags": ["B-PER", "O", "B-LOC", "O", "O"]}] * 8
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "user-run"
    result = _invoke("train", "--task", "ner", "--model", tiny_backbone, "--preset", "smoke", "--data-file",
                     str(train), "--eval-file", str(dev), "--out", str(out))
    assert result.exit_code == 0, result.output
    bad_dev = tmp_path / "bad.jsonl"
    bad_dev.write_text(json.dumps({"tokens": ["x"], "tags": ["B-ORG"]}) + "\n")
    result = _invoke("eval", "--checkpoint", str(out), "--task", "ner", "--eval-file", str(bad_dev))
    assert result.exit_code == 2 and f"{bad_dev}:1: unknown tag 'B-ORG'" in result.output
    # a token checkpoint is refused for a sentence task, in one line
    result = _invoke("eval", "--checkpoint", str(tagger_run), "--task", "sst2")
    assert result.exit_code == 2 and "conll2003" in result.output and "Traceback" not in result.output
    result = _invoke("tune", "--checkpoint", str(tagger_run), "--task", "conll2003", "--latency-budget", "5")
    assert result.exit_code == 2 and "--max-drop" in result.output


def test_deploy_peers_judges_d4_on_a_smoke_tagger(tagger_run, tmp_path):
    """benchmarks/deploy_peers.py --task conll2003 (issue #24 D4): one `eat bench` run with the token peers, one
    row per peer point with its backend and precision, the report's peer table, D5 in entity F1 from the token
    evaluation, and targets.md judging D4 at batch 1 and 32."""
    pytest.importorskip("onnxruntime")
    from .conftest import benchmark_script

    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"knobs": {"exit_layers": "all", "exit_policy": "confidence",
                                           "exit_threshold": 0.3}}))
    out = tmp_path / "out"
    benchmark_script("deploy_peers").main(["--task", "conll2003", "--static", str(tagger_run), "--eat",
                                           str(tagger_run), "--tuned", str(tuned), "--rows", "10", "--threads", "1",
                                           "--preset", "smoke", "--peers", "torch-int8,ort-int8", "--out", str(out)])
    rows = {r["point"]: r for r in map(json.loads, (out / "bench" / "results.jsonl").read_text().splitlines())}
    expected = {"static:torch-int8": ("torch", "int8"), "static:ort-int8": ("onnxruntime", "int8"),
                "eat:tuned:torch-int8": ("torch", "int8"), "eat:tuned:ort-int8": ("onnxruntime", "int8"),
                "static": ("torch", "fp32"), "eat:tuned": ("torch", "fp32")}
    assert {name: (rows[name]["backend"], rows[name]["precision"]) for name in expected} == expected
    assert len({rows[name]["run_id"] for name in expected}) == 1
    assert all(rows[name]["metric"] == "entity_f1" and 0.0 <= rows[name]["metric_value"] <= 100.0
               for name in expected)
    assert "| eat:tuned:ort-int8 | onnxruntime | int8 |" in (out / "bench" / "report.md").read_text()
    targets = (out / "targets.md").read_text()
    assert "- D4 batch 1: EAT eat:tuned" in targets and "- D4 batch 32, arrival order:" in targets
    assert "in the full table" in targets and "head to head" not in targets  # token tasks: no head-to-head pass
    assert "its entity_f1" in targets and "length-sorted" not in targets
    assert "## D5: int8 entity_f1 cost (10 dev sentences, untimed)" in targets
    d5 = [line for line in targets.splitlines() if line.startswith(("- static ", "- eat:tuned "))]
    assert len(d5) == 4 and all(" int8: " in line for line in d5)  # static and tuned EAT, torch and ORT int8
