"""Token classification models on ONNX Runtime and in int8: segment parity with eager PyTorch, identical token
exits, int8 end to end, clear errors (issue #24 D4)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from eat.deploy import load_for_inference  # noqa: E402
from eat.deploy.onnx_export import ExportError, export_segments, read_manifest  # noqa: E402
from eat.deploy.onnx_runtime import OrtTokenClassifier, build_ort_model  # noqa: E402
from eat.modeling_eat import EATForTokenClassification, EATLayer  # noqa: E402

from .conftest import assert_window_refused, mixed_batch, tiny_config  # noqa: E402
from .test_token_model import word_mask_for  # noqa: E402

LENGTHS = (22, 9, 15, 5, 30, 12)  # padded, longer than the export's 7-token example


def tagger(seed: int = 0, **knobs) -> EATForTokenClassification:
    """A tiny random tagger with spread-out logits and LayerNorm gains drawn at random: with the untrained gain
    of 1 every hidden state has the same norm up to rounding, and norm pruning would decide on noise."""
    torch.manual_seed(seed)
    model = EATForTokenClassification(tiny_config(num_labels=5, exit_layers="all", initializer_range=0.3,
                                                  **knobs)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager tagger, export folder with fp32 and int8 token segments)."""
    model = tagger()
    folder = tmp_path_factory.mktemp("onnx-token") / "export"
    export_segments(model, folder, precisions=("fp32", "int8"))
    return model, folder


def _median_tau(model, ids, mask, words) -> float:
    """A confidence threshold that lets about half the labelled tokens leave at the first head, in the widest
    gap between the confidences of any head near there: no token sits on the edge, where the 1e-7 differences
    between backends would decide."""
    with torch.no_grad():
        cached = model(ids, mask, word_mask=words, output_exit_logits=True, disable_exit=True)
    confidence = cached.exit_logits.softmax(-1).amax(-1)  # (B, E, n)
    every = confidence.transpose(1, 2)[words].flatten().sort().values
    middle = int((every < confidence[:, 0][words].median()).sum())
    low, high = max(middle - 5, 0), min(middle + 5, len(every) - 1)
    gaps = every[low + 1:high + 1] - every[low:high]
    best = low + int(gaps.argmax())
    return float((every[best] + every[best + 1]) / 2)


def test_manifest_names_the_token_segments(exported):
    _, folder = exported
    manifest = read_manifest(folder)
    assert manifest["model"] == "token" and manifest["precisions"] == ["fp32", "int8"]
    fp32 = manifest["segments"]["fp32"]
    assert len(fp32["layers"]) == len(fp32["query_layers"]) == 4 and sorted(fp32["exit_heads"]) == ["1", "2", "3"]
    assert manifest["segments"]["int8"]["query_layers"][0] == "int8/query_layer_1.onnx"
    assert isinstance(build_ort_model(folder), OrtTokenClassifier)


def test_every_fp32_token_segment_matches_eager(exported):
    model, folder = exported
    ort = build_ort_model(folder)
    ids, mask = mixed_batch(lengths=LENGTHS)
    real = mask.bool()
    types = (torch.arange(ids.shape[1]) > 5).long().expand_as(ids) * mask
    with torch.no_grad():
        hidden = model.bert.embeddings(ids, types)  # (B, n, d)
        assert (ort.bert.embeddings(ids, types) - hidden).abs().max() < 1e-4
        state = model.bert._initial_state(ids, mask, (1.0,))
        ctx = state.attention_context(model.config)
        generator = torch.Generator().manual_seed(1)
        for eager_layer, ort_layer in zip(model.bert.encoder.layer, ort.bert.encoder.layer):
            want = eager_layer(hidden, ctx)[0]
            got, q_cls, k, _ = ort_layer(hidden, ctx)
            assert (got - want)[real].abs().max() < 1e-4 and q_cls is None and k is None
            # compacted queries: 4 of the tokens as queries over 10 keys, some keys padding
            queries, keys = hidden[:, 3:7], hidden[:, :10]
            key_mask = torch.rand(len(LENGTHS), 10, generator=generator) > 0.3
            key_mask[:, 0] = True
            for kv_mask in (None, key_mask[:, None, None, :]):
                expected = eager_layer.forward_queries(queries, keys, kv_mask)
                assert (ort_layer.forward_queries(queries, keys, kv_mask) - expected).abs().max() < 1e-4
            hidden = want
        states = torch.randn(3, 11, 32)
        for layer, head in model.exit_heads.items():
            assert (ort.exit_heads[layer](states) - head(states)).abs().max() < 1e-4
        assert (ort.classifier(states) - model.classifier(states)).abs().max() < 1e-4


@pytest.mark.parametrize("knobs", [
    {},
    {"token_exit_kv": "drop"},
    {"token_exit_window": 1},
    {"exit_policy": "agreement", "exit_patience": 2},
    {"keep_ratio": [1.0, 0.6, 0.8, 1.0]},
    {"token_exit_kv": "drop", "keep_ratio": 0.5},
])
def test_predictions_and_token_exit_layers_equal_eager(exported, knobs):
    model, folder = exported
    defaults = {"exit_policy": "confidence", "token_exit_kv": "keep", "token_exit_window": 0, "keep_ratio": 1.0,
                "exit_patience": 2}
    compacted = 0
    original = EATLayer.forward_queries

    def counted(layer, *args, **kwargs):
        nonlocal compacted
        compacted += 1
        return original(layer, *args, **kwargs)

    try:
        for seed in range(3):
            ids, mask = mixed_batch(seed, lengths=LENGTHS)
            words = word_mask_for(mask, seed)
            model.config.set_knobs(**{**defaults, **knobs, "exit_policy": "none"})
            tau = _median_tau(model, ids, mask, words)
            settings = {**defaults, **knobs, "exit_threshold": tau}
            model.config.set_knobs(**settings)
            ort = build_ort_model(folder, knobs=settings)
            EATLayer.forward_queries = counted
            with torch.no_grad():
                want = model(ids, mask, word_mask=words)
            EATLayer.forward_queries = original
            got = ort(ids, mask, word_mask=words)
            real = mask.bool()
            assert torch.equal(got.token_exit_layer, want.token_exit_layer)
            assert torch.equal(got.logits[real].argmax(-1), want.logits[real].argmax(-1))
            assert torch.equal(got.tokens_per_layer, want.tokens_per_layer)
            assert got.work == want.work
            assert (got.logits - want.logits)[real].nan_to_num(0.0).abs().max() < 1e-4
            assert int(want.token_exit_layer[words].min()) < 4  # tokens really left early
    finally:
        EATLayer.forward_queries = original
        model.config.set_knobs(**{**defaults, "exit_policy": "none"})
    assert compacted > 0  # the compacted-query segments ran


def test_int8_token_segments_run_and_stay_close(exported):
    _, folder = exported
    ids, mask = mixed_batch(lengths=LENGTHS)
    words = word_mask_for(mask)
    knobs = {"exit_policy": "confidence", "exit_threshold": 0.5, "keep_ratio": 0.7}
    loaded = load_for_inference(folder, backend="onnxruntime", precision="int8", knobs=knobs)
    assert loaded.token_level and loaded.name == "ort-int8"
    # every head on every token (no exit decides which head a label comes from): int8 noise, not another model
    fp32 = build_ort_model(folder, knobs=knobs)(ids, mask, word_mask=words, disable_exit=True)
    full = loaded(ids, mask, word_mask=words, disable_exit=True)
    assert not torch.equal(full.logits[words], fp32.logits[words])  # really int8
    assert (full.logits[words] - fp32.logits[words]).abs().max() < 0.3 * fp32.logits[words].abs().max()
    # and end to end with token exits and pruning
    out = loaded(ids, mask, word_mask=words)
    assert out.logits.shape == fp32.logits.shape and torch.isfinite(out.logits[words]).all()
    assert int(out.token_exit_layer[words].min()) < 4 and (out.token_exit_layer[words] > 0).all()  # none pruned


def test_torch_int8_token_model_quantizes_heads_and_runs_compacted_queries(tmp_path):
    model = tagger()
    model.save_pretrained(tmp_path / "tagger")
    ids, mask = mixed_batch(lengths=LENGTHS)
    words = word_mask_for(mask)
    tau = _median_tau(model, ids, mask, words)
    loaded = load_for_inference(tmp_path / "tagger", precision="int8", knobs={"exit_policy": "confidence",
                                                                              "exit_threshold": tau})
    int8 = loaded.model
    assert loaded.token_level and all("quantized" in type(head.classifier).__module__
                                      for head in int8.exit_heads.values())
    assert all("quantized" in type(layer.attention.self.fused_qkv).__module__ for layer in int8.bert.encoder.layer)
    seen = []
    original = EATLayer.forward_queries

    def spy(layer, queries, keys_values, mask=None):
        seen.append(queries.shape[1])
        return original(layer, queries, keys_values, mask)

    EATLayer.forward_queries = spy
    try:
        out = loaded(ids, mask, word_mask=words)
    finally:
        EATLayer.forward_queries = original
    assert seen and torch.isfinite(out.logits[words]).all()  # the quantized Q/K/V of forward_queries ran
    assert int(out.token_exit_layer[words].min()) < 4


def test_loader_exports_a_token_checkpoint(tmp_path):
    model = tagger(seed=2)
    model.save_pretrained(tmp_path / "tagger")
    loaded = load_for_inference(tmp_path / "tagger", backend="onnxruntime",
                                knobs={"exit_policy": "confidence", "exit_threshold": 0.6})
    assert isinstance(loaded.model, OrtTokenClassifier) and loaded.token_level
    manifest = json.loads((loaded.model.export_dir / "manifest.json").read_text())
    assert manifest["model"] == "token" and manifest["source"].endswith("tagger")
    ids, mask = mixed_batch(lengths=LENGTHS)
    out = loaded(ids, mask)
    assert out.logits.shape == (len(LENGTHS), ids.shape[1], 5) and out.token_exit_layer.shape == ids.shape
    with pytest.raises(ExportError, match="holds a token classification model"):
        load_for_inference(loaded.model.export_dir, backend="onnxruntime", token_level=False)


def test_token_errors_stay_clear(exported, tmp_path, monkeypatch):
    import shutil

    model, folder = exported
    assert_window_refused(model, folder, tmp_path)
    # prune_importance is a sentence-model knob: a token model prunes by norm, so it exports with any value
    build_ort_model(folder, knobs={"prune_importance": "mean_attention", "keep_ratio": 0.7})
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / "int8" / "query_layer_3.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportError, match=r"query_layer_3\.onnx: does not match the checksum"):
        build_ort_model(copy, precision="int8")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"pip install 'eat\[onnx\]'"):
        load_for_inference(folder, backend="onnxruntime")


def test_eat_export_cli_takes_a_token_run(tmp_path):
    from typer.testing import CliRunner

    from eat.cli import app

    tagger(seed=1).save_pretrained(tmp_path / "run" / "model")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"] == "token"
