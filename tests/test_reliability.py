"""Issue #29 (reliability): each defect found by feeding bad input to the library, with the test that catches it.

The command-line side of the same cases is walked in ``tests/test_bad_input.py``."""

from __future__ import annotations

import json
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------- results folder


def _append_many(folder: str, writer: int, count: int) -> int:
    from eat.results import ResultsLog

    log = ResultsLog(folder)
    for i in range(count):
        log.append({"config_hash": f"w{writer}-{i}", "writer": writer, "i": i})
    return count


def test_two_processes_appending_to_one_results_log_lose_nothing(tmp_path):
    import multiprocessing

    from eat.results import ResultsLog

    # two processes, as two eat commands would be (fork: no second interpreter start-up; the writers only do file I/O)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(2) as pool:
        done = pool.starmap(_append_many, [(str(tmp_path), 0, 100), (str(tmp_path), 1, 100)])
    assert done == [100, 100]  # no exception in either writer
    rows = ResultsLog(tmp_path).rows()
    assert len(rows) == 200 and len({row["config_hash"] for row in rows}) == 200
    assert len(pd.read_csv(tmp_path / "results.csv")) == 200
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_one_atomic_writer_with_unique_temp_names(tmp_path, monkeypatch):
    import eat.results as results
    from eat.bench import save_json

    names = []
    original = results.os.replace

    def record(src, dst):
        names.append(Path(src).name)
        return original(src, dst)

    monkeypatch.setattr(results.os, "replace", record)
    save_json(tmp_path / "a.json", {"x": 1})
    save_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert len(set(names)) == 2 and all(name != "a.json.tmp" for name in names)  # never one fixed temp name


def _tiny_table(tmp_path):
    from eat.bench import ablation_points, bench_config_from_preset

    from .conftest import tiny_model
    from .test_bench import _encoded

    folder = tmp_path / "ckpt"
    tiny_model().save_pretrained(folder)
    bench = bench_config_from_preset("smoke", rows=None, batch_size=8, sorted_throughput=False)
    return ablation_points(str(folder), bench)[:3], _encoded(8), bench


def test_force_remeasure_killed_midway_keeps_the_old_table_whole(tmp_path, monkeypatch):
    from eat.bench import measure_points
    from eat.results import ResultsLog

    points, encoded, bench = _tiny_table(tmp_path)
    log = ResultsLog(tmp_path / "results")
    first = measure_points(points, encoded, bench, log, dataset_source="fixture", examples_dir=tmp_path / "examples")
    before = log.jsonl.read_text()

    def killed(self, rows, replace=False):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(ResultsLog, "append_rows", killed)
        with pytest.raises(KeyboardInterrupt):
            measure_points(points, encoded, bench, log, dataset_source="fixture", force=True,
                           examples_dir=tmp_path / "examples")
    assert log.jsonl.read_text() == before  # the old table, whole, one run
    for row in first:  # and its rows' example files are still their own
        assert (tmp_path / row["examples_file"]).is_file()
    # a table of rows from two runs (one point re-measured alone) is not complete: the next run measures it all
    measure_points(points[:1], encoded, bench, log, dataset_source="fixture", force=True)
    assert len({row["run_id"] for row in log.rows()}) == 2
    again = measure_points(points, encoded, bench, log, dataset_source="fixture")
    assert len(again) == 3 and len({row["run_id"] for row in log.rows()}) == 1 and len(log.rows()) == 3
    assert measure_points(points, encoded, bench, log, dataset_source="fixture") == []


def test_threshold_range_depends_on_the_exit_rule():
    """A confidence threshold lies in (0, 1]; a regression rule's threshold is in the label's units (may exceed 1)."""
    import typer

    from eat.cli import knobs_from_options

    assert knobs_from_options(["exit_policy=delta", "exit_threshold=2.5"], None)["exit_threshold"] == 2.5
    with pytest.raises(typer.BadParameter, match="must be > 0"):
        knobs_from_options(["exit_policy=spread", "exit_threshold=0"], None)
    with pytest.raises(typer.BadParameter, match=r"lies in \(0, 1\]"):
        knobs_from_options(["exit_policy=confidence", "exit_threshold=2.5"], None)
