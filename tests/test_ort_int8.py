"""ONNX Runtime int8 segments quantize weights per output channel (one scale per column, not one per matrix)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from eat.deploy.onnx_export import export_segments, read_manifest  # noqa: E402
from eat.modeling_eat import EATForSequenceClassification  # noqa: E402

from .conftest import tiny_config  # noqa: E402


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
