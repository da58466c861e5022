"""Tasks as data (issue #27): the registry and GLUE's metrics, regression heads and their exit rules, real CoLA and
STS-B slices, a user's own pair table through `eat run`, and every task's report naming its primary metric."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from eat.bootstrap import bootstrap_indices, paired_bootstrap_drop
from eat.configuration_eat import KnobError
from eat.evaluation import exits_at_threshold
from eat.modeling_eat import EATForSequenceClassification, exit_decision
from eat.tasks import METRICS, SEQUENCE_TASKS, TASKS, get_task, metric, result_fields, user_task
from eat.training import multi_exit_loss

from .conftest import mixed_batch, tiny_config

GLUE = ("sst2", "qqp", "mnli", "qnli", "rte", "mrpc", "cola", "stsb", "wnli")


# ------------------------------------------------------------------------------------------- registry, metrics


def test_registry_holds_glue_with_its_metrics_and_the_token_task():
    assert set(GLUE) <= set(TASKS) and set(SEQUENCE_TASKS) == set(GLUE)
    primary = {name: TASKS[name].primary_metric for name in GLUE}
    assert primary == {"sst2": "accuracy", "qqp": "accuracy", "mnli": "accuracy", "qnli": "accuracy",
                       "rte": "accuracy", "mrpc": "f1", "cola": "matthews", "stsb": "pearson", "wnli": "accuracy"}
    assert set(TASKS["stsb"].metrics) == {"pearson", "spearman"} and TASKS["stsb"].is_regression
    assert TASKS["stsb"].num_labels == 1 and TASKS["stsb"].is_pair
    assert set(TASKS["mrpc"].metrics) == set(TASKS["qqp"].metrics) == {"f1", "accuracy"}
    assert TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert TASKS["conll2003"].level == "token" and TASKS["conll2003"].primary_metric == "entity_f1"
    # GLUE TSV headers map onto the parquet names the task reads
    assert TASKS["mnli"].renames["sentence1"] == "premise" and TASKS["stsb"].renames["score"] == "label"
    assert "rte" not in [name for name, task in TASKS.items() if "sentence1" in task.renames]


def test_unknown_task_and_mismatched_metric_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown task 'colb' \(did you mean 'cola'\?\)"):
        get_task("colb")
    with pytest.raises(ValueError, match="--metric pearson: scores regression labels, but --label-kind is classes"):
        user_task("mine", "text", None, "label", "classes", "pearson")
    with pytest.raises(ValueError, match="unknown metric 'pearsn' \\(did you mean 'pearson'\\?\\)"):
        user_task("mine", label_kind="regression", metrics="pearsn")
    with pytest.raises(ValueError, match="--label-kind"):
        user_task("mine", label_kind="ordinal")
    mine = user_task("mine", "q1", "q2", "dup", metrics="f1,accuracy")
    assert mine.primary_metric == "f1" and mine.text_columns == ("q1", "q2") and mine.label_kind == "classes"
    assert user_task("sim", label_kind="regression").metrics == ("pearson", "spearman")


def test_metrics_agree_with_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    predicted = np.where(rng.random(200) < 0.8, labels, 1 - labels)
    assert metric("matthews")(labels, predicted) == pytest.approx(100 * matthews_corrcoef(labels, predicted))
    assert metric("f1")(labels, predicted) == pytest.approx(100 * f1_score(labels, predicted))
    assert metric("accuracy")(labels, predicted) == pytest.approx(100 * (labels == predicted).mean())
    scores, values = rng.uniform(0, 5, 200), rng.uniform(0, 5, 200)
    values = 0.6 * scores + 0.4 * values
    assert metric("pearson")(scores, values) == pytest.approx(100 * pearsonr(scores, values)[0])
    assert metric("spearman")(scores, values) == pytest.approx(100 * spearmanr(scores, values)[0])
    # a constant predictor has no correlation: 0, not NaN (tuners compare numbers)
    assert metric("pearson")(scores, np.full(200, 2.5)) == 0.0
    stsb = TASKS["stsb"]
    assert list(stsb.score(scores, values)) == ["pearson", "spearman"]  # primary first
    assert np.array_equal(stsb.predictions(values[:, None]), values)
    assert np.array_equal(TASKS["cola"].predictions(np.eye(2)[predicted]), predicted)


def test_result_fields_name_the_metric_and_keep_accuracy_only_where_it_is_one():
    cola = result_fields(TASKS["cola"], TASKS["cola"].score([0, 1, 1, 0], [0, 1, 0, 0]))
    assert cola["metric"] == "matthews" and cola["metric_value"] == cola["matthews"] and "accuracy" in cola
    stsb = result_fields(TASKS["stsb"], TASKS["stsb"].score([0.0, 1.0, 2.0], [0.1, 0.9, 2.5]))
    assert stsb["metric"] == "pearson" and "accuracy" not in stsb and set(stsb) >= {"pearson", "spearman"}
    assert set(result_fields(TASKS["stsb"], {"pearson": 1.0, "spearman": 2.0}, "_all_rows")) == {
        "metric_value_all_rows", "pearson_all_rows", "spearman_all_rows"}


def test_paired_bootstrap_bound_is_zero_for_the_same_predictions_and_matches_the_slow_path():
    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 5, 300)
    reference = labels + rng.normal(0, 0.5, 300)
    worse = labels + rng.normal(0, 1.5, 300)
    stsb = TASKS["stsb"]
    same = paired_bootstrap_drop(stsb, labels, reference, reference, 0.9)
    assert same["drop"] == 0.0 and same["upper"] == 0.0
    bound = paired_bootstrap_drop(stsb, labels, reference, worse, 0.9)
    assert bound["upper"] > bound["drop"] > 0
    # the vectorised Pearson and Matthews equal the metric functions on the same resamples
    index = bootstrap_indices(300, samples=20, seed=3)
    slow = np.array([stsb.primary(labels[i], reference[i]) - stsb.primary(labels[i], worse[i]) for i in index])
    assert bound["upper"] == pytest.approx(
        paired_bootstrap_drop(stsb, labels, reference, worse, 0.9)["upper"])
    fast = paired_bootstrap_drop(stsb, labels, reference, worse, 0.5, index)
    assert fast["upper"] == pytest.approx(np.quantile(slow, 0.5))
    classes = (labels > 2.5).astype(int)
    guess = np.where(rng.random(300) < 0.7, classes, 1 - classes)
    cola = TASKS["cola"]
    slow = np.array([cola.primary(classes[i], classes[i]) - cola.primary(classes[i], guess[i]) for i in index])
    assert paired_bootstrap_drop(cola, classes, classes, guess, 0.5, index)["upper"] == pytest.approx(
        np.quantile(slow, 0.5))


# ------------------------------------------------------------------------------------ regression and exit rules


def test_regression_exit_rules_are_pure_functions():
    values = [torch.tensor([[1.0], [1.0], [3.0]]), torch.tensor([[1.05], [1.5], [3.02]]),
              torch.tensor([[1.08], [1.52], [3.3]])]
    streak = previous = None
    decisions = []
    for logits in values:  # PABEE's regression rule: the last 2 changes below 0.1 -> patience 3 heads
        leave, streak, previous = exit_decision(logits, "delta", 0.1, 0.0, 3, streak, previous)
        decisions.append(leave.tolist())
    assert decisions == [[False, False, False], [False, False, False], [True, False, False]]
    streak = previous = None
    spread = []
    slow_drift = [torch.tensor([[1.0]]), torch.tensor([[1.08]]), torch.tensor([[1.16]])]
    for logits in slow_drift:  # steps of 0.08 pass "delta" at 0.1, but they span 0.16: "spread" keeps the row
        leave, streak, previous = exit_decision(logits, "spread", 0.1, 0.0, 3, streak, previous)
        spread.append(bool(leave))
    assert spread == [False, False, False]
    streak = previous = None
    for logits in slow_drift:
        leave, streak, previous = exit_decision(logits, "delta", 0.1, 0.0, 3, streak, previous)
    assert bool(leave)


def test_classification_rules_on_a_regression_head_and_back_are_refused():
    with pytest.raises(KnobError, match="regression model .* exits by delta or spread"):
        tiny_config(num_labels=1, exit_layers="all", exit_policy="confidence")
    with pytest.raises(KnobError, match="'spread' is for regression heads"):
        tiny_config(num_labels=3, exit_layers="all", exit_policy="spread")


@pytest.mark.parametrize("policy, patience", [("delta", 2), ("delta", 3), ("spread", 3)])
def test_regression_model_exits_per_row_as_the_cached_replay_says(policy, patience):
    """Early exit of a one-output model, batched and one at a time, equals the replay on cached head values."""
    torch.manual_seed(4)
    model = EATForSequenceClassification(tiny_config(num_labels=1, exit_layers="all")).eval()
    ids, mask = mixed_batch(seed=2, lengths=(17, 9, 30, 4, 12, 22))
    with torch.no_grad():
        cached = model(ids, mask, output_exit_logits=True, disable_exit=True).exit_logits.numpy()  # (B, E, 1)
        first = cached[:, :patience, 0]  # (B, patience) the first heads' values: about half the rows leave there
        movement = np.abs(np.diff(first, axis=1)).max(1) if policy == "delta" else first.max(1) - first.min(1)
        spread_of_heads = float(np.median(movement))
        model.config.set_knobs(exit_policy=policy, exit_threshold=spread_of_heads, exit_patience=patience)
        live = model(ids, mask)
        singles = [model(ids[i:i + 1, :int(mask[i].sum())]) for i in range(len(ids))]
    chosen, layers = exits_at_threshold(cached, model.config.exit_layer_list, policy, spread_of_heads, patience)
    assert live.exit_layer.tolist() == layers.tolist() and len(set(layers.tolist())) > 1  # rows leave apart
    assert np.allclose(live.logits.numpy(), chosen, atol=1e-5)
    assert [int(s.exit_layer[0]) for s in singles] == layers.tolist()


def test_regression_loss_is_mse_with_self_distillation_on_the_final_value():
    torch.manual_seed(0)
    values = torch.randn(8, 4, 1, requires_grad=True)  # (B, E, 1)
    labels = torch.rand(8) * 5
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loss = multi_exit_loss(values, labels, weights, distill_weight=0.5, temperature=2.0)
    v = values.detach()[..., 0]
    expected = (((v - labels[:, None]) ** 2).mean(0) * weights).sum() + 0.5 * ((v[:, :3] - v[:, 3:]) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(values.grad).all()
    model = EATForSequenceClassification(tiny_config(num_labels=1)).eval()
    ids, mask = mixed_batch(seed=1, lengths=(6, 9))
    out = model(ids, mask, labels=torch.tensor([1.0, 4.0]))
    assert out.loss.item() == pytest.approx(torch.nn.functional.mse_loss(out.logits[:, 0], torch.tensor([1.0, 4.0])).item())


@pytest.fixture(scope="module")
def tiny_deep_backbone(tmp_path_factory, backbone_path) -> str:
    """A tiny random BERT with 4 layers (hidden 32) and the real tokenizer: room for exits with patience 2 and 3."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-4")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone_path).save_pretrained(folder)
    return str(folder)


def test_a_tiny_similarity_model_trains_its_exit_heads_and_exits(tmp_path, tiny_deep_backbone, data_dir, monkeypatch):
    """STS-B-like: train static on a real STS-B slice, fit regression exit heads on it (two-stage), then tune a
    regression exit rule by Pearson with a bootstrap uncertainty; its rules' points leave before the last layer."""
    from transformers import AutoTokenizer

    from eat.bench import tune
    from eat.checkpoints import load_classifier
    from eat.data import batches, encode
    from eat.training import train, train_config_from_preset, training_data

    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    base = dict(task="stsb", model=tiny_deep_backbone, train_limit=200, calibration_rows=60, eval_limit=60, epochs=2.0,
                learning_rate=1e-3)
    static = train(train_config_from_preset("smoke", variant="static", **base), tmp_path / "static")
    assert static.dev_metric == "pearson" and np.isfinite(static.dev_accuracy["validation"])
    eat_config = train_config_from_preset("smoke", variant="eat", init_from=str(tmp_path / "static"),
                                          freeze_backbone=True, exit_pooling="mean",
                                          **{**base, "epochs": 5.0, "learning_rate": 1e-2})
    eat = train(eat_config, tmp_path / "eat")
    saved = json.loads((tmp_path / "eat" / "model" / "config.json").read_text())
    assert saved["problem_type"] == "regression" and len(saved["id2label"]) == 1
    _, calibration, _ = training_data(eat_config)
    assert calibration.is_regression and 50 < len(calibration) <= 60  # 10% cap, rounded down
    tokenizer = AutoTokenizer.from_pretrained(eat.model_dir)
    encoded = encode(calibration, tokenizer, 48)
    result = tune(eat.model_dir, encoded, max_drop=100.0, timing_rows=10, warmup=1, keep_grid=(1.0,),
                  task=TASKS["stsb"])
    assert result.metric == "pearson" and result.drop_interval["method"] == "paired percentile bootstrap"
    assert "Pearson r" in result.criterion and result.knobs["exit_policy"] in ("delta", "spread", "none")
    # max drop 100: every rule qualifies, and each one's finalist leaves before the last layer
    finalists = {(c["exit_policy"], c.get("exit_patience")): c for c in result.candidates}
    assert {("delta", 2), ("delta", 3), ("spread", 3), ("none", None)} == set(finalists)
    assert finalists[("delta", 2)]["mean_exit_layer"] < 4
    from eat.bench import _tuned_knobs

    knobs = _tuned_knobs(finalists[("delta", 2)])  # with its depth cap when the tuner found one
    assert knobs["exit_policy"] == "delta" and knobs["exit_patience"] == 2
    model = load_classifier(eat.model_dir, knobs=knobs)
    with torch.no_grad():
        layers = torch.cat([model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).exit_layer
                            for b in batches(encoded, 16)])
    assert float(layers.float().mean()) == pytest.approx(finalists[("delta", 2)]["mean_exit_layer"])
    from eat.evaluation import predict_texts

    answer = predict_texts(model, tokenizer, ["A man is playing a flute."], ["A man plays the flute."])[0]
    assert set(answer) == {"text", "score", "exit_layer", "tokens"} and np.isfinite(answer["score"])


# ------------------------------------------------------------------------------------------------ real data


def test_real_cola_and_stsb_slices_load_encode_and_score(data_dir, backbone_path):
    from transformers import AutoTokenizer

    from eat.data import encode, load_glue

    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    cola = load_glue("cola", "validation", data_dir).subset(120, seed=0)
    assert cola.label_names == ("unacceptable", "acceptable") and not cola.is_regression
    assert set(cola.frame["label"]) == {0, 1} and "text_pair" not in cola.frame
    encoded = encode(cola, tokenizer, 64)
    assert len(encoded) == 120 and all(ids[0] == tokenizer.cls_token_id for ids in encoded.input_ids)
    majority = np.ones(120, dtype=int)  # "acceptable" for every row: Matthews 0, accuracy about 69%
    scores = TASKS["cola"].score(encoded.labels, majority)
    assert scores["matthews"] == 0.0 and 55 < scores["accuracy"] < 85
    stsb = load_glue("stsb", "validation", data_dir).subset(120, seed=0)
    assert stsb.is_regression and stsb.label_names == ("similarity",) and "text_pair" in stsb.frame
    labels = stsb.frame["label"].to_numpy()
    assert labels.dtype == np.float32 and 0.0 <= labels.min() and labels.max() <= 5.0
    encoded = encode(stsb, tokenizer, 64)
    assert all(1 in types for types in encoded.token_type_ids)  # the second sentence is segment 1
    # word overlap of the two sentences is a (weak) similarity signal: Pearson clearly above 0 on real rows
    overlap = [len(set(a.lower().split()) & set(b.lower().split())) / len(set(a.lower().split()) | set(b.lower().split()))
               for a, b in zip(stsb.frame["text"], stsb.frame["text_pair"])]
    assert TASKS["stsb"].primary(labels, np.asarray(overlap)) > 30


def test_a_regression_table_needs_numbers(tmp_path):
    from eat.data import DataError, load_table

    table = tmp_path / "scores.csv"
    table.write_text("a,b,score\nx,y,1.5\nx,z,high\nu,v,\n")
    with pytest.raises(DataError, match=r"scores.csv: column 'score' has 2 label\(s\) that are not numbers.*row 1"):
        load_table(table, "a", "b", "score", label_kind="regression")
    table.write_text("a,b,score\nx,y,1.5\nx,z,4\n")
    data = load_table(table, "a", "b", "score", label_kind="regression")
    assert data.is_regression and data.frame["label"].tolist() == [1.5, 4.0] and data.label_names == ("score",)


# ---------------------------------------------------------------------------- the main job on the user's table


def _user_pairs(data_dir, folder, rows: int, seed: int):
    """A user's own pair CSV with its own column names and string labels: real QQP rows."""
    frame = pd.read_parquet(data_dir / "qqp" / "train_carved.parquet").sample(rows, random_state=seed)
    table = pd.DataFrame({"first": frame["question1"], "second": frame["question2"],
                          "same": np.where(frame["label"] == 1, "yes", "no")})
    path = folder / f"pairs_{seed}.csv"
    table.to_csv(path, index=False)
    return path


def test_a_users_pair_csv_runs_the_whole_main_job(tmp_path, tiny_backbone, data_dir):
    """G3: `eat run --data-file --eval-file` on a user's pair CSV, nothing else changed: three models trained,
    tuned, swept, ablated, timed, and a report that names the metric asked for."""
    from typer.testing import CliRunner

    from eat.cli import app

    train_file, eval_file = _user_pairs(data_dir, tmp_path, 300, 1), _user_pairs(data_dir, tmp_path, 40, 2)
    results = tmp_path / "results"
    result = CliRunner().invoke(app, ["run", "--preset", "smoke", "--task", "mypairs", "--data-file", str(train_file),
                                      "--eval-file", str(eval_file), "--text-column", "first",
                                      "--text-pair-column", "second", "--label-column", "same", "--metric",
                                      "f1,accuracy", "--model", tiny_backbone, "--runs", str(tmp_path / "runs"),
                                      "--results", str(results), "--threads", "2"])
    assert result.exit_code == 0, result.output[-3000:]
    assert "mypairs validation static" in result.output and " f1 " in result.output
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert {"static", "half-depth", "eat:none", "eat:prune+sparse+exit", "eat:tuned"} <= {r["point"] for r in rows}
    assert {r["metric"] for r in rows} == {"f1"} and all("accuracy" in r and "metric_value" in r for r in rows)
    eat_config = json.loads((tmp_path / "runs" / "mypairs" / "eat" / "train_config.json").read_text())
    assert eat_config["exit_pooling"] == "pair" and eat_config["data_file"] == str(train_file)
    tuned = json.loads((results / "tuned_mypairs.json").read_text())
    assert tuned["metric"] == "f1" and tuned["drop_interval"] is not None
    report = (results / "report.md").read_text()
    assert "Primary metric: F1 (`f1`" in report and "| point | role | F1 |" in report
    assert (results / "plots" / "mypairs_frontier.png").is_file()
    run_config = json.loads((results / "run_config_mypairs.json").read_text())
    assert run_config["data_file"] == str(train_file) and run_config["metric"] == "f1,accuracy"


# --------------------------------------------------------------------------- every report names its metric (G4)


@pytest.mark.parametrize("name", GLUE)
def test_every_tasks_report_names_its_primary_metric(name, tmp_path):
    """G4: measure a static row and an exiting row of a tiny model with the task's head on a few rows scored as
    that task, build the report, and find the task's primary metric named in its text and table."""
    from eat.bench import BenchConfig, OperatingPoint, measure_points
    from eat.data import EncodedDataset
    from eat.report import build_report
    from eat.results import ResultsLog

    task = TASKS[name]
    outputs = task.num_labels
    folder = tmp_path / "model"
    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(num_labels=outputs, exit_layers="all"))
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    rows = 12
    ids = [[1] + rng.integers(3, 100, int(n)).tolist() + [102 % 120] for n in rng.integers(3, 20, rows)]
    labels = (rng.uniform(0, 5, rows).astype(np.float32).tolist() if task.is_regression
              else (np.arange(rows) % outputs).tolist())
    encoded = EncodedDataset(ids, [[0] * len(r) for r in ids], labels, 0, [len(r) for r in ids])
    rule = {"exit_policy": "delta", "exit_threshold": 0.05} if task.is_regression else {
        "exit_policy": "confidence", "exit_threshold": 0.4}
    points = [OperatingPoint("static", str(folder), {"exit_layers": None, "exit_policy": "none"}, "baseline",
                             "static"),
              OperatingPoint("eat:tuned", str(folder), {"exit_layers": "all", **rule}, "tuned")]
    bench = BenchConfig(task=name, split=task.eval_splits[0], warmup=1, batch_size=4, throughput_repeats=1,
                        sorted_throughput=False)
    measure_points(points, encoded, bench, ResultsLog(tmp_path / "results"), dataset_source="tiny rows",
                   task=task)
    report = build_report(tmp_path / "results").read_text()
    title = METRICS[task.primary_metric].title
    assert f"Primary metric: {title} (`{task.primary_metric}`" in report
    assert f"| point | role | {title} |" in report
