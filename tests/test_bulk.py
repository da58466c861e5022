"""Large-file prediction (eat.bulk, `eat predict --input --output`): chunks, shards, rejects, resume, exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from eat.bulk import BulkConfig, iter_chunks, predict_files, read_predictions, verify_output
from eat.cli import app
from eat.data import DataError

from .conftest import REPO

WORDS = ("a gripping film the plot is thin but actors shine dull boring great fun long slow sharp witty "
         "cast story moving tedious").split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, backbone_path) -> str:
    """A tiny random EAT classifier (hidden 32, 2 layers, exit heads, confidence exit: about half the rows leave at
    layer 1) with the real tokenizer."""
    from transformers import AutoTokenizer

    from eat import EATConfig, EATForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-classifier")
    torch.manual_seed(0)
    config = EATConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=128, id2label={0: "negative", 1: "positive"},
                       label2id={"negative": 0, "positive": 1}, exit_layers="all", exit_pooling="mean",
                       exit_policy="confidence", exit_threshold=0.518)
    model = EATForSequenceClassification(config)
    with torch.no_grad():  # a random head is ~50/50 on every text; a steeper one spreads confidence around 0.52
        model.exit_heads["1"].classifier.weight.mul_(20)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone_path).save_pretrained(folder)
    return str(folder)


def test_chunks_cover_every_record_and_reject_bad_rows(tmp_path):
    data = ("text,id\n"
            "good one,a\n"
            ",b\n"                      # empty text
            "\"two, quoted\",c\n"
            "too,many,fields\n"         # a field too many
            "bad \xff byte,d\n")        # not UTF-8 (written below as raw bytes)
    path = tmp_path / "in.csv"
    path.write_bytes(data.replace("\xff", "\udcff").encode("utf-8", "surrogateescape"))
    config = BulkConfig("unused", id_column="id", chunk_rows=2)
    chunks = list(iter_chunks(path, "in.csv", config))
    assert [(c.index, c.first_row, c.records) for c in chunks] == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    assert chunks[0].frame["row"].tolist() == [0] and chunks[0].frame["id"].tolist() == ["a"]
    assert chunks[1].frame["text"].tolist() == ["two, quoted"]
    reasons = {r["row"]: r["reason"] for c in chunks for r in c.rejects}
    assert sorted(reasons) == [1, 3, 4]
    assert "empty" in reasons[1] and "fields" in reasons[3] and "UTF-8" in reasons[4]
    with pytest.raises(DataError, match=r"in.csv: row 1 .*empty"):
        list(iter_chunks(path, "in.csv", BulkConfig("unused", strict=True, chunk_rows=2)))


def test_jsonl_and_parquet_chunks(tmp_path):
    lines = ['{"text": "fine"}', "not json", '{"other": 1}', '[1, 2]', '{"text": null}', '{"text": "also fine"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    chunks = list(iter_chunks(tmp_path / "in.jsonl", "in.jsonl", BulkConfig("unused", chunk_rows=4)))
    assert [c.frame["row"].tolist() for c in chunks] == [[0], [5]]
    reasons = [r["reason"] for c in chunks for r in c.rejects]
    assert any("JSON" in r for r in reasons) and any("missing column 'text'" in r for r in reasons)
    assert any("not a JSON object" in r for r in reasons) and any("empty" in r for r in reasons)
    pd.DataFrame({"sentence": [f"row {i}" for i in range(25)]}).to_parquet(tmp_path / "in.parquet", row_group_size=7)
    chunks = list(iter_chunks(tmp_path / "in.parquet", "in.parquet", BulkConfig("unused", text_column="sentence",
                                                                                chunk_rows=10)))
    assert [c.records for c in chunks] == [10, 10, 5]
    assert np.concatenate([c.frame["row"] for c in chunks]).tolist() == list(range(25))


def test_missing_column_is_a_file_error(tmp_path, tiny_classifier):
    (tmp_path / "in.csv").write_text("sentence\nhello\n")
    with pytest.raises(DataError, match=r"in.csv: no column 'text'"):
        predict_files(BulkConfig(tiny_classifier), tmp_path / "in.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_files_matches_one_by_one_and_resumes(tmp_path, tiny_classifier):
    from eat.bulk import load_predictor, predict_frame

    texts = _texts(57)
    texts[10] = "   "  # rejected
    pd.DataFrame({"text": texts, "key": [f"k{i}" for i in range(57)]}).to_csv(tmp_path / "in.csv", index=False)
    config = BulkConfig(tiny_classifier, id_column="key", chunk_rows=20, batch_size=8)
    result = predict_files(config, tmp_path / "in.csv", tmp_path / "out")
    assert (result.rows, result.rejected, result.shards, result.shards_written) == (56, 1, 3, 3)
    assert verify_output(tmp_path / "out") == {"in.csv": 57}
    frame = read_predictions(tmp_path / "out")
    assert frame["row"].tolist() == [i for i in range(57) if i != 10]
    assert frame["id"].tolist() == [f"k{i}" for i in range(57) if i != 10]
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": "in.csv", "row": 10, "reason": "empty text in 'text'"}]
    # batched, length-sorted predictions equal batch-1 ones (exit decisions included)
    predictor = load_predictor(config)
    single = pd.concat([predict_frame(predictor, pd.DataFrame({"source": ["in.csv"], "row": [i], "text": [texts[i]]}),
                                      max_length=128, batch_size=1) for i in range(0, 57, 5) if i != 10])
    batched = frame.set_index("row").loc[single["row"]]
    assert batched["exit_layer"].tolist() == single["exit_layer"].tolist()
    assert len(set(frame["exit_layer"])) > 1  # the threshold makes some rows exit early
    np.testing.assert_allclose(np.stack(batched["probabilities"]), np.stack(single["probabilities"]), atol=1e-5)
    # a second run over a finished output writes nothing; other settings are refused
    again = predict_files(config, tmp_path / "in.csv", tmp_path / "out")
    assert again.shards_written == 0 and again.rows == 56
    with pytest.raises(ValueError, match="other settings .*chunk_rows"):
        predict_files(BulkConfig(tiny_classifier, id_column="key", chunk_rows=10), tmp_path / "in.csv",
                      tmp_path / "out")
    with pytest.raises(ValueError, match="other settings .*knobs"):
        predict_files(BulkConfig(tiny_classifier, id_column="key", chunk_rows=20, knobs={"exit_threshold": 0.9}),
                      tmp_path / "in.csv", tmp_path / "out")


def test_cli_predict_folder(tmp_path, tiny_classifier):
    folder = tmp_path / "inputs"
    folder.mkdir()
    pd.DataFrame({"text": _texts(12, 1)}).to_parquet(folder / "a.parquet")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(7, 2)) + "oops\n")
    result = CliRunner().invoke(app, ["predict", "--checkpoint", tiny_classifier, "--input", str(folder),
                                      "--output", str(tmp_path / "out"), "--chunk-rows", "5"])
    assert result.exit_code == 0, result.output
    assert "19 rows predicted, 1 rejected" in result.output
    assert verify_output(tmp_path / "out") == {"a.parquet": 12, "b.jsonl": 8}
    shards = sorted(p.name for p in (tmp_path / "out" / "shards").iterdir())
    assert shards == ["a.parquet-c000000.parquet", "a.parquet-c000001.parquet", "a.parquet-c000002.parquet",
                      "b.jsonl-c000000.parquet", "b.jsonl-c000001.parquet"]
    labels = json.loads(pq.read_schema(tmp_path / "out" / "shards" / shards[0]).metadata[b"eat.labels"])
    assert labels == ["negative", "positive"]
    bad = CliRunner().invoke(app, ["predict", "--checkpoint", tiny_classifier, "--input", str(folder)])
    assert bad.exit_code == 2 and "--input and --output" in bad.output


def test_sigkill_then_resume_every_row_exactly_once(tmp_path, tiny_classifier):
    """A real `eat predict` process is killed with SIGKILL at a random moment after its first shards; the rerun
    resumes, and the output holds every input row exactly once."""
    n = 2000
    pd.DataFrame({"text": _texts(n, 3), "id": np.arange(n) * 7}).to_csv(tmp_path / "big.csv", index=False)
    command = [sys.executable, "-m", "eat.cli", "predict", "--checkpoint", tiny_classifier,
               "--input", str(tmp_path / "big.csv"), "--output", str(tmp_path / "out"), "--id-column", "id",
               "--chunk-rows", "50", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = tmp_path / "out" / "manifest.json"
    wanted = int(np.random.default_rng().integers(2, 20))  # a random point, after a few finished shards
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= wanted:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    assert process.poll() is None, f"finished before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = json.loads(manifest.read_text())
    assert not finished["complete"] and 0 < len(finished["shards"]) < n // 50
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert verify_output(tmp_path / "out") == {"big.csv": n}
    frame = read_predictions(tmp_path / "out")
    assert frame["row"].tolist() == list(range(n))
    assert frame["id"].tolist() == [str(i * 7) for i in range(n)]
    assert not list((tmp_path / "out" / "shards").glob("*.tmp"))
