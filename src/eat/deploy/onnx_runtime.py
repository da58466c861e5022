"""Run ONNX segments (:mod:`eat.deploy.onnx_export`) in ONNX Runtime with EAT's own exit, compaction and pruning.

The runner is an :class:`~eat.modeling_eat.EATForSequenceClassification` whose embeddings, layers, exit heads
and final head are replaced by modules that call ONNX Runtime sessions. ``EATModel.forward`` (the layer loop:
exit decisions, exited rows leaving the batch, padding trimmed, tokens pruned or merged) runs unchanged between
the segments, so both backends share one implementation of every mechanism.

Sessions: all graph optimisations, ``intra_op_num_threads`` = torch's thread count, one inter-op thread, and
thread spinning off (``session.intra_op.allow_spinning = 0``): when ORT shares a process with PyTorch (the
benchmark times both, interleaved), spinning threads steal the cores of the next call.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..configuration_eat import EATConfig
from ..modeling_eat import EATForSequenceClassification
from .onnx_export import ExportError, check_exportable, export_checkpoint, read_manifest, require_onnxruntime


def make_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session for one segment (spinning off, torch's thread count)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class _Segment(nn.Module):
    """A module that runs one ONNX Runtime session: torch tensors in, torch tensors out (no copy out)."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_names = {node.name for node in session.get_inputs()}

    def run(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        """Feed the named inputs the graph has (an input the export pruned, e.g. unused token types, is skipped)."""
        arrays = {name: np.ascontiguousarray(value.detach().numpy()) for name, value in feeds.items()
                  if name in self.input_names}
        return [torch.from_numpy(array) for array in self.session.run(None, arrays)]


class OrtEmbeddings(_Segment):
    """``embeddings`` segment: (B, n) ids (and token types) -> (B, n, d)."""

    def forward(self, input_ids, token_type_ids=None):
        """(B, n) ids and token types (None = all 0) -> (B, n, d); refuses inputs past the position limit."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        limit = self.max_positions
        if input_ids.shape[1] > limit:
            raise ValueError(f"input of {input_ids.shape[1]} tokens is longer than the model's position limit "
                             f"({limit}); truncate it (the tokenizer's max_length) first")
        return self.run(input_ids=input_ids.long(), token_type_ids=token_type_ids.long())[0]


class OrtLayer(_Segment):
    """``layer_<i>`` segment, called as ``EATLayer`` is: (hidden, ctx) -> (hidden, q, k, scores computed).

    q is the `[CLS]` query only (B, H, 1, dh): all that `cls_attention` pruning reads."""

    def forward(self, hidden, ctx):
        """hidden (B, n, d) and the batch's attention context -> (hidden, q_cls, k, attention scores computed)."""
        if ctx.radius is not None:  # refused at load; a guard against knobs set on the config afterwards
            raise ExportError("attention_window cannot run on the ONNX Runtime backend")
        B, n, _ = hidden.shape
        mask = ctx.dense_mask  # None, bool (B, 1, 1, n) (True = attend) or float additive (B, 1, 1, n)
        if mask is None:
            bias = hidden.new_zeros(B, n)
        elif mask.dtype == torch.bool:
            bias = torch.zeros(B, n).masked_fill(~mask[:, 0, 0], float("-inf"))
        else:
            bias = mask[:, 0, 0].float()
        hidden, q_cls, k = self.run(hidden=hidden, key_bias=bias)
        return hidden, q_cls, k, B * n * n


class OrtHead(_Segment):
    """``exit_<i>`` segment: pooled features (B, w) -> logits (B, C)."""

    def __init__(self, session, in_features: int):
        super().__init__(session)
        self.dense = nn.Identity()  # EATForSequenceClassification checks its heads' input width here
        self.dense.in_features = in_features

    def forward(self, pooled):
        """(B, w) -> (B, C)."""
        return self.run(pooled=pooled)[0]


class OrtFinal(_Segment):
    """``final`` segment, standing in for ``bert.pooler``: `[CLS]` (B, d) -> logits (B, C) (the classifier
    after it is the identity)."""

    def forward(self, cls):
        """(B, d) -> (B, C)."""
        return self.run(cls=cls)[0]


class OrtSequenceClassifier(EATForSequenceClassification):
    """An EAT sequence classifier whose segments run in ONNX Runtime (built by :func:`build_ort_model`).

    Modifications: embeddings, layers, exit heads and the final head are ONNX Runtime sessions; the layer loop,
    exit rule, compaction and pruning are EATModel's own."""

    precision: str = "fp32"
    export_dir: Path | None = None


def build_ort_model(folder: str | Path, *, knobs: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None) -> OrtSequenceClassifier:
    """The ONNX Runtime model of an export folder (checksums verified), ``knobs`` applied over the exported ones."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if precision not in manifest["segments"]:
        raise ExportError(f"{folder}: exported at {', '.join(manifest['segments'])} only, not {precision}; "
                          f"export again with --precision {precision}")
    config = EATConfig.from_dict(manifest["config"])
    config.set_knobs(**(knobs or {}))
    check_exportable(config, f"{folder} with these knobs")
    segments = manifest["segments"][precision]
    with torch.device("meta"):  # the structure only; every module with weights is replaced below
        model = OrtSequenceClassifier(config)
    embeddings = OrtEmbeddings(make_session(folder / segments["embeddings"], threads))
    embeddings.max_positions = config.max_position_embeddings
    model.bert.embeddings = embeddings
    if len(segments["layers"]) != config.num_hidden_layers:
        raise ExportError(f"{folder}: {len(segments['layers'])} layer segments for a {config.num_hidden_layers}-layer "
                          "config; export again")
    model.bert.encoder.layer = nn.ModuleList(OrtLayer(make_session(folder / name, threads))
                                             for name in segments["layers"])
    width = config.hidden_size * (4 if config.exit_pooling == "pair" else 1)
    model.exit_heads = nn.ModuleDict({layer: OrtHead(make_session(folder / name, threads), width)
                                      for layer, name in segments["exit_heads"].items()})
    model.bert.pooler = OrtFinal(make_session(folder / segments["final"], threads))
    model.classifier = nn.Identity()
    model.dropout = nn.Identity()
    model.precision, model.export_dir = precision, folder
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:  # pragma: no cover - a module the runner forgot to replace
        raise ExportError(f"ONNX runner left modules without weights: {leftover[:3]}")
    return model.eval()


_EXPORT_CACHE: dict[str, Path] = {}


def load_onnx_model(path: str | Path, *, knobs: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None):
    """An :class:`~eat.deploy.InferenceModel` on ONNX Runtime from an export folder or a checkpoint (exported
    first, to a temporary folder reused within this process)."""
    from . import InferenceModel, _is_token_checkpoint, load_tokenizer
    from ..checkpoints import model_folder

    if precision not in ("fp32", "int8"):
        raise ExportError(f"precision {precision!r} has no ONNX Runtime form here; use fp32 or int8")
    require_onnxruntime()
    path = Path(path)
    if (path / "manifest.json").is_file():
        folder = path
    else:
        model_dir = model_folder(path)
        if _is_token_checkpoint(model_dir):
            raise ExportError(f"{path}: a token classification model; those run on backend torch only")
        from ..checkpoints import read_config_dict

        # the knobs must have an ONNX form before anything is exported (the checkpoint's own, then the caller's)
        probe = EATConfig.from_dict(read_config_dict(str(model_dir)))
        probe.set_knobs(**(knobs or {}))
        check_exportable(probe, f"{path} with these knobs")
        key = str(model_dir.resolve())
        if key not in _EXPORT_CACHE:
            # both precisions at once (a benchmark's peers want both); the window knob is off in the export (the
            # check above refused a window the caller keeps); the caller's knobs are applied to the runner
            exported = Path(tempfile.mkdtemp(prefix="eat-onnx-"))
            export_checkpoint(model_dir, exported, precisions=("fp32", "int8"), knobs={"attention_window": None},
                              force=True)
            atexit.register(shutil.rmtree, exported, True)  # sessions hold their graphs; the files can go
            _EXPORT_CACHE[key] = exported
        folder = _EXPORT_CACHE[key]
    model = build_ort_model(folder, knobs=knobs, precision=precision, threads=threads)
    tokenizer = load_tokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    return InferenceModel(model=model, config=model.config, tokenizer=tokenizer, precision=precision,
                          backend="onnxruntime")


__all__ = ["OrtSequenceClassifier", "build_ort_model", "load_onnx_model", "make_session"]
