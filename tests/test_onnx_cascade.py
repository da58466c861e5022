"""The exit cascade (eat.deploy.onnx_cascade): a batch-1 call with exits on as ONE ONNX Runtime session with `If`
nodes, computing what the segmented runner and eager PyTorch compute, every exit rule included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from eat.deploy.onnx_cascade import build_cascade, cascade_unsupported  # noqa: E402
from eat.deploy.onnx_export import export_segments, read_manifest  # noqa: E402
from eat.deploy.onnx_runtime import build_ort_model  # noqa: E402
from eat.modeling_eat import EATForSequenceClassification  # noqa: E402

from .conftest import mixed_batch, tiny_config  # noqa: E402

CLASS_RULES = [
    {"exit_policy": "confidence", "exit_threshold": 0.5},
    {"exit_policy": "confidence", "exit_threshold": 0.8},
    {"exit_policy": "entropy", "entropy_threshold": 0.5},
    {"exit_policy": "patience", "exit_patience": 2},
    {"exit_policy": "agreement", "exit_threshold": 0.45, "exit_patience": 2},
]
REGRESSION_RULES = [
    {"exit_policy": "delta", "exit_threshold": 0.6, "exit_patience": 2},
    {"exit_policy": "spread", "exit_threshold": 0.8, "exit_patience": 2},
]


def _export(tmp_path_factory, name: str, **config):
    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(initializer_range=0.3, exit_layers="all", **config)).eval()
    folder = tmp_path_factory.mktemp(name) / "export"
    export_segments(model, folder, precisions=("fp32", "int8"))
    return model, folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(eager 3-class model, its fp32 + int8 export), mean-pooled exit heads."""
    return _export(tmp_path_factory, "cascade", exit_pooling="mean")


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    """(eager one-output regression model, its export), `[CLS]` exit heads."""
    return _export(tmp_path_factory, "cascade-reg", num_labels=1, problem_type="regression")


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory):
    """(eager 3-class model with pair-pooled exit heads, its fp32 + int8 export)."""
    return _export(tmp_path_factory, "cascade-pair", exit_pooling="pair")


def _rows(count: int = 12):
    """Batch-1 inputs of different lengths; every third one right-padded (a padded single row is legal)."""
    rows = []
    for seed in range(count):
        ids, mask = mixed_batch(seed, lengths=(4 + 3 * seed,))
        if seed % 3 == 2:
            ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
            mask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.long)], 1)
        rows.append((ids, mask))
    return rows


def _assert_same_pass(got, want, tolerance: float = 1e-5) -> None:
    """Two outputs of one row: the same exit layer, tokens per layer, counters and (within tolerance) logits."""
    assert torch.equal(got.exit_layer, want.exit_layer)
    assert torch.equal(got.tokens_per_layer, want.tokens_per_layer)
    assert got.work == want.work
    assert (got.logits - want.logits).abs().max() < tolerance


def _pair_types(ids, mask):
    """Token types of a sentence pair: the second segment from the middle of the real tokens on (0 on padding)."""
    length = int(mask.sum())
    return ((torch.arange(ids.shape[1]) >= length // 2) & (torch.arange(ids.shape[1]) < length)).long()[None]


def _check_rules(model, folder, rules, precision="fp32", pairs=False, tolerance=1e-5):
    """Per rule: the cascade serves every batch-1 call in one session run and equals the segmented runner (and
    eager PyTorch at fp32); returns the exit layers seen per rule."""
    seen = []
    for knobs in rules:
        cascade = build_ort_model(folder, knobs=knobs, precision=precision)
        segments = build_ort_model(folder, knobs=knobs, precision=precision, cascade=False)
        session = cascade.open_cascade()
        assert session is not None and segments.open_cascade() is None
        model.config.set_knobs(**knobs)
        layers = []
        for ids, mask in _rows():
            types = _pair_types(ids, mask) if pairs else None
            before = (session.calls, cascade.bert.embeddings.calls)
            with torch.no_grad():
                got, want = cascade(ids, mask, types), segments(ids, mask, types)
            # one session call, no segment ran
            assert (session.calls - before[0], cascade.bert.embeddings.calls - before[1]) == (1, 0)
            _assert_same_pass(got, want, tolerance)
            if precision == "fp32":
                with torch.no_grad():
                    eager = model(ids, mask, types)
                assert torch.equal(got.exit_layer, eager.exit_layer) and (got.logits - eager.logits).abs().max() < 1e-4
            layers.append(int(got.exit_layer))
        seen.append(layers)
    model.config.set_knobs(exit_policy="none", exit_depth=None)
    return seen


def test_every_classification_rule_equals_the_segments_and_eager(classifier):
    model, folder = classifier
    seen = _check_rules(model, folder, CLASS_RULES)
    # rows really left at every layer (each branch of the cascade was taken), by the rules that hold state too
    assert set().union(*map(set, seen)) == {1, 2, 3, 4}, seen
    assert min(seen[-1]) < 4 and min(seen[-2]) < 4, seen


def test_regression_rules_equal_the_segments_and_eager(regressor):
    model, folder = regressor
    seen = _check_rules(model, folder, REGRESSION_RULES)
    assert all(min(layers) < 4 and max(layers) == 4 for layers in seen), seen


def test_pair_pooled_heads_in_the_cascade(pair_model):
    """Pair heads (sentence pairs): the cascade builds the two segment means and [a, b, |a - b|, a * b] itself
    from the pair weights the runner feeds, and equals the segments and eager on pairs, padded ones included."""
    model, folder = pair_model
    seen = _check_rules(model, folder, CLASS_RULES[1:2] + CLASS_RULES[4:], pairs=True)
    assert all(min(layers) < 4 for layers in seen) and max(map(max, seen)) == 4, seen
    # int8: the pair features quantized inside one graph rather than fed to the head's own session: close, the
    # same exit layers
    _check_rules(model, folder, CLASS_RULES[1:2], precision="int8", pairs=True, tolerance=0.02)


def test_int8_cascade_equals_the_int8_segments(classifier):
    _, folder = classifier
    seen = _check_rules(classifier[0], folder, CLASS_RULES[1:2] + CLASS_RULES[4:], precision="int8")
    assert min(seen[0]) < 4 and max(seen[0]) == 4, seen


def test_threshold_is_an_input_and_baked_knobs_rebuild(classifier):
    _, folder = classifier
    model = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.0})
    ids, mask = _rows()[0]
    first = model.open_cascade()
    assert model(ids, mask).exit_layer.tolist() == [1]  # tau 0: the first head answers
    model.config.set_knobs(exit_threshold=0.9999)
    assert model(ids, mask).exit_layer.tolist() == [4] and model.open_cascade() is first  # no new graph
    assert first.calls == 2
    model.config.set_knobs(exit_layers=[2, 4], exit_threshold=0.0)  # exit layers are baked in: a new cascade
    out = model(ids, mask)
    assert out.exit_layer.tolist() == [2] and model.open_cascade() is not first
    assert out.work.exit_head_rows == 1 and out.work.layers_run == 2  # the head after layer 1 was not read
    assert len(model.cascades) == 2


def test_cascade_serves_batch_one_only_and_falls_back_when_it_cannot(classifier):
    _, folder = classifier
    model = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.5})
    session = model.open_cascade()
    ids, mask = mixed_batch(lengths=(9, 5, 12))
    model(ids, mask)  # a batch: rows leave one by one on the segments
    model(ids[:1, :9], None, output_exit_logits=True)  # every head's logits: only the segments have them
    assert session.calls == 0 and model.bert.embeddings.calls == 2
    for knobs, reason in (({"keep_ratio": 0.5}, "pruning"),
                          ({"exit_pooling": "cls"}, "no fused layer + head segment with cls pooling"),
                          ({"exit_policy": "none"}, "no early exit")):
        pruned = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.5, **knobs})
        assert pruned.open_cascade() is None
        assert reason in cascade_unsupported(pruned.config, read_manifest(folder), "fp32")
        pruned(*_rows()[1])  # still answers, on the segments or the whole graph
    off = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.5}, cascade=False)
    assert off.open_cascade() is None


def test_cascade_graph_is_valid_onnx_and_refuses_what_it_cannot_express(classifier):
    model, folder = classifier
    manifest = read_manifest(folder)
    config = model.config.__class__.from_dict(manifest["config"])
    config.set_knobs(exit_policy="agreement", exit_threshold=0.5, exit_layers=[1, 3])
    graph = onnx.load_from_string(build_cascade(folder, manifest, "int8", config))
    onnx.checker.check_model(graph, full_check=True)
    # one If per exit layer before the last, nested: the head after layer 3 lives in the first If's else branch
    top_ifs = [node for node in graph.graph.node if node.op_type == "If"]
    assert len(top_ifs) == 1
    stay = next(attr.g for attr in top_ifs[0].attribute if attr.name == "else_branch")
    assert [node.op_type for node in stay.node].count("If") == 1
    config.set_knobs(keep_ratio=0.7)
    with pytest.raises(ValueError, match="keep ratios"):
        build_cascade(folder, manifest, "fp32", config)


def test_on_exit_and_labels_on_the_cascade(classifier):
    _, folder = classifier
    model = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.0})
    ids, mask = _rows()[2]  # padded
    told = []
    out = model(ids, mask, labels=torch.tensor([1]), on_exit=lambda *args: told.append(args))
    layer, rows, logits, tokens = told[0]
    assert layer == 1 and rows.tolist() == [0] and torch.equal(logits, out.logits)
    assert tokens.tolist() == [int(mask.sum())] and out.loss is not None and out.loss.ndim == 0
    with pytest.raises(ValueError, match="position limit"):
        model(torch.ones(1, 200, dtype=torch.long))


def test_single_session_outputs_behave_as_the_model_output(classifier):
    """The fast paths build their output without transformers' checks: it must still be the same ModelOutput
    (attributes, items in field order, tuple view, later items) as the segmented forward returns."""
    _, folder = classifier
    cascade = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.5})
    segments = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.5}, cascade=False)
    ids, mask = _rows()[0]
    got, want = cascade(ids, mask), segments(ids, mask)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    assert got[0] is got.logits and got["work"] is got.work and len(got.to_tuple()) == len(want.to_tuple())
    got["loss"] = torch.tensor(1.0)
    assert got.loss is got["loss"]


def test_torch_runs_single_threaded_between_segments(classifier, monkeypatch):
    """Between ONNX Runtime sessions the torch work runs on one thread (its OpenMP workers would spin on the cores
    the next session wants), and the caller's thread count is back afterwards, also after an error."""
    from eat.deploy import onnx_runtime

    _, folder = classifier
    model = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.5}, threads=2)
    seen = []
    original = onnx_runtime.OrtLayerHead.forward
    monkeypatch.setattr(onnx_runtime.OrtLayerHead, "forward",
                        lambda self, *args: seen.append(torch.get_num_threads()) or original(self, *args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model(*mixed_batch(lengths=(9, 5, 12)))  # a batch: the segments under the layer loop
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        assert all(session.get_session_options().intra_op_num_threads == 2
                   for session in (model.bert.embeddings.session, model.open_cascade().session))
        with pytest.raises(ValueError, match="right-padded"):
            model(torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cascade_pair_weights_in_numpy_equal_the_layer_loops():
    """The cascade's pair weights (numpy, before the session call) are pair_pooling_weights' own: two segments,
    one segment only (b = a), padding, several rows."""
    from eat.deploy.onnx_runtime import _pair_weights
    from eat.modeling_eat import pair_pooling_weights

    types = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=np.int64)
    for mask in (None, np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=np.int64)):
        expected = pair_pooling_weights(torch.empty(3, 6, 1), None if mask is None else torch.from_numpy(mask != 0),
                                        None, torch.from_numpy(types)).numpy()
        got = _pair_weights(types, mask)
        assert got.dtype == np.float32 and got.shape == (3, 2, 6)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert np.allclose(_pair_weights(types[1:2], None)[0, 0], _pair_weights(types[1:2], None)[0, 1])  # b = a


# exit_depth caps (the deepest layer a pass runs): rules that let some rows go before the cap and hold others
DEPTH_CASES = [
    ("classifier", {"exit_policy": "confidence", "exit_threshold": 0.8, "exit_depth": 3}),
    ("classifier", {"exit_policy": "entropy", "entropy_threshold": 0.5, "exit_depth": 3}),
    ("classifier", {"exit_policy": "none", "exit_depth": 2}),  # a pure truncation: every row leaves at 2
    ("regressor", {"exit_policy": "delta", "exit_threshold": 0.6, "exit_patience": 2, "exit_depth": 3}),
    ("regressor", {"exit_policy": "spread", "exit_threshold": 0.8, "exit_patience": 2, "exit_depth": 3}),
]
BATCH_LENGTHS = (17, 9, 30, 4, 12, 23, 6)


def _assert_capped(got, uncapped, depth: int) -> None:
    """A pass capped at ``depth`` against the exit layers (B,) of the same rows uncapped: a row the rule let go
    before the cap leaves where it did, every other row at the cap; no token, layer or head counted after it."""
    assert torch.equal(got.exit_layer, uncapped.clamp(max=depth))
    assert got.tokens_per_layer.shape[1] == 4 and int(got.tokens_per_layer[:, depth:].sum()) == 0
    rows = len(got.exit_layer)
    assert got.work.layers_run == int(got.exit_layer.sum()) <= depth * rows
    assert got.work.exit_head_rows <= depth * rows


@pytest.mark.parametrize("fixture, knobs", DEPTH_CASES)
def test_exit_depth_caps_the_cascade_and_the_segments(request, fixture, knobs):
    """The runner honours ``exit_depth`` on both paths: a batch-1 call runs the cascade built up to the cap (one
    session call; a pure truncation has no cascade and runs the segments), a batch the segments; both equal
    eager PyTorch with the same knobs (logits, exit layers, tokens per layer, counters)."""
    model, folder = request.getfixturevalue(fixture)
    depth, exits = knobs["exit_depth"], knobs["exit_policy"] != "none"
    ort = build_ort_model(folder, knobs=knobs)
    cascade = ort.open_cascade()
    assert (cascade is not None) == exits and ort.whole_graph is None
    if exits:  # cascade == the segments == eager on every batch-1 row, one session call each
        _check_rules(model, folder, [knobs])
    inputs = _rows() + [mixed_batch(seed, lengths=BATCH_LENGTHS) for seed in range(2)]
    uncapped_layers = []
    try:
        for ids, mask in inputs:
            with torch.no_grad():
                model.config.set_knobs(**knobs)
                got, want = ort(ids, mask), model(ids, mask)
                model.config.set_knobs(exit_depth=None)
                uncapped = model(ids, mask).exit_layer
            _assert_same_pass(got, want, tolerance=1e-4)
            _assert_capped(got, uncapped, depth)
            uncapped_layers += uncapped.tolist()
    finally:
        model.config.set_knobs(exit_policy="none", exit_depth=None)
    # the cap held rows that would have run on, and (exits on) the rule let others go before it
    assert max(uncapped_layers) > depth and (min(uncapped_layers) < depth) == exits, uncapped_layers
    batch_one = len(inputs) - 2
    assert ort.bert.embeddings.calls == (2 if exits else len(inputs))  # the batches ran on the segments
    assert cascade is None or cascade.calls == batch_one


def test_capped_cascade_ends_at_the_cap_and_the_cap_is_baked_in(classifier):
    model, folder = classifier
    manifest = read_manifest(folder)
    config = model.config.__class__.from_dict(manifest["config"])
    config.set_knobs(exit_policy="confidence", exit_threshold=0.5, exit_depth=2)
    graph = onnx.load_from_string(build_cascade(folder, manifest, "fp32", config))
    onnx.checker.check_model(graph, full_check=True)

    def names(g) -> set[str]:
        """Every node name in ``g`` and its If branches."""
        found = set()
        for node in g.node:
            found.add(node.name)
            for attribute in node.attribute:
                if attribute.type == attribute.GRAPH:
                    found |= names(attribute.g)
        return found

    # layers 1 and 2 with their heads, one If (after layer 1); nothing of layers 3 and 4
    layers = {name.split("/")[0] for name in names(graph.graph) if name.startswith("L")}
    assert layers == {"L1", "L2"} and [node.op_type for node in graph.graph.node].count("If") == 1
    # the runner: the cap is part of the cascade's key (None and the model's depth are the same graph)
    ort = build_ort_model(folder, knobs={"exit_policy": "confidence", "exit_threshold": 0.9999})
    ids, mask = _rows()[0]
    full = ort.open_cascade()
    assert ort(ids, mask).exit_layer.tolist() == [4]
    ort.config.set_knobs(exit_depth=4)
    assert ort.open_cascade() is full
    ort.config.set_knobs(exit_depth=2)
    out = ort(ids, mask)
    capped = ort.open_cascade()
    assert capped is not full and capped.calls == 1 and out.exit_layer.tolist() == [2]
    assert out.tokens_per_layer[0, 2:].tolist() == [0, 0] and out.work.layers_run == 2
    assert out.work.exit_head_rows == 2  # heads 1 and 2 read, none after


def test_int8_capped_cascade_equals_the_int8_segments(classifier):
    model, folder = classifier
    knobs = {"exit_policy": "confidence", "exit_threshold": 0.8, "exit_depth": 3}
    seen = _check_rules(model, folder, [knobs], precision="int8")
    assert max(seen[0]) == 3 and min(seen[0]) < 3, seen
