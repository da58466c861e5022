"""ONNX segments and the ONNX Runtime backend: parity with eager PyTorch, exits, pruning, clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

from eat.deploy import load_for_inference  # noqa: E402
from eat.deploy.onnx_export import ExportError, export_segments, read_manifest  # noqa: E402
from eat.deploy.onnx_runtime import build_ort_model  # noqa: E402
from eat.modeling_eat import EATForSequenceClassification  # noqa: E402

from .conftest import assert_window_refused, mixed_batch, tiny_config  # noqa: E402

EXITING = {"exit_policy": "confidence", "exit_threshold": 0.6, "keep_ratio": [0.9, 0.6]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager model, export folder with fp32 and int8 segments) of a tiny model with spread-out logits."""
    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(initializer_range=0.3, exit_layers="all")).eval()
    folder = tmp_path_factory.mktemp("onnx") / "export"
    export_segments(model, folder, precisions=("fp32", "int8"))
    return model, folder


def _state(model, ids, mask):
    state = model.bert._initial_state(ids, mask, model.config.keep_schedule)
    return state, state.attention_context(model.config)


def test_every_fp32_segment_matches_eager(exported):
    model, folder = exported
    ort = build_ort_model(folder, knobs={"keep_ratio": 0.5}, whole_graph=False)  # q and k fetched: pruning after 1-3
    ids, mask = mixed_batch(lengths=(17, 9, 30, 4))  # padded; longer than the export's example (7 tokens)
    types = (torch.arange(ids.shape[1]) > 5).long().expand_as(ids) * mask
    ort(ids, mask)  # a call tells the layers where pruning follows (the plan of these knobs)
    with torch.no_grad():
        hidden = model.bert.embeddings(ids, types)
        assert (ort.bert.embeddings(ids, types) - hidden).abs().max() < 1e-4
        state, ctx = _state(model, ids, mask)
        for eager_layer, ort_layer in zip(model.bert.encoder.layer, ort.bert.encoder.layer):
            want, q, k, _ = eager_layer(hidden, ctx)
            got, q_cls, k_ort, _ = ort_layer(hidden, ctx)
            real = mask.bool()
            assert (got - want)[real].abs().max() < 1e-4  # padding rows are never read
            if ort_layer.number == 4:  # no pruning after the last layer: q and k not fetched
                assert q_cls is None and k_ort is None
                continue
            assert (q_cls - q[:, :, :1]).abs().max() < 1e-4 and (k_ort - k).abs().max() < 1e-4
            hidden = want
        # without pruning after a layer its q and k are not fetched from the session
        ort.config.set_knobs(keep_ratio=1.0)
        ort(ids, mask)
        got, q_cls, k_ort, _ = ort.bert.encoder.layer[0](hidden, ctx)
        assert q_cls is None and k_ort is None and got.shape == hidden.shape
        pooled = torch.randn(6, 32)
        for layer, head in model.exit_heads.items():
            assert (ort.exit_heads[layer](pooled) - head(pooled)).abs().max() < 1e-4
        final = model.classifier(model.bert.pooler(pooled))
        assert (ort.bert.pooler(pooled) - final).abs().max() < 1e-4


@pytest.mark.parametrize("knobs", [{}, EXITING, {**EXITING, "prune_mode": "merge"},
                                   {**EXITING, "exit_policy": "agreement"},
                                   # exit_depth caps: rows still running after layer 3 (2) leave with its head
                                   {**EXITING, "exit_depth": 3}, {"exit_policy": "none", "exit_depth": 2},
                                   {"exit_policy": "none", "exit_depth": 3, "keep_ratio": [0.9, 0.6]}])
# (norm importance: untrained LayerNorms give every token the same norm, so 1e-6 decides its ties; the segments
# are tested without it)
def test_predictions_and_exit_layers_equal_eager(exported, knobs):
    model, folder = exported
    model.config.set_knobs(**{**{"exit_policy": "none", "keep_ratio": 1.0, "prune_mode": "drop",
                                 "prune_importance": "cls_attention", "exit_depth": None}, **knobs})
    ort = build_ort_model(folder, knobs=knobs)
    for seed in range(3):
        ids, mask = mixed_batch(seed, lengths=(17, 9, 30, 4, 12, 23, 6))
        with torch.no_grad():
            want, got = model(ids, mask), ort(ids, mask)
        assert torch.equal(got.logits.argmax(-1), want.logits.argmax(-1))
        assert torch.equal(got.exit_layer, want.exit_layer)
        assert torch.equal(got.tokens_per_layer, want.tokens_per_layer)
        assert (got.logits - want.logits).abs().max() < 1e-4
        depth = knobs.get("exit_depth")
        if depth is not None:  # nothing ran after the cap: no row, token or layer counted past it
            assert int(got.exit_layer.max()) <= depth and int(got.tokens_per_layer[:, depth:].sum()) == 0
            assert got.work == want.work and got.work.layers_run <= depth * len(ids)
            if knobs["exit_policy"] == "none":  # a pure truncation: every row leaves at the cap
                assert bool((got.exit_layer == depth).all())
    model.config.set_knobs(exit_policy="none", keep_ratio=1.0, prune_mode="drop", prune_importance="cls_attention",
                           exit_depth=None)


def test_batch_of_one_and_rows_leaving(exported):
    model, folder = exported
    ort = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.0})  # all leave at head 1
    out = ort(*mixed_batch(lengths=(5,)))
    assert out.exit_layer.tolist() == [1] and out.tokens_per_layer[0, 1:].sum() == 0


def test_int8_segments_run_and_stay_close(exported):
    model, folder = exported
    ids, mask = mixed_batch()
    fp32 = build_ort_model(folder)(ids, mask).logits
    int8 = build_ort_model(folder, precision="int8")(ids, mask).logits
    assert not torch.equal(fp32, int8) and (fp32 - int8).abs().max() < 0.3 * fp32.abs().max()
    manifest = read_manifest(folder)
    assert manifest["precisions"] == ["fp32", "int8"] and "onnxruntime" in manifest["versions"]
    assert manifest["knobs"]["attention_window"] is None and manifest["labels"]


def test_checksum_mismatch_is_refused(exported, tmp_path):
    import shutil

    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / "fp32" / "layer_2.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportError, match=r"layer_2\.onnx: does not match the checksum"):
        build_ort_model(copy)
    (copy / "fp32" / "final.onnx").unlink()
    with pytest.raises(ExportError, match="final.onnx"):
        build_ort_model(copy)


def test_knobs_the_export_cannot_express(exported, tmp_path):
    model, folder = exported
    assert_window_refused(model, folder, tmp_path)
    with pytest.raises(ExportError, match="mean_attention"):
        build_ort_model(folder, knobs={"prune_importance": "mean_attention", "keep_ratio": 0.7})
    with pytest.raises(ExportError, match="not empty"):
        export_segments(model, folder)
    with pytest.raises(ExportError, match="exported at fp32 only"):
        fp32_only = tmp_path / "fp32only"
        export_segments(model, fp32_only)
        build_ort_model(fp32_only, precision="int8")


def test_missing_onnxruntime_names_the_install(exported, monkeypatch):
    _, folder = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install 'eat\[onnx\]'"):
        load_for_inference(folder, backend="onnxruntime")


def test_loader_exports_a_checkpoint_and_applies_knobs(tmp_path):
    torch.manual_seed(1)
    model = EATForSequenceClassification(tiny_config(initializer_range=0.3, exit_layers="all",
                                                     attention_window=8)).eval()
    model.save_pretrained(tmp_path / "model")
    loaded = load_for_inference(tmp_path / "model", backend="onnxruntime", precision="int8",
                                knobs={"attention_window": None, **EXITING})
    assert loaded.name == "ort-int8" and loaded.config.exit_threshold == 0.6
    out = loaded(*mixed_batch())
    assert out.logits.dtype == torch.float32 and out.exit_layer.shape == (5,)
    manifest = json.loads((loaded.model.export_dir / "manifest.json").read_text())
    assert manifest["source"].endswith("model")


@pytest.mark.parametrize("pooling", ["cls", "mean", "pair"])
def test_fused_layer_heads_equal_the_unfused_runner(tmp_path, pooling, monkeypatch):
    from eat.deploy import onnx_runtime

    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(initializer_range=0.3, exit_layers="all",
                                                     exit_pooling=pooling)).eval()
    folder = tmp_path / "export"
    manifest = export_segments(model, folder)
    # pair heads read token types the layer graph lacks: only the last layer (final head, [CLS]) is fused then
    fused_layers = ["4"] if pooling == "pair" else ["1", "2", "3", "4"]
    assert sorted(manifest["segments"]["fp32"]["layer_heads"]) == fused_layers
    head_calls = []  # names of the separate head sessions that ran
    for cls in (onnx_runtime.OrtHead, onnx_runtime.OrtFinal):
        monkeypatch.setattr(cls, "forward", lambda self, x, original=cls.forward, name=cls.__name__:
                            head_calls.append(name) or original(self, x))
    lengths = (17, 9, 30, 4, 12, 23, 6)
    for knobs in ({}, EXITING, {**EXITING, "prune_mode": "merge"}, {**EXITING, "exit_policy": "agreement"}):
        # segments forced: with knobs off the whole-model graph would serve both (tests/test_onnx_whole.py)
        fused = build_ort_model(folder, knobs=knobs, whole_graph=False)
        plain = build_ort_model(folder, knobs=knobs, fuse_heads=False, whole_graph=False)
        assert sum(isinstance(layer, onnx_runtime.OrtLayerHead) for layer in fused.bert.encoder.layer) \
            == len(fused_layers)
        assert not any(isinstance(layer, onnx_runtime.OrtLayerHead) for layer in plain.bert.encoder.layer)
        for seed in range(3):
            ids, mask = mixed_batch(seed, lengths=lengths)
            types = (torch.arange(ids.shape[1]) > 3).long().expand_as(ids) * mask
            head_calls.clear()
            got = fused(ids, mask, types)
            fused_calls = list(head_calls)
            want = plain(ids, mask, types)
            assert torch.equal(got.logits.argmax(-1), want.logits.argmax(-1))
            assert torch.equal(got.exit_layer, want.exit_layer)
            assert torch.equal(got.tokens_per_layer, want.tokens_per_layer)
            assert (got.logits - want.logits).abs().max() < 1e-5
            # one session per fused layer: no separate head session ran (pair: only the exit heads')
            assert "OrtFinal" not in fused_calls and ("OrtHead" in fused_calls) == (pooling == "pair" and bool(knobs))
        if knobs:
            assert int(got.exit_layer.min()) < 4  # rows really left early
    # every head's logits, as a threshold sweep caches them, come from the fused sessions too
    fused, plain = build_ort_model(folder), build_ort_model(folder, fuse_heads=False)
    ids, mask = mixed_batch(lengths=lengths)
    got = fused(ids, mask, output_exit_logits=True, disable_exit=True).exit_logits
    want = plain(ids, mask, output_exit_logits=True, disable_exit=True).exit_logits
    assert (got - want).abs().max() < 1e-5
