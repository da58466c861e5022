"""ONNX Runtime int8 segments quantize weights per output channel (one scale per column, not one per matrix); the
int8 runners honour the exit_depth cap as the fp32 ones do."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from eat.deploy.onnx_export import export_segments, read_manifest  # noqa: E402
from eat.modeling_eat import EATForSequenceClassification  # noqa: E402

from .conftest import mixed_batch, tiny_config  # noqa: E402


def test_int8_weight_scales_are_per_output_channel(tmp_path):
    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(exit_layers="all")).eval()
    folder = tmp_path / "export"
    export_segments(model, folder, precisions=("fp32", "int8"))
    assert "int8" in read_manifest(folder)["precisions"]
    int8_layer = folder / "int8" / "layer_1.onnx"
    graph = onnx.load(str(int8_layer)).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    scales = [initializers[name] for name in initializers if name.endswith("_scale")]
    # a per-channel scale is a vector as long as the layer's output features (the intermediate layer: 4 d);
    # ORT's per-tensor default would make every weight scale a scalar
    widths = {int(tensor.dims[0]) for tensor in scales if tensor.dims}
    assert widths, f"no per-channel weight scale in {int8_layer}: {[t.name for t in scales]}"
    assert model.config.intermediate_size in widths


def test_int8_whole_graph_quantizes_like_the_segments(tmp_path):
    """The int8 whole-model graph: the same per-channel int8 matmuls as the int8 segments (4 per layer, 2 in the
    final head), and its embedding lookups stay fp32 as the (never quantized) embeddings segment."""
    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config()).eval()
    folder = tmp_path / "export"
    manifest = export_segments(model, folder, precisions=("fp32", "int8"))
    assert manifest["segments"]["int8"]["whole"] == "int8/model.onnx"

    def op_count(name: str, op: str) -> int:
        return sum(node.op_type == op for node in onnx.load(str(folder / name)).graph.node)

    segments = manifest["segments"]["int8"]
    segment_matmuls = sum(op_count(name, "MatMulInteger") for name in [*segments["layers"], segments["final"]])
    assert op_count("int8/model.onnx", "MatMulInteger") == segment_matmuls == 4 * 4 + 2
    assert op_count("int8/model.onnx", "DequantizeLinear") == 0  # no int8 embedding table
    graph = onnx.load(str(folder / "int8" / "model.onnx")).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    lookups = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in initializers]
    assert lookups and all(initializers[node.input[0]].data_type == onnx.TensorProto.FLOAT for node in lookups)
    widths = {int(tensor.dims[0]) for name, tensor in initializers.items() if name.endswith("_scale") and tensor.dims}
    assert model.config.intermediate_size in widths


def test_int8_runners_honour_exit_depth(tmp_path):
    """ORT int8 (segments for a batch, the cascade for one row) and torch int8 stop at the exit_depth cap: no row
    after it, no token or layer counted there, the same exit layers as the ORT int8 segments."""
    from eat.deploy.onnx_runtime import build_ort_model
    from eat.deploy.quantize import quantize_int8

    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(initializer_range=0.3, exit_layers="all",
                                                     exit_pooling="mean")).eval()
    folder = tmp_path / "export"
    export_segments(model, folder, precisions=("fp32", "int8"))
    knobs = {"exit_policy": "confidence", "exit_threshold": 0.8, "exit_depth": 2}
    ort = build_ort_model(folder, knobs=knobs, precision="int8")
    segments = build_ort_model(folder, knobs=knobs, precision="int8", cascade=False)
    model.config.set_knobs(**knobs)
    eager_int8 = quantize_int8(model)
    cascade = ort.open_cascade()
    batch = mixed_batch(lengths=(17, 9, 30, 4, 12))
    for ids, mask in [batch, *(mixed_batch(seed, lengths=(5 + 4 * seed,)) for seed in range(4))]:
        with torch.no_grad():
            outputs = [ort(ids, mask), segments(ids, mask), eager_int8(ids, mask)]
        for out in outputs:
            assert int(out.exit_layer.max()) <= 2 and int(out.tokens_per_layer[:, 2:].sum()) == 0
            assert out.work.layers_run == int(out.exit_layer.sum()) <= 2 * len(ids)
        assert torch.equal(outputs[0].exit_layer, outputs[1].exit_layer) and outputs[0].work == outputs[1].work
        assert (outputs[0].logits - outputs[1].logits).abs().max() < 0.02
    assert cascade is not None and cascade.calls == 4  # the batch-1 rows ran the capped int8 cascade
