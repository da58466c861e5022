"""The main job's recipes and its refusal to mix runs made with other settings (no training here: configs only)."""

import dataclasses
import json

import pytest

from eat.pipeline import HEAD_STAGE, PAIR_POOLING, RunConfig, _train_variant, run_task, training_configs


def test_two_stage_recipe_fits_heads_on_the_frozen_static_run(tmp_path):
    configs = training_configs(RunConfig("sst2", "demo"), tmp_path, {"epochs": 2.0, "train_limit": 100})
    assert list(configs) == ["static", "eat", "half"]  # static first: the head stage starts from it
    eat, static = configs["eat"], configs["static"]
    assert eat.init_from == str(tmp_path / "sst2" / "static") and eat.freeze_backbone
    assert (eat.exit_pooling, eat.epochs, eat.learning_rate) == (HEAD_STAGE["exit_pooling"], HEAD_STAGE["epochs"],
                                                                 HEAD_STAGE["learning_rate"])
    assert static.epochs == 2.0 and static.train_limit == 100 and not static.freeze_backbone
    # all three hold out the same calibration slice; SST-2 holds out whole sentences (dev is whole sentences)
    assert {(c.calibration_unit, c.calibration_rows, c.seed) for c in configs.values()} == {("sentence", 500, 42)}
    assert training_configs(RunConfig("qqp", "demo"), tmp_path)["eat"].calibration_unit == "row"
    # sentence pairs: the heads read each segment's mean and their comparison
    assert {training_configs(RunConfig(task, "demo"), tmp_path)["eat"].exit_pooling for task in ("qqp", "mnli")} == {
        PAIR_POOLING}


def test_joint_recipe_trains_eat_from_the_backbone(tmp_path):
    eat = training_configs(RunConfig("sst2", "demo", recipe="joint"), tmp_path)["eat"]
    assert eat.init_from is None and not eat.freeze_backbone and eat.exit_pooling == "cls"


def test_refit_recipe_trains_eat_jointly_from_static_then_fits_mean_heads_on_it(tmp_path):
    from eat.pipeline import JOINT_STAGE

    configs = training_configs(RunConfig("stsb", "demo", recipe="refit"), tmp_path, {"epochs": 2.0})
    assert list(configs) == ["static", "eat-joint", "eat", "half"]  # each stage after the one it starts from
    joint, eat, static = configs["eat-joint"], configs["eat"], configs["static"]
    assert joint.variant == "eat" and not joint.freeze_backbone and joint.exit_pooling == PAIR_POOLING
    assert joint.init_from == joint.teacher == str(tmp_path / "stsb" / "static")
    assert (joint.epochs, joint.learning_rate, joint.exit_loss_weights) == (
        JOINT_STAGE["epochs"], JOINT_STAGE["learning_rate"], "uniform")
    assert eat.init_from == str(tmp_path / "stsb" / "eat-joint") and eat.freeze_backbone and eat.exit_pooling == "mean"
    assert static.epochs == 2.0 and configs["half"].variant == "half"
    assert training_configs(RunConfig("sst2", "demo", recipe="refit"), tmp_path)["eat-joint"].exit_pooling == "mean"


@pytest.mark.parametrize("field, value, message", [("recipe", "cascade", "unknown recipe 'cascade'"),
                                                   ("task", "colb", "unknown task 'colb'"),
                                                   ("certify", 1.5, "certify: a confidence strictly between"),
                                                   ("max_drop", -1.0, "max_drop: must be >= 0")])
def test_run_config_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(RunConfig("sst2", "demo"), **{field: value}).validate()


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path):
    """Switching recipe (or preset settings) in the same runs folder must not silently reuse the old model."""
    joint = training_configs(RunConfig("sst2", "demo", recipe="joint"), tmp_path)["eat"]
    folder = tmp_path / "sst2" / "eat"
    folder.mkdir(parents=True)
    (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(joint)))
    (folder / "train_summary.json").write_text("{}")
    assert _train_variant(joint, folder, None) == folder / "model"  # same settings: reused
    two_stage = training_configs(RunConfig("sst2", "demo"), tmp_path)["eat"]
    with pytest.raises(ValueError, match="trained with other settings .*freeze_backbone: False there, True now"):
        _train_variant(two_stage, folder, None)
    assert json.loads((folder / "train_config.json").read_text()) == dataclasses.asdict(joint)  # untouched


def test_results_of_another_run_are_refused(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "run_config_sst2.json").write_text(json.dumps(dataclasses.asdict(RunConfig("sst2", "demo", "joint"))))
    with pytest.raises(ValueError, match="holds results of another run of sst2"):
        run_task("sst2", "demo", tmp_path / "runs", results)
    assert not (tmp_path / "runs").exists()  # refused before training anything


@pytest.mark.parametrize("flag, expected", [("--length-bucketing", True), ("--no-length-bucketing", False),
                                            (None, None)])
def test_eat_run_passes_length_bucketing_to_training(tmp_path, monkeypatch, flag, expected):
    """`eat run --length-bucketing` reaches the training settings (so runs trained with bucketed batches can be
    resumed by the main job); without the flag the preset decides."""
    from typer.testing import CliRunner

    import eat.pipeline
    from eat.cli import app

    seen = {}

    def capture(task, preset, runs_dir, results_dir, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(eat.pipeline, "run_task", capture)
    args = ["run", "--preset", "smoke", "--runs", str(tmp_path)] + ([flag] if flag else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (seen["train_overrides"] or {}).get("length_bucketing") == expected
    if expected is not None:
        configs = training_configs(RunConfig("sst2", "demo"), tmp_path, seen["train_overrides"])
        assert {c.length_bucketing for c in configs.values()} == {expected}


def test_the_main_job_tunes_on_the_tuners_own_grid_unless_the_preset_names_one():
    """With the presets' default grid the tuner picks its own (finer when certifying, from just above chance for
    MNLI's three classes); a preset with a grid of its own (smoke) keeps it, except when certifying."""
    from eat.bench import bench_config_from_preset
    from eat.pipeline import tuner_grid

    demo = bench_config_from_preset("demo", task="mnli")
    assert tuner_grid(demo, None) is None and tuner_grid(demo, 0.9) is None
    smoke = bench_config_from_preset("smoke", task="sst2")
    assert tuner_grid(smoke, None) == smoke.tau_grid != demo.tau_grid
    assert tuner_grid(smoke, 0.9) is None


def test_one_preset_object_feeds_training_measuring_and_tuning():
    """Each preset is one object (eat.presets): the training and bench configs built from its name carry its
    settings, and the main job's allowed drop is its max_drop. The numbers are the ones the presets always had."""
    from eat.bench import bench_config_from_preset
    from eat.presets import PRESETS, get_preset
    from eat.training import train_config_from_preset

    for name, preset in PRESETS.items():
        train, bench = train_config_from_preset(name), bench_config_from_preset(name)
        assert {key: getattr(train, key) for key in preset.train.overrides()} == preset.train.overrides()
        assert {key: getattr(bench, key) for key in preset.bench.overrides()} == preset.bench.overrides()
        assert all(isinstance(getattr(bench, key), list) for key in ("tau_grid", "keep_sweep", "window_sweep"))
    smoke, demo, paper = (get_preset(name) for name in ("smoke", "demo", "paper"))
    assert (smoke.train.train_limit, smoke.bench.rows, smoke.bench.batch_size, smoke.max_drop) == (64, 24, 8, 5.0)
    assert (demo.train.train_limit, demo.train.max_length, demo.bench.warmup, demo.max_drop) == (6000, 64, 10, 0.5)
    assert (paper.train.train_limit, paper.train.epochs, paper.bench.throughput_repeats) == (None, 2.0, 3)
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets: smoke, demo, paper"):
        get_preset("huge")
    with pytest.raises(ValueError, match="unknown preset"):
        bench_config_from_preset("huge")


def test_a_smoke_run_on_two_dev_splits_goes_through_the_report(tmp_path, tiny_backbone, data_dir, monkeypatch):
    """The main job at the smoke preset on MNLI (two dev splits, so series are named task:split) with a tiny
    backbone, then its report: every series has its section and its threshold-sweep plot (the pipeline and the
    report name sweep files by one rule), every image the report links exists, no sweep file is left unread, and
    rebuilding the report from the same files gives the same bytes."""
    import re

    from eat.pipeline import summary_lines
    from eat.report import build_report

    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    results = tmp_path / "results"
    summary = run_task("mnli", "smoke", tmp_path / "runs", results, train_overrides={"model": tiny_backbone})
    report = (results / "report.md").read_text()
    assert summary["report"] == str(results / "report.md")
    for split in ("validation_matched", "validation_mismatched"):
        assert f"## mnli:{split}" in report
        assert f"![tau sweep](plots/mnli_{split}_tau_sweep.png)" in report
        assert (results / f"tau_sweep_mnli_{split}.csv").is_file()
    linked = re.findall(r"!\[[^]]*\]\((plots/[^)]+)\)", report)
    assert linked and all((results / path).is_file() for path in linked)
    sweeps = {path.stem.removeprefix("tau_sweep_") for path in results.glob("tau_sweep_*.csv")}
    assert sweeps == {"mnli_validation_matched", "mnli_validation_mismatched"}
    assert "Main job: `eat run --preset smoke --recipe two-stage`" in report and "Operating point chosen" in report
    lines = summary_lines(results, "mnli")
    assert {line.split()[1] for line in lines if " eat:tuned " in line} == {"validation_matched",
                                                                            "validation_mismatched"}
    build_report(results)
    assert (results / "report.md").read_text() == report
