"""Fine-tuning: losses, presets, resume after interruption, finished runs are never overwritten silently."""

from __future__ import annotations

import json

import pytest
import torch

from eat.training import (RunFinishedError, exit_weights, multi_exit_loss, train, train_config_from_preset)


def test_exit_weights_and_joint_loss():
    assert exit_weights("depth", (1, 2, 3)).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert exit_weights("uniform", (2, 4)).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="exit_loss_weights"):
        exit_weights([1.0], (1, 2))
    logits = torch.tensor([[[2.0, 0.0], [3.0, 0.0]]])  # (B=1, E=2, C=2)
    labels = torch.tensor([0])
    plain = multi_exit_loss(logits, labels, torch.tensor([0.5, 0.5]), 0.0, 2.0)
    expected = 0.5 * torch.nn.functional.cross_entropy(logits[:, 0], labels) + \
        0.5 * torch.nn.functional.cross_entropy(logits[:, 1], labels)
    assert torch.isclose(plain, expected)
    with_kd = multi_exit_loss(logits, labels, torch.tensor([0.5, 0.5]), 1.0, 2.0)
    assert with_kd > plain  # the early head disagrees with the final one: distillation adds a positive term
    same = torch.tensor([[[3.0, 0.0], [3.0, 0.0]]])
    assert torch.isclose(multi_exit_loss(same, labels, torch.tensor([0.5, 0.5]), 1.0, 2.0),
                         multi_exit_loss(same, labels, torch.tensor([0.5, 0.5]), 0.0, 2.0), atol=1e-6)


def test_presets_and_bad_settings():
    assert train_config_from_preset("paper").train_limit is None
    with pytest.raises(ValueError, match="unknown preset"):
        train_config_from_preset("huge")
    with pytest.raises(ValueError, match="variant"):
        train_config_from_preset("smoke", variant="tiny")
    with pytest.raises(ValueError, match="unknown training setting"):
        train_config_from_preset("smoke", learning_rat=1e-3)
    with pytest.raises(ValueError, match="exit_pooling: expected one of cls, mean, pair"):
        train_config_from_preset("smoke", exit_pooling="max")
    with pytest.raises(ValueError, match="exit_pooling: only EAT"):
        train_config_from_preset("smoke", variant="static", exit_pooling="mean")


def test_interrupted_run_resumes_and_finished_run_is_kept(tmp_path, tiny_backbone, data_dir, monkeypatch):
    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    config = train_config_from_preset("smoke", model=tiny_backbone, train_limit=96, batch_size=16, epochs=2.0)
    out = tmp_path / "run"
    partial = train(config, out, stop_after_steps=5)
    assert partial.steps == 5 and (out / "checkpoint-last" / "trainer_state.json").is_file()
    assert not (out / "train_summary.json").exists()
    resumed = train(config, out)
    assert resumed.resumed_from_step == 5 and resumed.steps == 12  # 96 rows / 16 = 6 steps x 2 epochs
    assert not (out / "checkpoint-last").exists() and (out / "model" / "model.safetensors").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    before = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(RunFinishedError, match="finished run"):
        train(config, out)
    assert (out / "model" / "model.safetensors").read_bytes() == before
    assert json.loads((out / "train_summary.json").read_text()) == summary
    other = train_config_from_preset("smoke", model=tiny_backbone, train_limit=96, batch_size=8)
    partial_dir = tmp_path / "other"
    train(other, partial_dir, stop_after_steps=2)
    with pytest.raises(RunFinishedError, match="other settings"):
        train(config, partial_dir)


def test_refused_run_leaves_nothing_behind_and_force_starts_over(tmp_path, tiny_backbone, data_dir, monkeypatch):
    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    from eat.checkpoints import CheckpointError

    missing = train_config_from_preset("smoke", model=tiny_backbone, train_limit=32, variant="static",
                                       init_from=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(missing, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # no train_config.json of a run that never started
    config = train_config_from_preset("smoke", model=tiny_backbone, train_limit=32, batch_size=16, variant="static")
    out = tmp_path / "run"
    train(config, out)
    before = (out / "model" / "model.safetensors").read_bytes()
    summary = (out / "train_summary.json").read_text()
    with pytest.raises(CheckpointError, match="no such checkpoint"):  # --force, but the replacement cannot load
        train(missing, out, force=True)
    assert (out / "model" / "model.safetensors").read_bytes() == before
    assert (out / "train_summary.json").read_text() == summary
    assert json.loads((out / "train_config.json").read_text())["init_from"] is None
    no_teacher = train_config_from_preset("smoke", model=tiny_backbone, train_limit=32, variant="eat",
                                          teacher=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--teacher"):  # nor when the teacher cannot load
        train(no_teacher, out, force=True)
    assert (out / "model" / "model.safetensors").read_bytes() == before
    # an interrupted run with other settings: refused without --force, started over (not resumed) with it
    other = train_config_from_preset("smoke", model=tiny_backbone, train_limit=32, batch_size=8, variant="static")
    train(other, tmp_path / "partial", stop_after_steps=1)
    with pytest.raises(RunFinishedError, match="other settings"):
        train(config, tmp_path / "partial")
    restarted = train(config, tmp_path / "partial", force=True)
    assert restarted.resumed_from_step == 0 and restarted.steps == 2
    assert json.loads((tmp_path / "partial" / "train_config.json").read_text())["batch_size"] == 16


def test_resumed_training_matches_uninterrupted(tmp_path, tiny_backbone, data_dir, monkeypatch):
    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    config = train_config_from_preset("smoke", model=tiny_backbone, train_limit=64, batch_size=16, epochs=1.0,
                                      variant="static")
    straight = train(config, tmp_path / "a")
    train(config, tmp_path / "b", stop_after_steps=2)
    resumed = train(config, tmp_path / "b")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert straight.steps == resumed.steps == 4
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_half_variant_is_half_depth(tmp_path, backbone_path, data_dir, monkeypatch):
    from eat.training import build_model

    config = train_config_from_preset("smoke", variant="half")
    model = build_model(config, ("negative", "positive"))
    assert model.config.num_hidden_layers == 3 and len(model.exit_heads) == 0


@pytest.mark.parametrize("pooling", ["cls", "mean", "pair"])
def test_two_stage_heads_on_a_frozen_static_model(tmp_path, tiny_backbone, data_dir, monkeypatch, pooling):
    """--init-from a static run + --freeze-backbone: the backbone and final head stay bit-identical, the exit
    heads learn (their loss falls), and an EAT with exits off is exactly the static model. With mean-pooled heads
    the features computed once are the mean of the real tokens: the trained heads score the same rows alike."""
    from safetensors.torch import load_file

    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    static = train_config_from_preset("smoke", model=tiny_backbone, train_limit=96, variant="static")
    train(static, tmp_path / "static")
    losses = []
    heads = train_config_from_preset("smoke", model=tiny_backbone, train_limit=96, variant="eat", epochs=20.0,
                                     learning_rate=3e-3, init_from=str(tmp_path / "static"), freeze_backbone=True,
                                     exit_pooling=pooling)
    result = train(heads, tmp_path / "heads", progress=lambda p: losses.append(p["loss"]))
    before = load_file(tmp_path / "static" / "model" / "model.safetensors")
    after = load_file(tmp_path / "heads" / "model" / "model.safetensors")
    assert set(before) < set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert any(k.startswith("exit_heads.") for k in after)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    static_summary = json.loads((tmp_path / "static" / "train_summary.json").read_text())
    assert result.dev_accuracy == static_summary["dev_accuracy"]  # exits off: the same model
    # the features the heads were fitted on are what the model's own heads read at inference (padded batch)
    from transformers import AutoTokenizer

    from eat.checkpoints import load_classifier
    from eat.data import batches, encode
    from eat.training import _frozen_features, config_task, training_data

    model = load_classifier(str(tmp_path / "heads" / "model"))
    assert model.config.exit_pooling == pooling
    rows, _, _ = training_data(heads)
    encoded = encode(rows.subset(8), AutoTokenizer.from_pretrained(tiny_backbone), 48)
    features, _, _, layers = _frozen_features(model, encoded, config_task(heads).runner(), "cpu", 0)
    batch = next(iter(batches(encoded, 64, bucket=True)))  # one batch: the features' row order
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], output_exit_logits=True,
                    disable_exit=True)
        from_features = torch.stack([model.exit_heads[str(layer)](features[:, slot])
                                     for slot, layer in enumerate(layers)], dim=1)
    assert len(features) == len(batch["index"]) == 8
    assert torch.allclose(out.exit_logits[:, :len(layers)], from_features, atol=1e-5)
    with pytest.raises(ValueError, match="freeze_backbone"):
        train_config_from_preset("smoke", freeze_backbone=True)
    # starting from a run that held out another calibration slice would tune on rows it trained on: refused
    from eat.training import build_model

    for other in (dict(calibration_rows=16), dict(seed=7), dict(calibration_unit="sentence")):
        moved = train_config_from_preset("smoke", model=tiny_backbone, variant="eat", init_from=str(tmp_path / "static"),
                                         **other)
        with pytest.raises(ValueError, match="another calibration slice"):
            build_model(moved, ("negative", "positive"))
    # from an EAT run whose heads read another pooling: its backbone and final head, fresh heads of the new pooling
    # (copies of the final head; its own heads, of another width for pair, are not loaded)
    other_pooling = "cls" if pooling == "mean" else "mean"
    reheaded = build_model(train_config_from_preset("smoke", model=tiny_backbone, train_limit=96, variant="eat",
                                                    init_from=str(tmp_path / "heads"), exit_pooling=other_pooling),
                           ("negative", "positive"))
    assert reheaded.config.exit_pooling == other_pooling and set(reheaded.exit_heads) == set(model.exit_heads)
    fresh = reheaded.state_dict()
    assert all(torch.equal(before[k], fresh[k]) for k in before)  # backbone and final head as trained
    first = next(iter(reheaded.exit_heads))
    assert torch.equal(fresh[f"exit_heads.{first}.classifier.weight"], before["classifier.weight"])
    assert not torch.equal(fresh[f"exit_heads.{first}.classifier.weight"], after[f"exit_heads.{first}.classifier.weight"])
    # ... while a backbone folder (no train_config.json: it never saw this task) is fine
    assert build_model(train_config_from_preset("smoke", variant="eat", init_from=tiny_backbone),
                       ("negative", "positive")).exit_heads
    # a static or half-depth model trained further starts from the static run's weights (it used to start from
    # the backbone, silently); from an EAT run, or from another calibration slice, it is refused
    for variant in ("static", "half"):
        further = build_model(train_config_from_preset("smoke", model=tiny_backbone, train_limit=96, variant=variant,
                                                       init_from=str(tmp_path / "static")), ("negative", "positive"))
        weights = further.state_dict()
        kept = [k for k in before if k in weights]
        assert "classifier.weight" in kept and all(torch.equal(before[k], weights[k]) for k in kept)
        with pytest.raises(ValueError, match="an EAT run with exit heads"):
            build_model(train_config_from_preset("smoke", model=tiny_backbone, train_limit=96, variant=variant,
                                                 init_from=str(tmp_path / "heads")), ("negative", "positive"))
        with pytest.raises(ValueError, match="another calibration slice"):
            build_model(train_config_from_preset("smoke", model=tiny_backbone, variant=variant, seed=7,
                                                 init_from=str(tmp_path / "static")), ("negative", "positive"))


def test_exit_heads_can_train_at_their_own_learning_rate(tiny_backbone):
    """--head-lr: the exit heads get their own AdamW groups at that rate (decay rules kept); without it the
    optimizer has the two groups interrupted runs saved, so they still resume."""
    from eat.training import build_model, parameter_groups

    config = train_config_from_preset("smoke", model=tiny_backbone, variant="eat", learning_rate=2e-5,
                                      head_learning_rate=4e-4)
    model = build_model(config, ("negative", "positive"))
    groups = parameter_groups(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        heads = {names[id(p)].startswith("exit_heads.") for p in group["params"]}
        assert len(heads) == 1 and group["lr"] == (4e-4 if heads.pop() else 2e-5)
        assert all(names[id(p)].endswith(("bias", "LayerNorm.weight")) == (group["weight_decay"] == 0.0)
                   for p in group["params"])
    assert len(groups) == 4 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = train_config_from_preset("smoke", model=tiny_backbone, variant="eat")
    assert len(parameter_groups(model, plain)) == 2
    with pytest.raises(ValueError, match="head_learning_rate"):
        train_config_from_preset("smoke", head_learning_rate=0.0)


def test_optimizer_schedule_settings_are_checked_and_clipping_can_be_turned_off(tmp_path, tiny_backbone, data_dir,
                                                                                 monkeypatch):
    """--warmup-ratio, --weight-decay, --max-grad-norm (0 = no clipping: a plain fine-tuning script's schedule)."""
    for bad in (dict(warmup_ratio=1.0), dict(warmup_ratio=-0.1), dict(weight_decay=-1.0), dict(max_grad_norm=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            train_config_from_preset("smoke", **bad)
    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clipped.append(1) or clip(*a, **k))
    for norm, expected_calls in ((0.0, 0), (1.0, 4)):
        clipped.clear()
        config = train_config_from_preset("smoke", model=tiny_backbone, variant="static", train_limit=64,
                                          batch_size=16, warmup_ratio=0.0, max_grad_norm=norm)
        summary = train(config, tmp_path / f"norm{norm}")
        assert summary.steps == 4 and len(clipped) == expected_calls


def test_distillation_from_a_fixed_teacher_reaches_the_last_exit_too():
    """With teacher_logits every exit, the last one included, is pulled toward the teacher; without, the last
    head is the (detached) teacher of the earlier ones and gets no distillation gradient."""
    labels = torch.tensor([0])
    weights = torch.tensor([0.5, 0.5])
    logits = torch.tensor([[[2.0, 0.0], [3.0, 0.0]]], requires_grad=True)  # (B=1, E=2, C=2)
    ce_only = multi_exit_loss(logits, labels, weights, 0.0, 2.0)
    ce_grad = torch.autograd.grad(ce_only, logits)[0]
    self_kd = torch.autograd.grad(multi_exit_loss(logits, labels, weights, 1.0, 2.0), logits)[0]
    assert torch.equal(self_kd[:, 1], ce_grad[:, 1]) and not torch.equal(self_kd[:, 0], ce_grad[:, 0])
    teacher = torch.tensor([[0.0, 1.0]])  # disagrees with both exits
    with_teacher = multi_exit_loss(logits, labels, weights, 1.0, 2.0, teacher_logits=teacher)
    grad = torch.autograd.grad(with_teacher, logits)[0]
    assert with_teacher > ce_only and not torch.equal(grad[:, 1], ce_grad[:, 1])
    assert bool((grad[..., 1] < ce_grad[..., 1]).all())  # descent raises class 1, the teacher's choice, everywhere
    same = torch.tensor([[[3.0, 0.0], [3.0, 0.0]]])  # a teacher equal to both exits' logits adds nothing
    assert torch.isclose(multi_exit_loss(same, labels, weights, 1.0, 2.0, teacher_logits=same[:, 1]),
                         multi_exit_loss(same, labels, weights, 0.0, 2.0), atol=1e-6)


def test_training_with_a_teacher_run(tmp_path, tiny_backbone, data_dir, monkeypatch):
    """--teacher RUN: the fixed teacher runs once per batch, in eval mode, without gradients, and stays unchanged;
    a teacher that held out another calibration slice, a non-EAT variant or a missing run are refused."""
    from safetensors.torch import load_file

    import eat.training as training

    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    static = train_config_from_preset("smoke", model=tiny_backbone, train_limit=64, batch_size=16, variant="static")
    train(static, tmp_path / "static")
    teacher_bytes = (tmp_path / "static" / "model" / "model.safetensors").read_bytes()
    calls = []
    load_teacher = training.load_teacher

    def counting_teacher(*args, **kwargs):
        teacher = load_teacher(*args, **kwargs)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        teacher.register_forward_hook(lambda module, inputs, output: calls.append(torch.is_grad_enabled()))
        return teacher

    monkeypatch.setattr(training, "load_teacher", counting_teacher)
    config = train_config_from_preset("smoke", model=tiny_backbone, train_limit=64, batch_size=16, variant="eat",
                                      init_from=str(tmp_path / "static"), teacher=str(tmp_path / "static"))
    result = train(config, tmp_path / "eat")
    assert result.steps == 4 and calls == [False] * 4
    assert json.loads((tmp_path / "eat" / "train_config.json").read_text())["teacher"] == str(tmp_path / "static")
    before = load_file(tmp_path / "static" / "model" / "model.safetensors")
    after = load_file(tmp_path / "eat" / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student moved, the teacher did not
    assert (tmp_path / "static" / "model" / "model.safetensors").read_bytes() == teacher_bytes
    with pytest.raises(ValueError, match="teacher"):
        train_config_from_preset("smoke", variant="static", teacher=str(tmp_path / "static"))
    with pytest.raises(ValueError, match="teacher"):
        train_config_from_preset("smoke", teacher=str(tmp_path / "static"), distill_weight=0.0)
    moved = train_config_from_preset("smoke", model=tiny_backbone, train_limit=64, calibration_rows=16,
                                     teacher=str(tmp_path / "static"))
    with pytest.raises(ValueError, match="--teacher .*another calibration slice"):
        train(moved, tmp_path / "moved")
    missing = train_config_from_preset("smoke", model=tiny_backbone, train_limit=64, teacher=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no model there"):
        train(missing, tmp_path / "missing")


def test_a_calibration_slice_capped_at_a_tenth_says_so(tmp_path, caplog):
    """--calibration-rows asks for more than 10% of a table: the slice is 10% and a warning gives both numbers."""
    from eat.training import TrainConfig, training_data

    table = tmp_path / "rows.csv"
    table.write_text("text,label\n" + "".join(f"sentence number {i},{i % 2}\n" for i in range(200)))
    config = TrainConfig(task="mine", data_file=str(table), eval_file=str(table), calibration_rows=50)
    with caplog.at_level("WARNING", logger="eat.training"):
        train_rows, calibration, _ = training_data(config)
    assert (len(train_rows), len(calibration)) == (180, 20)
    assert "held out 20 calibration rows, not 50: at most 10% of the 200 training rows" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="eat.training"):
        training_data(TrainConfig(task="mine", data_file=str(table), eval_file=str(table), calibration_rows=20))
    assert "calibration rows" not in caplog.text


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, tiny_backbone, data_dir, monkeypatch, caplog):
    monkeypatch.setenv("EAT_DATA_DIR", str(data_dir))
    import eat.training as training

    config = train_config_from_preset("smoke", model=tiny_backbone, train_limit=16, batch_size=16, variant="static",
                                      bf16="on")
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="eat.training"):
        train(config, tmp_path / "emulated")
    assert "no native bf16" in caplog.text
    caplog.clear()
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="eat.training"):
        train(config, tmp_path / "native")
    assert "no native bf16" not in caplog.text
