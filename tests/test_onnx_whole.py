"""The whole-model ONNX graph (``model.onnx``): the static sentence model as one session, run by the ONNX Runtime
backend whenever nothing adaptive can happen in a call, the segments otherwise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("onnxruntime")

from eat.deploy.onnx_export import ExportError, export_segments  # noqa: E402
from eat.deploy.onnx_runtime import build_ort_model, make_session, runs_static  # noqa: E402
from eat.modeling_eat import EATForSequenceClassification, EATForTokenClassification  # noqa: E402

from .conftest import mixed_batch, tiny_config  # noqa: E402

EXITING = {"exit_policy": "confidence", "exit_threshold": 0.6}
LENGTHS = (17, 9, 30, 4, 12, 23, 6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager model, export folder with fp32 and int8 segments and whole graphs) of a tiny model with exit heads
    after every layer and spread-out logits."""
    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(initializer_range=0.3, exit_layers="all")).eval()
    folder = tmp_path_factory.mktemp("onnx") / "export"
    export_segments(model, folder, precisions=("fp32", "int8"))
    return model, folder


def _types(ids, mask):
    """Token types (B, n): 0 for the first 6 positions, 1 after them, 0 on padding."""
    return (torch.arange(ids.shape[1]) > 5).long().expand_as(ids) * mask


def test_manifest_lists_the_whole_graph_per_precision(exported):
    _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["segments"]["fp32"]["whole"] == "fp32/model.onnx"
    assert manifest["segments"]["int8"]["whole"] == "int8/model.onnx"
    assert {"fp32/model.onnx", "int8/model.onnx"} <= set(manifest["sha256"])
    session = make_session(folder / "fp32" / "model.onnx")
    assert [node.name for node in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [node.name for node in session.get_outputs()] == ["logits"]


def test_whole_graph_matches_eager_with_padding(exported):
    model, folder = exported
    session = make_session(folder / "fp32" / "model.onnx")
    for seed in range(3):
        ids, mask = mixed_batch(seed, lengths=LENGTHS)  # batch 7, mixed lengths, longer than the export's example
        types = _types(ids, mask)
        with torch.no_grad():
            want = model(ids, mask, types).logits  # exits off (the fixture's knobs): the static model
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                 "token_type_ids": types.numpy()})[0]
        assert (torch.from_numpy(got) - want).abs().max() < 1e-4


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_whole_graph_equals_the_segmented_runner_with_exits_off(exported, precision):
    _, folder = exported
    whole = build_ort_model(folder, precision=precision)
    segmented = build_ort_model(folder, precision=precision, whole_graph=False)
    assert whole.whole_graph is not None and segmented.whole_graph is None
    for seed in range(3):
        ids, mask = mixed_batch(seed, lengths=LENGTHS)
        types = _types(ids, mask)
        got, want = whole(ids, mask, types), segmented(ids, mask, types)
        assert got.logits.dtype == torch.float32 and got.logits.shape == want.logits.shape
        assert torch.equal(got.logits.argmax(-1), want.logits.argmax(-1))
        assert (got.logits - want.logits).abs().max() < 1e-4
        assert torch.equal(got.exit_layer, want.exit_layer) and bool((got.exit_layer == 4).all())
        assert torch.equal(got.tokens_per_layer, want.tokens_per_layer)
        assert torch.equal(got.tokens_per_layer[:, 0], mask.sum(1))
        assert got.work == want.work  # the same counters as the layer loop with exits off
        assert got.exit_logits is None and got.exit_layers == want.exit_layers
    assert whole.whole_graph.calls == 3 and whole.bert.embeddings.calls == 0
    assert segmented.bert.embeddings.calls == 3


def _counts(model) -> tuple[int, int]:
    """(whole-graph session runs, embeddings segment runs) so far: which path served the calls."""
    whole = model.whole_graph.calls if model.whole_graph is not None else 0
    return whole, model.bert.embeddings.calls


def test_runner_picks_the_whole_graph_only_when_nothing_adaptive_can_happen(exported):
    _, folder = exported
    ids, mask = mixed_batch(lengths=LENGTHS)
    static = build_ort_model(folder)
    assert static.whole_graph is not None  # static knobs: opened at load, not in the first call
    static(ids, mask)
    assert _counts(static) == (1, 0)
    static(ids, mask, output_exit_logits=True, disable_exit=True)  # every head's logits: only the segments have them
    assert _counts(static) == (1, 1)

    exiting = build_ort_model(folder, knobs=EXITING)
    assert exiting.whole_graph is None  # adaptive knobs: not opened at load
    out = exiting(ids, mask)
    assert _counts(exiting) == (0, 1) and int(out.exit_layer.min()) < 4  # rows really left early
    exiting(ids, mask, disable_exit=True)  # no row may leave in this call: the static model
    assert _counts(exiting) == (1, 1)
    # knobs set after loading are honoured per call
    for knobs, whole in (({"exit_policy": "none", "keep_ratio": 0.7}, False),  # pruning
                         ({"exit_policy": "none", "keep_ratio": [1.0, 1.0, 0.5, 1.0]}, False),
                         ({"exit_policy": "confidence", "exit_threshold": 1.5}, True),  # nothing passes tau > 1
                         ({"exit_policy": "entropy", "entropy_threshold": -1.0}, True),
                         ({"exit_policy": "confidence", "exit_threshold": 0.6, "exit_layers": None}, True),
                         ({"exit_policy": "confidence", "exit_layers": "all"}, False),
                         ({"exit_policy": "none"}, True)):
        exiting.config.set_knobs(**{"keep_ratio": 1.0, "exit_layers": "all", **knobs})
        assert runs_static(exiting.config) == whole
        before = _counts(exiting)
        exiting(ids, mask)
        after = _counts(exiting)
        assert (after[0] - before[0], after[1] - before[1]) == ((1, 0) if whole else (0, 1)), knobs

    plain = build_ort_model(folder, whole_graph=False)  # segments forced
    plain(ids, mask)
    assert _counts(plain) == (0, 1)


def test_an_exit_depth_cap_is_not_static(exported):
    """A cap below the last layer answers every row with an exit head: never the whole graph, even with exits
    off (a pure truncation); a cap at the last layer is the static model; disable_exit (every head cached) runs
    every layer, so the cap does not apply there."""
    model, folder = exported
    ids, mask = mixed_batch(lengths=LENGTHS)
    truncated = build_ort_model(folder, knobs={"exit_policy": "none", "exit_depth": 2})
    config = truncated.config
    assert not runs_static(config) and truncated.whole_graph is None
    out = truncated(ids, mask)
    assert _counts(truncated) == (0, 1) and bool((out.exit_layer == 2).all())
    assert int(out.tokens_per_layer[:, 2:].sum()) == 0 and out.work.layers_run == 2 * len(LENGTHS)
    model.config.set_knobs(exit_depth=2)
    try:
        with torch.no_grad():
            want = model(ids, mask)
        assert (out.logits - want.logits).abs().max() < 1e-4 and out.work == want.work
    finally:
        model.config.set_knobs(exit_depth=None)
    assert runs_static(config, disable_exit=True)
    out = truncated(ids, mask, disable_exit=True)  # every layer, the final head: the whole graph
    assert _counts(truncated) == (1, 1) and bool((out.exit_layer == 4).all())
    assert not runs_static(config, training=True) and not runs_static(config, output_exit_logits=True)
    config.set_knobs(exit_depth=4)
    assert runs_static(config)
    truncated(ids, mask)
    assert _counts(truncated) == (2, 1)
    config.set_knobs(exit_policy="confidence", exit_threshold=0.6, exit_depth=3)
    assert not runs_static(config) and runs_static(config, disable_exit=True)


def test_token_exports_refuse_an_exit_depth_cap():
    from eat.deploy.onnx_export import check_exportable

    config = tiny_config(num_hidden_layers=2, exit_layers="all", exit_depth=1)
    with pytest.raises(ExportError, match="exit_depth"):
        check_exportable(config, kind="token")
    check_exportable(config, kind="sequence")
    config.set_knobs(exit_depth=2)  # the model's depth: no cap
    check_exportable(config, kind="token")


def test_on_exit_labels_and_input_checks_on_the_whole_graph(exported):
    _, folder = exported
    whole, segmented = build_ort_model(folder), build_ort_model(folder, whole_graph=False)
    ids, mask = mixed_batch(lengths=LENGTHS)
    calls = {"whole": [], "segmented": []}
    for name, model in (("whole", whole), ("segmented", segmented)):
        model(ids, mask, on_exit=lambda layer, rows, logits, tokens, log=calls[name]:
              log.append((layer, rows.tolist(), logits, tokens.tolist())))
    (layer, rows, logits, tokens), = calls["whole"]  # one call, at the last layer, for every row
    (want_layer, want_rows, want_logits, want_tokens), = calls["segmented"]
    assert (layer, rows, tokens) == (want_layer, want_rows, want_tokens) == (4, list(range(7)), list(LENGTHS))
    assert (logits - want_logits).abs().max() < 1e-4
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    assert abs(float(whole(ids, mask, labels=labels).loss) - float(segmented(ids, mask, labels=labels).loss)) < 1e-4
    no_mask = whole(ids[:, :9], None)  # no mask: every token real
    assert no_mask.tokens_per_layer.tolist() == [[9] * 4] * 7 and whole.whole_graph.calls == 3
    with pytest.raises(ValueError, match="right-padded"):
        whole(ids, mask.flip(1))
    with pytest.raises(ValueError, match="position limit"):
        whole(torch.ones(1, 97, dtype=torch.long), None)


def test_export_without_a_whole_graph_still_loads(exported, tmp_path):
    """An export made before the whole graph existed (no ``whole`` entry, no model.onnx) runs on the segments."""
    _, folder = exported
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for precision in ("fp32", "int8"):
        del manifest["segments"][precision]["whole"]
        del manifest["sha256"][f"{precision}/model.onnx"]
        (old / precision / "model.onnx").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2))
    ids, mask = mixed_batch(lengths=LENGTHS)
    for precision in ("fp32", "int8"):
        model = build_ort_model(old, precision=precision)
        assert model.whole_graph is None and model.open_whole_graph() is None
        got = model(ids, mask)
        assert _counts(model) == (0, 1)
        want = build_ort_model(folder, precision=precision)(ids, mask)
        assert torch.equal(got.logits.argmax(-1), want.logits.argmax(-1)) and got.work == want.work


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_whole_graph_checksum_mismatch_is_refused(exported, tmp_path, precision):
    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / precision / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportError, match=rf"{precision}/model\.onnx: does not match the checksum"):
        build_ort_model(copy, precision=precision)


def test_token_models_have_no_whole_graph(tmp_path):
    torch.manual_seed(0)
    model = EATForTokenClassification(tiny_config(num_hidden_layers=2)).eval()
    manifest = export_segments(model, tmp_path / "token")
    assert "whole" not in manifest["segments"]["fp32"] and not (tmp_path / "token" / "fp32" / "model.onnx").exists()
