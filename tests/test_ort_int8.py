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
