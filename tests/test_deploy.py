"""eat.deploy: the inference loader, int8 and bf16 models (tiny random configs, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from eat.deploy import InferenceModel, PrecisionError, load_for_inference
from eat.deploy.quantize import quantize_int8
from eat.evaluation import exits_at_threshold
from eat.modeling_eat import EATForTokenClassification

from .conftest import mixed_batch, tiny_config, tiny_model


def _saved(tmp_path, token: bool = False, **knobs):
    """A tiny model with spread-out logits (initializer 0.3) and trained-looking exit heads, saved to tmp_path."""
    torch.manual_seed(0)
    config = tiny_config(initializer_range=0.3, exit_layers="all", **knobs)
    model = (EATForTokenClassification if token else type(tiny_model()))(config).eval()
    folder = tmp_path / ("tagger" if token else "model")
    model.save_pretrained(folder)
    return folder, model


def _quantized_linears(model: nn.Module) -> tuple[int, int]:
    float_linears = sum(type(m) is nn.Linear for m in model.modules())
    int8 = sum(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in model.modules())
    return float_linears, int8


def test_int8_quantizes_every_linear_and_fuses_qkv(tmp_path):
    folder, _ = _saved(tmp_path)
    loaded = load_for_inference(folder, precision="int8")
    assert isinstance(loaded, InferenceModel) and loaded.name == "torch-int8"
    float_linears, int8 = _quantized_linears(loaded.model)
    assert float_linears == 0 and int8 > 0  # exit heads, pooler, classifier, every layer's linears
    for layer in loaded.model.bert.encoder.layer:
        fused = layer.attention.self.fused_qkv
        assert fused is not None and "quantized" in type(fused).__module__ and fused.out_features == 3 * 32


def test_int8_close_to_fp32_and_exits_on_its_own_outputs(tmp_path):
    folder, _ = _saved(tmp_path)
    knobs = {"exit_policy": "confidence", "exit_threshold": 0.6, "keep_ratio": [0.9, 0.6]}
    fp32 = load_for_inference(folder, knobs=knobs)
    int8 = load_for_inference(folder, knobs=knobs, precision="int8")
    ids, mask = mixed_batch()
    full_fp32 = fp32(ids, mask, disable_exit=True)
    full_int8 = int8(ids, mask, disable_exit=True)
    scale = full_fp32.logits.abs().max()
    assert (full_int8.logits - full_fp32.logits).abs().max() < 0.3 * scale  # int8 noise, not another model
    assert not torch.equal(full_int8.logits, full_fp32.logits)  # it really runs int8
    # the exit rule reads the int8 heads: replaying the threshold on int8's own per-exit logits (a row never
    # depends on other rows or on exits, pruning included) gives the exits the int8 model took
    cached = int8(ids, mask, disable_exit=True, output_exit_logits=True)
    out = int8(ids, mask)
    _, layers = exits_at_threshold(cached.exit_logits.numpy(), cached.exit_layers, "confidence", 0.6)
    assert out.exit_layer.tolist() == layers.tolist()


def test_int8_window_and_merge_run(tmp_path):
    folder, _ = _saved(tmp_path)
    model = load_for_inference(folder, precision="int8", knobs={"attention_window": 4, "keep_ratio": 0.7,
                                                                "prune_mode": "merge"})
    out = model(*mixed_batch())
    assert out.logits.shape == (5, 3) and torch.isfinite(out.logits).all()


def test_int8_token_model(tmp_path):
    folder, eager = _saved(tmp_path, token=True)
    model = load_for_inference(folder, precision="int8", token_level=True,
                               knobs={"exit_policy": "confidence", "exit_threshold": 0.9})
    ids, mask = mixed_batch()
    out = model(ids, mask)
    assert out.logits.shape == (5, ids.shape[1], 3) and out.token_exit_layer.shape == ids.shape
    assert _quantized_linears(model.model)[0] == 0


def test_quantize_int8_leaves_the_input_model_alone():
    model = tiny_model()
    quantize_int8(model)
    assert model.bert.encoder.layer[0].attention.self.fused_qkv is None
    assert type(model.classifier) is nn.Linear


def test_tuned_file_and_knobs_override(tmp_path):
    folder, _ = _saved(tmp_path)
    tuned = tmp_path / "tuned_sst2.json"
    tuned.write_text(json.dumps({"knobs": {"exit_policy": "confidence", "exit_threshold": 0.7, "keep_ratio": 0.8}}))
    model = load_for_inference(folder, tuned=tuned, knobs={"exit_threshold": 0.95})
    assert model.config.exit_threshold == 0.95 and model.config.keep_ratio == 0.8
    assert model.tokenizer is None  # none saved with this tiny model


def test_bad_arguments_get_clear_errors(tmp_path):
    folder, _ = _saved(tmp_path)
    with pytest.raises(PrecisionError, match="fp16"):
        load_for_inference(folder, precision="fp16")
    with pytest.raises(ValueError, match="backend 'tensorrt'"):
        load_for_inference(folder, backend="tensorrt")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_for_inference(folder, tuned=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="no 'knobs'"):
        load_for_inference(folder, tuned=bad)


def test_bf16_where_native(tmp_path, monkeypatch):
    folder, _ = _saved(tmp_path)
    import eat.training

    monkeypatch.setattr(eat.training, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(PrecisionError, match="native bf16"):
        load_for_inference(folder, precision="bf16")
    monkeypatch.setattr(eat.training, "cpu_has_native_bf16", lambda: True)
    model = load_for_inference(folder, precision="bf16", knobs={"attention_window": 4, "keep_ratio": 0.7})
    out = model(*mixed_batch())
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
