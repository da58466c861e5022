"""Data loading on both GLUE layouts (real slices of ../shared/data), user tables, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eat.data import (DataError, TextDataset, batches, carve_calibration, carve_sentence_calibration, encode, load_glue,
                      load_table, resolve_glue_file)


def test_sst2_tsv_and_parquet_layouts_agree(data_dir, tmp_path):
    parquet = load_glue("sst2", "validation", data_dir)
    assert parquet.source.endswith("validation.parquet") and len(parquet) == 872
    tsv_root = tmp_path / "glue"
    (tsv_root / "sst2").mkdir(parents=True)
    (tsv_root / "sst2" / "dev.tsv").write_bytes((data_dir / "sst2" / "dev.tsv").read_bytes())
    tsv = load_glue("sst2", "validation", tsv_root)
    assert tsv.source.endswith("dev.tsv")
    assert tsv.frame["text"].tolist() == parquet.frame["text"].tolist()  # quotes survive QUOTE_NONE
    assert tsv.frame["label"].tolist() == parquet.frame["label"].tolist()
    assert tsv.frame["text"][0] == "it 's a charming and often affecting journey . "


def test_partial_and_carved_files_are_mapped_explicitly(data_dir):
    path, note = resolve_glue_file("qqp", "train", data_dir)
    assert path.name == "train_carved.parquet" and "carved" in note
    path, _ = resolve_glue_file("qqp", "validation", data_dir)
    assert path.name == "validation_carved.parquet"  # never the full dev the carved train came from
    path, note = resolve_glue_file("mnli", "train", data_dir)
    assert path.name == "train_sample.parquet" and "10%" in note
    matched = load_glue("mnli", "validation_matched", data_dir)
    assert matched.label_names == ("entailment", "neutral", "contradiction") and "text_pair" in matched.frame


def test_glue_tsv_columns_for_mnli_and_qqp(tmp_path):
    (tmp_path / "mnli").mkdir()
    (tmp_path / "mnli" / "dev_matched.tsv").write_text(
        "index\tsentence1\tsentence2\tgold_label\n0\tA man sleeps.\tA person rests.\tentailment\n"
        "1\tIt rains.\tIt is sunny.\tcontradiction\n", encoding="utf-8")
    data = load_glue("mnli", "validation_matched", tmp_path)
    assert data.frame["label"].tolist() == [0, 2] and data.frame["text_pair"][1] == "It is sunny."


def test_glue_rows_with_an_empty_text_are_dropped_with_a_warning(data_dir, tmp_path, caplog):
    # The real MNLI 10% train sample has one empty hypothesis: the task still trains, the row is named and dropped.
    sample = pd.read_parquet(data_dir / "mnli" / "train_sample.parquet")
    empty_rows = sample.index[sample["hypothesis"].isna() | (sample["hypothesis"].str.strip() == "")].tolist()
    assert empty_rows, "the shared MNLI sample was expected to hold an empty hypothesis"
    (tmp_path / "mnli").mkdir()
    sample.iloc[: empty_rows[0] + 2].to_parquet(tmp_path / "mnli" / "train_sample.parquet")
    with caplog.at_level("WARNING", logger="eat.data"):
        data = load_glue("mnli", "train", tmp_path)
    assert len(data) == empty_rows[0] + 1 and (data.frame["text_pair"].str.strip() != "").all()
    assert f"dropped 1 row(s) with an empty text, e.g. rows [{empty_rows[0]}]" in caplog.text
    # A user's own table with the same row is an error, not a silent drop.
    with pytest.raises(DataError, match=r"column 'hypothesis' has 1 empty text"):
        load_table(tmp_path / "mnli" / "train_sample.parquet", "premise", "hypothesis", "label")


def test_user_tables_with_string_and_int_labels(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('body,tag\n"hello, world",spam\nsomething else,ham\n', encoding="utf-8")
    data = load_table(csv_file, "body", None, "tag")
    assert data.label_names == ("ham", "spam") and data.frame["label"].tolist() == [1, 0]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"a": f"t{i}", "b": f"u{i}", "y": i % 3}) for i in range(6)))
    data = load_table(jsonl, "a", "b", "y")
    assert data.label_names == ("0", "1", "2") and "text_pair" in data.frame
    parquet = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["x", "y"], "label": ["pos", "neg"]}).to_parquet(parquet)
    assert load_table(parquet, "text", None, "label", ["neg", "pos"]).frame["label"].tolist() == [1, 0]


def test_bad_input_messages_name_file_and_problem(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_table(tmp_path / "missing.csv", "text", None, "label")
    bad_column = tmp_path / "cols.csv"
    bad_column.write_text("sentence,label\nhi,1\n")
    with pytest.raises(DataError, match=r"cols.csv: no column 'text'.*sentence"):
        load_table(bad_column, "text", None, "label")
    bad_label = tmp_path / "labels.csv"
    bad_label.write_text("text,label\nhi,1\nho,7\n")
    with pytest.raises(DataError, match=r"labels.csv.*outside the task's labels.*row 1: '7'"):
        load_table(bad_label, "text", None, "label", ["negative", "positive"])
    empty = tmp_path / "empty.csv"
    empty.write_text('text,label\nhi,0\n"  ",1\n')
    with pytest.raises(DataError, match=r"empty.csv.*1 empty text.*rows \[1\]"):
        load_table(empty, "text", None, "label")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.tsv: not UTF-8.*line 2"):
        load_table(latin, "text", None, "label")
    with pytest.raises(DataError, match="unknown task"):
        load_glue("colb", "train", tmp_path)
    with pytest.raises(DataError, match="no file for split"):
        load_glue("sst2", "train", tmp_path)


def test_overlong_texts_truncated_with_one_warning(data_dir, backbone_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    data = load_glue("sst2", "validation", data_dir).subset(200, seed=1)
    with caplog.at_level("WARNING"):
        encoded = encode(data, tokenizer, max_length=16)
    assert encoded.truncated > 0 and max(encoded.lengths) == 16
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_batches_are_bucketed_padded_and_cover_every_row(data_dir, backbone_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    encoded = encode(load_glue("sst2", "validation", data_dir).subset(300), tokenizer, 64)
    seen = []
    padded = 0
    for batch in batches(encoded, 32, shuffle=True, seed=3):
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # dynamic padding
        padded += int((1 - batch["attention_mask"]).sum())
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(300))
    unbucketed = sum(int((1 - b["attention_mask"]).sum()) for b in batches(encoded, 32, bucket=False))
    assert padded < unbucketed / 2


def test_sentence_calibration_holds_out_whole_sentences_and_their_phrases(data_dir):
    """SST-2 train rows are parse-tree phrases: calibration by sentence takes rows no longer row contains, and
    no training row may be a piece of a calibration sentence (that would leak its label into training)."""
    full = load_glue("sst2", "train", data_dir)
    # a real slice: the first 40 rows that are whole sentences, plus every row that is a phrase of one of them
    texts = full.frame["text"].str.strip()
    whole = [t for t in texts.iloc[:3000] if len(t.split()) >= 6][:40]
    blob = "\n".join(whole)
    frame = full.frame[texts.map(lambda t: t in blob)].reset_index(drop=True)
    data = TextDataset(frame, full.label_names, full.source)
    train, calibration = carve_sentence_calibration(data, sentences=5, seed=3)
    assert len(calibration) == 5
    train_texts = train.frame["text"].str.strip().tolist()
    for sentence in calibration.frame["text"].str.strip():
        assert not any(sentence in other for other in train_texts)  # not a phrase of a training row
        assert not any(phrase in sentence for phrase in train_texts)  # none of its phrases trained on
        others = [t for t in frame["text"].str.strip() if t != sentence]
        assert not any(sentence in other for other in others)  # a whole sentence, not a phrase
    assert len(train) + len(calibration) < len(data) and len(train) > len(data) // 2
    again_train, again = carve_sentence_calibration(data, sentences=5, seed=3)
    assert again.frame.equals(calibration.frame) and again_train.frame.equals(train.frame)
    assert calibration.frame["text"].str.split().str.len().mean() > frame["text"].str.split().str.len().mean()
    with pytest.raises(DataError, match="found only"):
        carve_sentence_calibration(data, sentences=10_000, seed=3)
    pairs = load_glue("mnli", "validation_matched", data_dir).subset(50)
    with pytest.raises(DataError, match="text pairs"):
        carve_sentence_calibration(pairs, sentences=5)


def test_calibration_split_is_disjoint_and_seeded(data_dir):
    data = load_glue("sst2", "validation", data_dir)
    train, calibration = carve_calibration(data, fraction=0.25, seed=5, max_rows=100)
    assert len(calibration) == 100 and len(train) == 772
    again, calibration_again = carve_calibration(data, fraction=0.25, seed=5, max_rows=100)
    assert calibration.frame.equals(calibration_again.frame)
    assert not set(calibration.frame["text"]) & set(train.frame["text"]) - set(data.frame["text"][data.frame["text"].duplicated()])
