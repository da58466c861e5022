"""Bad input through the `eat` command line (issue #29): every case of one table ends in a clear message naming the
file or flag (exit 2 for a usage error), or in a correct result, never in a traceback, a silent wrong result or a
changed output. The table is also the "Bad input" page: ``python -m tests.test_bad_input > docs/bad-input.md``.

Fast: a tiny random backbone (hidden 32, 2 layers), a 3-class run trained on a 60-row CSV in seconds, tiny files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    """One bad input: the command (``{name}`` fields are filled from the ``world`` fixture), the exit code and a
    regex the output must match; ``what``/``outcome`` are the documentation's words."""

    id: str
    what: str
    args: tuple[str, ...]
    exit_code: int
    pattern: str
    outcome: str


RUN = ("--model", "{backbone}", "--preset", "smoke")
OWN = ("--task", "mytask", "--data-file", "{train_csv}", "--eval-file", "{eval_csv}")

CASES: list[Case] = [
    # ---- data files
    Case("missing-file", "--data-file that does not exist", ("train", *RUN, "--task", "t", "--data-file", "{missing}",
         "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2, r"nope\.csv: no such file", "error naming the file"),
    Case("directory", "a directory as --data-file", ("train", *RUN, "--task", "t", "--data-file", "{tmp}",
         "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2, r"is a directory, not a data file",
         "error: a directory, not a data file"),
    Case("empty-file", "an empty (0-byte) CSV", ("train", *RUN, "--task", "t", "--data-file", "{empty_csv}",
         "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2, r"empty\.csv: cannot read as csv",
         "error naming the file"),
    Case("wrong-format", "a .txt file as a table", ("train", *RUN, "--task", "t", "--data-file", "{txt}",
         "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2, r"unsupported file type '\.txt'",
         "error listing the formats"),
    Case("wrong-column", "--text-column that the table lacks", ("train", *RUN, "--task", "t", "--data-file",
         "{train_csv}", "--eval-file", "{eval_csv}", "--text-column", "body", "--out", "{new_out}"), 2,
         r"train\.csv: no column 'body' \(columns: text, label\)", "error listing the file's columns"),
    Case("blank-label", "a blank label cell", ("train", *RUN, "--task", "t", "--data-file", "{blank_label_csv}",
         "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2,
         r"blank_label\.csv: column 'label' has 1 blank or null label\(s\) at rows \[3\]",
         "error naming the file and the rows (labels would shift)"),
    Case("null-label-jsonl", "a null label in JSONL", ("train", *RUN, "--task", "t", "--data-file",
         "{null_label_jsonl}", "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2,
         r"null_label\.jsonl: column 'label' has 1 blank or null label", "error naming the file and the rows"),
    Case("mixed-labels", "labels mixing names and integers (neg, 0)", ("train", *RUN, "--task", "t", "--data-file",
         "{mixed_csv}", "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2,
         r"mixed\.csv: column 'label' mixes integer labels", "error with an example row of each kind"),
    Case("unseen-eval-label", "an eval label the training labels lack", ("train", *RUN, "--task", "t", "--data-file",
         "{train_csv}", "--eval-file", "{eval_unseen_csv}", "--out", "{new_out}"), 2,
         r"eval_unseen\.csv: column 'label' has 1 label\(s\) outside the task's labels \['0', '1', '2'\]: \['7'\]",
         "error naming the unknown label"),
    Case("empty-text", "an empty text in the user's table", ("train", *RUN, "--task", "t", "--data-file",
         "{empty_text_csv}", "--eval-file", "{eval_csv}", "--out", "{new_out}"), 2,
         r"empty_text\.csv: column 'text' has 1 empty text", "error naming the rows (GLUE files: dropped, warned)"),
    Case("not-utf8", "a Latin-1 TSV", ("train", *RUN, "--task", "t", "--data-file", "{latin_tsv}", "--eval-file",
         "{eval_csv}", "--out", "{new_out}"), 2, r"latin\.tsv: not UTF-8 text \(invalid byte at line 2",
         "error naming the line"),
    Case("bom-and-glue-names", "a BOM and HF GLUE column names (sentence1, sentence2)",
         ("eval", "--checkpoint", "{run}", "--eval-file", "{bom_pairs_csv}", "--text-column", "sentence1",
          "--text-pair-column", "sentence2", "--limit", "4"), 0, r"validation: accuracy \d",
         "works: the BOM is ignored and the user's column names are kept"),
    # ---- flags
    Case("rows-0", "--rows 0", ("bench", "--checkpoint", "{run}", "--task", "mytask", "--rows", "0", "--results",
         "{results}"), 2, r"Invalid value for --rows: must be at least 1, got 0", "usage error naming the flag"),
    Case("rows-negative", "--rows -5", ("tune", "--checkpoint", "{run}", "--task", "mytask", "--max-drop", "1",
         "--rows", "-5", "--results", "{results}"), 2, r"--rows: must be at least 1, got -5",
         "usage error naming the flag"),
    Case("train-limit-0", "--train-limit 0", ("train", *RUN, *OWN, "--train-limit", "0", "--out", "{new_out}"), 2,
         r"--train-limit: must be at least 1", "usage error, before loading anything"),
    Case("eval-limit-0", "--eval-limit 0", ("train", *RUN, *OWN, "--eval-limit", "0", "--out", "{new_out}"), 2,
         r"--eval-limit: must be at least 1", "usage error before training (it came after training)"),
    Case("limit-0", "--limit 0", ("eval", "--checkpoint", "{run}", "--eval-file", "{eval_csv}", "--limit", "0"), 2,
         r"--limit: must be at least 1", "usage error naming the flag"),
    Case("batch-size-0", "--batch-size 0", ("train", *RUN, *OWN, "--batch-size", "0", "--out", "{new_out}"), 2,
         r"--batch-size: must be at least 1", "usage error naming the flag"),
    Case("threads-negative", "--threads -1", ("eval", "--checkpoint", "{run}", "--eval-file", "{eval_csv}",
         "--threads", "-1"), 2, r"--threads: must be at least 1, got -1", "usage error (was a traceback)"),
    Case("threads-0", "--threads 0", ("eval", "--checkpoint", "{run}", "--eval-file", "{eval_csv}", "--threads", "0"),
         2, r"--threads: must be at least 1, got 0", "usage error (was silently ignored)"),
    Case("max-length-2", "eat predict --max-length 2", ("predict", "--checkpoint", "{run}", "--max-length", "2",
         "a film"), 2, r"--max-length: must be at least 3", "usage error (classified [CLS][SEP] silently)"),
    Case("tau-2", "--tau 2", ("eval", "--checkpoint", "{run}", "--eval-file", "{eval_csv}", "--tau", "2"), 2,
         r"--tau: 2\.0 is not a confidence threshold: it lies in \(0, 1\]", "usage error (nothing could exit)"),
    Case("threshold-without-policy", "--knob exit_threshold=0.4 without an exit policy",
         ("eval", "--checkpoint", "{run}", "--eval-file", "{eval_csv}", "--knob", "exit_threshold=0.4"), 2,
         r"exit_threshold=0\.4: this checkpoint's exit_policy is 'none'", "error saying what to add"),
    Case("unknown-knob", "a misspelt knob", ("eval", "--checkpoint", "{run}", "--eval-file", "{eval_csv}", "--knob",
         "keep_ration=0.5"), 2, r"did you mean 'keep_ratio'", "error with the nearest knob"),
    # ---- checkpoints
    Case("config-not-json", "a config.json that is not JSON", ("eval", "--checkpoint", "{bad_config_run}",
         "--eval-file", "{eval_csv}"), 2, r"bad_config/model/config\.json: not (a )?valid JSON",
         "error naming the file"),
    Case("train-config-not-json", "a train_config.json that is not JSON", ("eval", "--checkpoint",
         "{bad_train_config_run}", "--eval-file", "{eval_csv}"), 2,
         r"bad_train_config/train_config\.json: not valid JSON", "error naming the file"),
    Case("init-from-bad-json", "--init-from a run whose train_config.json is not JSON",
         ("train", *RUN, *OWN, "--init-from", "{bad_train_config_run}", "--out", "{new_out}"), 2,
         r"--init-from .*bad_train_config/model: .*train_config\.json is not valid JSON", "error naming the file"),
    Case("hidden-size", "a config.json hidden_size that does not match the weights", ("eval", "--checkpoint",
         "{hidden_run}", "--eval-file", "{eval_csv}"), 2,
         r"config\.json does not match the weights .*weights \(30522, 32\) vs config \(30522, 64\)",
         "error naming the shapes"),
    Case("truncated-weights", "a truncated model.safetensors", ("eval", "--checkpoint", "{truncated_run}",
         "--eval-file", "{eval_csv}"), 2, r"truncated/model: (corrupt weight file|cannot load weights)",
         "error naming the checkpoint"),
    Case("foreign-checkpoint", "a GPT-2 config as checkpoint", ("eval", "--checkpoint", "{foreign_run}",
         "--eval-file", "{eval_csv}"), 2, r"model_type 'gpt2' is not a BERT-family encoder", "error"),
    Case("own-data-on-glue", "a 3-class own-data checkpoint evaluated on SST-2", ("eval", "--checkpoint", "{run}",
         "--task", "sst2"), 2, r"trained on .*train\.csv with labels \['0', '1', '2'\]; task sst2 has labels",
         "error (printed 0.00 before)"),
    Case("resume-truncated-optimizer", "resume with a truncated checkpoint-last/optimizer.pt",
         ("train", *RUN, *OWN, "--out", "{broken_optimizer_run}"), 2,
         r"checkpoint-last/optimizer\.pt: the optimizer state cannot be read", "error naming the file; run unchanged"),
    Case("resume-truncated-weights", "resume with a truncated checkpoint-last/model.safetensors",
         ("train", *RUN, *OWN, "--out", "{broken_weights_run}"), 2,
         r"checkpoint-last/model\.safetensors: the resumable checkpoint's weights cannot be read",
         "error naming the file; run unchanged"),
    Case("tune-few-rows", "eat tune on a run with 6 calibration rows", ("tune", "--checkpoint", "{run}", "--task",
         "mytask", "--max-drop", "1", "--results", "{results}"), 2,
         r"calibration split has 6 rows; eat tune needs at least 20", "error before anything is written"),
    # ---- prediction
    Case("predict-long-and-blank", "eat predict --file with a blank line and a text over --max-length",
         ("predict", "--checkpoint", "{run}", "--file", "{lines_txt}", "--json", "--max-length", "16"), 0,
         r"skipped 1 blank line\(s\) \(line 2\).*1 of 2 text\(s\) are longer than --max-length 16 tokens.*"
         r"\(line 3\)", "works: blank lines skipped with a count, results keep line numbers, truncation warned"),
]
CASES.append(Case("device-cuda", "--device cuda on a CPU build", ("eval", "--checkpoint", "{run}", "--eval-file",
                  "{eval_csv}", "--device", "cuda"), 2, r"--device: 'cuda': no CUDA device is available",
                  "usage error (was a traceback)"))  # skipped where CUDA is there: nothing to refuse

# cases covered by library tests in tests/test_reliability.py (their outcome is listed in the docs too)
LIBRARY_CASES = [
    ("two writers on one results folder (2 processes x 100 appends)", "all 200 rows kept (a lock file beside the "
     "log; unique temporary names)"),
    ("a --force re-measure killed before its table is written", "the old table stays whole; a table whose rows "
     "come from several runs is measured again"),
    ("a quoted newline inside a user TSV/CSV field", "one row (standard quoting; official GLUE TSVs keep "
     "quoting off)"),
    ("training labels 1/2, eval labels 0/1", "error naming label 0 (1/2 are label names, not ids)"),
    ("conll2003 training without seqeval", "error with the install hint, before training"),
    ("Ctrl-C (SIGINT) during any command", "'interrupted; resume with the same command', exit 130"),
    ("a run that resumes", "'resuming from step N' on stderr"),
]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone):
    """Files for every case, one finished 3-class run on a user CSV, and damaged copies of it."""
    from eat.training import train, train_config_from_preset

    tmp = tmp_path_factory.mktemp("bad-input")
    words = ["good", "bad", "fine", "dull", "great", "awful"]
    rows = [(f"{words[i % 6]} film number {i}", i % 3) for i in range(60)]
    train_csv = tmp / "train.csv"
    train_csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    eval_csv = tmp / "eval.csv"
    eval_csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows[:12]), encoding="utf-8")
    files = {
        "missing": tmp / "nope.csv", "empty_csv": tmp / "empty.csv", "txt": tmp / "table.txt",
        "blank_label_csv": tmp / "blank_label.csv", "null_label_jsonl": tmp / "null_label.jsonl",
        "mixed_csv": tmp / "mixed.csv", "eval_unseen_csv": tmp / "eval_unseen.csv",
        "empty_text_csv": tmp / "empty_text.csv", "latin_tsv": tmp / "latin.tsv",
        "bom_pairs_csv": tmp / "bom_pairs.csv", "lines_txt": tmp / "lines.txt",
    }
    files["empty_csv"].write_bytes(b"")
    files["txt"].write_text("text label\n")
    files["blank_label_csv"].write_text("text,label\na,0\nb,1\nc,2\nd,\ne,1\n")
    files["null_label_jsonl"].write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                                 for t, y in [("a", 0), ("b", None), ("c", 1)]))
    files["mixed_csv"].write_text("text,label\na,neg\nb,0\nc,1\n")
    files["eval_unseen_csv"].write_text("text,label\na,0\nb,7\n")
    files["empty_text_csv"].write_text('text,label\na,0\n"  ",1\nc,2\n')
    files["latin_tsv"].write_bytes("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    files["bom_pairs_csv"].write_text("\ufeffsentence1,sentence2,label\n" + "".join(
        f"{t},{t} again,{y}\n" for t, y in rows[:6]), encoding="utf-8")
    files["lines_txt"].write_text("a fine film\n\n" + "word " * 40 + "\n", encoding="utf-8")

    config = train_config_from_preset("smoke", task="mytask", model=tiny_backbone, data_file=str(train_csv),
                                      eval_file=str(eval_csv))
    run = tmp / "run"
    train(config, run)

    def damaged(name: str, change) -> Path:
        copy = tmp / name
        shutil.copytree(run, copy)
        change(copy)
        return copy

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    def set_hidden(copy: Path) -> None:
        config_file = copy / "model" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "hidden_size": 64}))

    stopped = tmp / "stopped"
    train(config, stopped, stop_after_steps=1)
    broken_optimizer = tmp / "broken_optimizer"
    shutil.copytree(stopped, broken_optimizer)
    truncate(broken_optimizer / "checkpoint-last" / "optimizer.pt")
    broken_weights = tmp / "broken_weights"
    shutil.copytree(stopped, broken_weights)
    truncate(broken_weights / "checkpoint-last" / "model.safetensors")
    values = {
        "tmp": tmp, "backbone": tiny_backbone, "train_csv": train_csv, "eval_csv": eval_csv, "run": run,
        "new_out": tmp / "new-run", "results": tmp / "results", "stopped": stopped,
        "bad_config_run": damaged("bad_config", lambda c: (c / "model" / "config.json").write_text("{not json")),
        "bad_train_config_run": damaged("bad_train_config", lambda c: (c / "train_config.json").write_text("[1,")),
        "hidden_run": damaged("hidden", set_hidden),
        "truncated_run": damaged("truncated", lambda c: truncate(c / "model" / "model.safetensors")),
        "foreign_run": damaged("foreign", lambda c: (c / "model" / "config.json").write_text(
            json.dumps({"model_type": "gpt2", "n_embd": 32}))),
        "broken_optimizer_run": broken_optimizer, "broken_weights_run": broken_weights, **files,
    }
    return {k: str(v) for k, v in values.items()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_case(case, world, monkeypatch):
    import re

    import torch

    from eat.cli import app

    if case.id == "device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    monkeypatch.setenv("COLUMNS", "400")  # one line per message (rich would wrap the usage error's box)
    monkeypatch.setenv("EAT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    tmp = Path(world["tmp"])
    before = _tree_digest(tmp)
    result = runner.invoke(app, [arg.format(**world) for arg in case.args])
    output = " ".join(result.output.split())  # rich may still wrap a long line: match on one line
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == case.exit_code, result.output
    assert re.search(case.pattern, output), output
    after = _tree_digest(tmp)
    changed = {name for name in before if after.get(name) != before[name]}
    if case.exit_code != 0:
        # a refused command writes nothing: no existing output changes, no new file appears
        assert not changed and set(after) == set(before), (changed, set(after) - set(before))
    else:  # a working command may add its own output (eval-*.json) but changes nothing that was there
        assert not {name for name in changed if not name.rsplit("/", 1)[-1].startswith("eval")}, changed


def test_interrupt_and_resume_messages(world, monkeypatch, caplog):
    """Ctrl-C says how to go on (exit 130); a resumed run says from which step."""
    import eat.evaluation
    from eat.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(eat.evaluation, "predict_encoded", interrupted)
        result = runner.invoke(app, ["eval", "--checkpoint", world["run"], "--eval-file", world["eval_csv"]])
    assert result.exit_code == 130 and "interrupted; resume with the same command" in " ".join(result.output.split())
    args = ["train", *(arg.format(**world) for arg in (*RUN, *OWN)), "--out", world["stopped"]]
    with caplog.at_level("WARNING", logger="eat.training"):
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming from step 1" in caplog.text


def test_token_task_without_seqeval_is_refused_before_training(world, monkeypatch, tmp_path):
    from eat.cli import app

    monkeypatch.setitem(sys.modules, "seqeval", None)  # import seqeval -> ImportError, as without the ner extra
    result = runner.invoke(app, ["train", "--task", "conll2003", "--model", world["backbone"], "--preset", "smoke",
                                 "--out", str(tmp_path / "ner")])
    assert result.exit_code == 2 and "pip install 'eat[ner]'" in " ".join(result.output.split())
    assert not (tmp_path / "ner").exists()


def test_own_data_checkpoint_is_benchmarked_on_its_own_eval_table(world, tmp_path):
    from eat.cli import app
    from eat.results import ResultsLog

    result = runner.invoke(app, ["bench", "--checkpoint", world["run"], "--task", "mytask", "--preset", "smoke",
                                 "--rows", "6", "--points", "sweeps", "--results", str(tmp_path / "r"),
                                 "--arrival-only"])
    assert result.exit_code == 0, result.output
    rows = ResultsLog(tmp_path / "r").rows()
    assert rows and all(row["dataset"].startswith(world["eval_csv"]) for row in rows)


def test_docs_page_lists_every_case():
    """docs/bad-input.md is generated from this table; regenerate it when a case changes."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text(encoding="utf-8")
    assert page == render_markdown()


def render_markdown() -> str:
    """The "Bad input" page: every case of the table and what it gets."""
    lines = ["# Bad input", "",
             "What each kind of bad input gets from the `eat` command line. Generated from the table in",
             "`tests/test_bad_input.py` (`python -m tests.test_bad_input > docs/bad-input.md`), where every line is",
             "a test: the exit code and message are asserted, and no existing output may change. Exit code 2 is a",
             "usage error or bad input (one red line, no traceback); 130 is an interrupt.", "",
             "| input | exit | what you get |", "|---|---|---|"]
    for case in CASES:
        lines.append(f"| {case.what} (`eat {case.args[0]}`) | {case.exit_code} | {case.outcome} |")
    for what, outcome in LIBRARY_CASES:
        lines.append(f"| {what} | | {outcome} |")
    lines += ["", "Decisions:", "",
              "- A user's table keeps its column names; GLUE's TSV renames apply to the official GLUE files only.",
              "- Labels are all integers or all names. Integers `0..k-1` are class ids; other integers (`1, 2`) are",
              "  names. A blank or null label is an error (it used to turn every label into a string).",
              "- `eat predict --file` skips blank lines with a count on stderr; `--json` results carry `line`, the",
              "  1-based line number in the file.",
              "- `eat tune` needs at least 20 calibration rows (one row is 5 accuracy points there).",
              "- A checkpoint trained on your own table is benchmarked and tuned on the eval table its",
              "  `train_config.json` names; asked to score a GLUE task with other labels, it is refused.", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - regenerates the docs page
    sys.stdout.write(render_markdown())


def test_own_data_checkpoint_is_tuned_on_its_own_tables(tmp_path, tiny_backbone):
    """With enough rows to hold out 20 calibration rows, `eat tune` tunes an own-data run and reports its point on
    the eval table the run names (no --data-file flag needed: the run knows its data)."""
    from eat.cli import app
    from eat.results import ResultsLog
    from eat.training import train, train_config_from_preset

    table = tmp_path / "big.csv"
    table.write_text("text,label\n" + "".join(f"film {i} was {'good' if i % 2 else 'bad'},{i % 2}\n"
                                               for i in range(220)), encoding="utf-8")
    run = tmp_path / "run"
    train(train_config_from_preset("smoke", task="mine", model=tiny_backbone, data_file=str(table),
                                   eval_file=str(table), eval_limit=16), run)
    result = runner.invoke(app, ["tune", "--checkpoint", str(run), "--task", "mine", "--max-drop", "5", "--rows", "8",
                                 "--results", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "chosen on 22 calibration rows" in result.output and (tmp_path / "r" / "tuned_mine.json").is_file()
    assert all(row["dataset"].startswith(str(table)) for row in ResultsLog(tmp_path / "r").rows())
