"""Deployment: one loader for inference on every backend and precision.

:func:`load_for_inference` is the entry point the server, the large-file predictor and the benchmark call::

    from eat.deploy import load_for_inference
    model = load_for_inference("runs/demo/sst2/eat", tuned="runs/demo/results/tuned_sst2.json",
                               precision="int8", backend="onnxruntime")
    out = model(input_ids, attention_mask)        # out.logits (B, C) float32, out.exit_layer (B,), out.tokens_per_layer
    model.config, model.tokenizer                 # EATConfig, the checkpoint's tokenizer

Backends: ``torch`` (eager PyTorch; precision fp32, bf16 where the CPU has it natively, or dynamic int8) and
``onnxruntime`` (ONNX segments run by ONNX Runtime, fp32 or int8; see :mod:`eat.deploy.onnx_export`), for
sentence and token (sequence labelling) models alike. Either way the exit rule, row or token compaction and
token pruning are EAT's own (the task model's layer loop) and read the model's own outputs at that precision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configuration_eat import EATConfig
from .quantize import PRECISIONS, PrecisionError, apply_precision, check_precision

BACKENDS = ("torch", "onnxruntime")


def deployment_name(backend: str, precision: str) -> str:
    """Short label of a backend and precision, as tables and peer points name it: ``ort-int8``, ``torch-fp32``..."""
    return f"{'ort' if backend == 'onnxruntime' else 'torch'}-{precision}"


@dataclass
class InferenceModel:
    """A model ready for inference: call it like ``EATForSequenceClassification`` (or the token model).

    model: the torch module doing the work (for ``onnxruntime``, an EAT model whose segments are ONNX Runtime
    sessions); config: its EATConfig (knobs applied); tokenizer: the checkpoint's tokenizer (None when it has
    none); precision / backend: what it runs at; token_level: a sequence-labelling model."""

    model: torch.nn.Module
    config: EATConfig
    tokenizer: Any
    precision: str
    backend: str
    token_level: bool = False

    @property
    def name(self) -> str:
        """Short label for tables, e.g. ``ort-int8`` or ``torch-fp32``."""
        return deployment_name(self.backend, self.precision)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        """Run a right-padded batch (B, n); returns the model's output (``logits`` (B, C) as float32,
        ``exit_layer`` (B,), ``tokens_per_layer`` (B, L), ``work``; token models: their per-token fields)."""
        if self.backend == "onnxruntime":
            # its runners enter inference mode themselves where torch works between sessions; the single-session
            # paths have no torch op to spare it for, and entering and leaving costs tens of microseconds on the
            # caches a session call leaves cold: a few % of a batch-1 call
            output = self.model(input_ids, attention_mask, token_type_ids, **kwargs)
        else:
            with torch.inference_mode():
                output = self.model(input_ids, attention_mask, token_type_ids, **kwargs)
        if output.logits is not None and output.logits.dtype != torch.float32:
            output.logits = output.logits.float()  # bf16 logits: callers' softmax and numpy want float32
        return output

    def eval(self) -> "InferenceModel":
        """Already in eval mode (for code that calls ``.eval()`` on what it loads)."""
        return self

    def to(self, device) -> "InferenceModel":
        """CPU only: ``to("cpu")`` is a no-op, anything else an error (int8 and ONNX Runtime run on the CPU)."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"a {self.name} model runs on the CPU only, not {device}")
        return self


def read_tuned(tuned: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """The knobs of a point `eat tune` saved: a ``tuned_<task>.json`` path or its parsed content (None = none)."""
    if tuned is None:
        return {}
    from ..results import read_tuned_knobs

    return read_tuned_knobs(tuned, flag="tuned")


def _is_token_checkpoint(model_dir: Path) -> bool:
    """Whether a checkpoint folder holds a token-classification model (its config or its train_config says so)."""
    from ..ner_data import is_token_task

    config_file = model_dir / "config.json"
    architectures = (json.loads(config_file.read_text()).get("architectures") or []) if config_file.is_file() else []
    train_config = model_dir.parent / "train_config.json"
    task = json.loads(train_config.read_text()).get("task", "") if train_config.is_file() else ""
    return "EATForTokenClassification" in architectures or is_token_task(task or "")


def load_tokenizer(model_dir: Path):
    """The tokenizer saved in ``model_dir`` (None when the folder has none)."""
    if not (model_dir / "tokenizer_config.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_for_inference(path: str | Path, *, knobs: dict[str, Any] | None = None,
                       tuned: str | Path | dict[str, Any] | None = None, precision: str = "fp32",
                       backend: str = "torch", threads: int | None = None,
                       token_level: bool | None = None) -> InferenceModel:
    """Load a run, model folder or ONNX export for inference.

    path: a run folder (``RUN/model``), a model folder, or (backend ``onnxruntime``) a folder written by
    `eat export`; a checkpoint given with backend ``onnxruntime`` is exported first (to a temporary folder).
    knobs: EAT knobs, applied over ``tuned`` (a ``tuned_<task>.json`` of `eat tune`, or its content).
    precision: "fp32", "bf16" (torch, native-bf16 CPUs only) or "int8". threads: intra-op threads (sets torch's,
    process-wide; ONNX Runtime sessions use the same number). token_level: force a token-classification model
    (default: what the checkpoint says; an ONNX export folder says what it holds, and a contradicting
    token_level is an ExportError). Raises CheckpointError, KnobError, PrecisionError, FileNotFoundError or
    ValueError with a message naming the path or argument.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_precision(precision)
    if threads:
        torch.set_num_threads(threads)
    merged = {**read_tuned(tuned), **(knobs or {})}
    path = Path(path)
    if backend == "onnxruntime":
        from .onnx_runtime import load_onnx_model

        return load_onnx_model(path, knobs=merged, precision=precision, token_level=token_level)
    from ..checkpoints import CheckpointError, load_classifier, model_folder

    if (path / "manifest.json").is_file() and not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: an ONNX export; load it with backend='onnxruntime'")
    model_dir = model_folder(path)
    token = _is_token_checkpoint(model_dir) if token_level is None else token_level
    model = load_classifier(str(model_dir), knobs=merged, token_level=token)
    model = apply_precision(model.eval(), precision, inplace=True)
    return InferenceModel(model=model, config=model.config, tokenizer=load_tokenizer(model_dir),
                          precision=precision, backend=backend, token_level=token)


__all__ = ["BACKENDS", "PRECISIONS", "InferenceModel", "deployment_name", "PrecisionError", "load_for_inference",
           "load_tokenizer",
           "read_tuned"]
