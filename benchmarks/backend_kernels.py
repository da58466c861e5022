"""Which int8 kernel (and which backend) is fastest for EAT's static model on this CPU: a short interleaved probe.

Times, side by side on the same SST-2 dev rows (batch 1, rotated order, one process), the static model as
PyTorch eager fp32, PyTorch dynamic int8 on the ``x86`` (fbgemm) and ``onednn`` quantized engines, per-tensor and
per-channel weights, bf16 (where the CPU has it natively), and ONNX Runtime fp32 / int8 segments. Prints a table
(median and p90 ms, accuracy on the timed rows). This is the measurement behind :mod:`eat.deploy.quantize`'s
choice; it is short and noisy on a shared machine, so rerun it before trusting a few percent.

    python benchmarks/backend_kernels.py --checkpoint runs/demo/sst2/static --rows 200 --out results/kernels.txt
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run or model folder (the static model)")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from eat.checkpoints import model_folder
    from eat.data import collate, encode, load_glue
    from eat.deploy import load_for_inference
    from eat.deploy.quantize import _fused_linear
    from eat.modeling_eat import EATSelfAttention
    from eat.timing import cpu_model, interleaved_latency

    fp32 = load_for_inference(args.checkpoint)
    tokenizer = fp32.tokenizer
    encoded = encode(load_glue("sst2", "validation").subset(args.rows, seed=0), tokenizer, 128)
    singles = [collate(encoded, [i], tokenizer.pad_token_id or 0) for i in range(min(args.rows, len(encoded)))]

    def int8(engine: str, per_channel: bool):
        torch.backends.quantized.engine = engine
        model = copy.deepcopy(fp32.model)
        for module in model.modules():
            if isinstance(module, EATSelfAttention):
                module.fused_qkv = _fused_linear(module)
        spec = {nn.Linear: per_channel_dynamic_qconfig} if per_channel else {nn.Linear}
        return quantize_dynamic(model, spec, dtype=torch.qint8)

    models = {"torch-fp32": fp32.model,
              "torch-int8 x86 per-tensor": int8("x86", False),
              "torch-int8 x86 per-channel": int8("x86", True),
              "torch-int8 onednn per-tensor": int8("onednn", False)}
    torch.backends.quantized.engine = "x86"
    from eat.training import cpu_has_native_bf16

    if cpu_has_native_bf16():
        models["torch-bf16"] = load_for_inference(args.checkpoint, precision="bf16").model
    for precision in ("fp32", "int8"):
        models[f"ort-{precision}"] = load_for_inference(args.checkpoint, backend="onnxruntime",
                                                        precision=precision).model
    labels = np.asarray(encoded.labels)[:len(singles)]
    correct = {name: np.zeros(len(singles), dtype=bool) for name in models}

    def record(name, index, output):
        correct[name][index] = int(output.logits[0].argmax()) == labels[index]

    calls = {name: (lambda b, m=m: m(b["input_ids"], None, b["token_type_ids"])) for name, m in models.items()}
    latency = interleaved_latency(calls, singles, warmup=args.warmup, on_result=record,
                                  progress=lambda i, n: print(f"row {i}/{n}", file=sys.stderr, flush=True) if i % 20 == 0 else None)
    base = latency["torch-fp32"].p50_ms
    lines = [f"# int8 kernels and backends, batch 1, {len(singles)} SST-2 dev rows, {args.threads} threads, "
             f"{cpu_model()}, checkpoint {model_folder(args.checkpoint)}, pid {os.getpid()}",
             "", "| system | accuracy (timed rows) | p50 ms | p90 ms | vs torch fp32 |", "|---|---|---|---|---|"]
    for name, stats in latency.items():
        lines.append(f"| {name} | {100 * correct[name].mean():.2f} | {stats.p50_ms:.2f} | {stats.p90_ms:.2f} | "
                     f"{base / stats.p50_ms:.2f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
