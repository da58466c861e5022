"""Issue #29 (reliability): each defect found by feeding bad input to the library, with the test that catches it.

The command-line side of the same cases is walked in ``tests/test_bad_input.py``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eat.data import DataError, load_table


# ------------------------------------------------------------------------------------------- user tables, labels


def test_user_table_keeps_its_own_column_names(tmp_path):
    # sentence1 / sentence2 are the Hugging Face GLUE names of MRPC, RTE, STS-B; GLUE TSV renames must not touch them
    table = tmp_path / "mrpc.parquet"
    pd.DataFrame({"sentence1": ["a b", "c d"], "sentence2": ["e", "f"], "label": [0, 1], "idx": [0, 1]}).to_parquet(table)
    data = load_table(table, "sentence1", "sentence2", "label")
    assert data.frame["text"].tolist() == ["a b", "c d"] and data.frame["text_pair"].tolist() == ["e", "f"]
    with pytest.raises(DataError, match=r"no column 'premise' \(columns: sentence1, sentence2, label, idx\)"):
        load_table(table, "premise", None, "label")


@pytest.mark.parametrize("content, message", [
    ("text,label\na,0\nb,\nc,1\n", r"has 1 blank or null label\(s\) at rows \[1\]"),
    ("text,label\na,neg\nb,0\nc,1\n", r"mixes integer labels .* and text labels .*row 0: 'neg'"),
])
def test_blank_and_mixed_labels_are_errors_naming_file_and_rows(tmp_path, content, message):
    table = tmp_path / "labels.csv"
    table.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="labels.csv: column 'label' " + message):
        load_table(table, "text", None, "label")


def test_null_label_in_jsonl_is_an_error(tmp_path):
    table = tmp_path / "labels.jsonl"
    table.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": null}\n{"text": "c", "label": 1}\n')
    with pytest.raises(DataError, match=r"labels.jsonl: column 'label' has 1 blank or null label\(s\) at rows \[1\]"):
        load_table(table, "text", None, "label")
    table.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1.0}\n')  # pandas reads ints as float
    assert load_table(table, "text", None, "label").frame["label"].tolist() == [0, 1]


def test_eval_labels_outside_the_training_labels_are_named(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,1\nb,2\nc,2\n")
    names = load_table(train, "text", None, "label").label_names
    assert names == ("1", "2")  # labels 1/2 are names, not ids into a 3-class head with a class never seen
    evals = tmp_path / "eval.csv"
    evals.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(DataError, match=r"eval.csv: column 'label' has 1 label\(s\) outside .*\['1', '2'\]: \['0'\]"):
        load_table(evals, "text", None, "label", names)
    evals.write_text("text,label\na,2\nb,1\n")
    assert load_table(evals, "text", None, "label", names).frame["label"].tolist() == [1, 0]


def test_quoted_newline_in_a_user_tsv_is_one_row(tmp_path):
    table = tmp_path / "pandas.tsv"
    pd.DataFrame({"text": ["two\nlines", 'a "quoted" word', "plain"], "label": [1, 0, 1]}).to_csv(
        table, sep="\t", index=False)
    data = load_table(table, "text", None, "label")
    assert data.frame["text"].tolist() == ["two\nlines", 'a "quoted" word', "plain"]
    assert data.frame["label"].tolist() == [1, 0, 1] and data.label_names == ("0", "1")


def test_bom_and_directory(tmp_path):
    table = tmp_path / "bom.jsonl"
    table.write_text("\ufeff" + json.dumps({"text": "a", "label": "x"}) + "\n", encoding="utf-8")
    assert load_table(table, "text", None, "label").label_names == ("x",)
    with pytest.raises(DataError, match="is a directory, not a data file"):
        load_table(tmp_path, "text", None, "label")
