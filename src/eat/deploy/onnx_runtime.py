"""Run ONNX segments (:mod:`eat.deploy.onnx_export`) in ONNX Runtime with EAT's own exit, compaction and pruning.

The runner is an :class:`~eat.modeling_eat.EATForSequenceClassification` (or, for a token model's export, an
:class:`~eat.modeling_eat.EATForTokenClassification`) whose embeddings, layers, exit heads and final head are
replaced by modules that call ONNX Runtime sessions. The task model's own layer loop (exit decisions, exited
rows or tokens leaving, padding trimmed, tokens pruned or merged, compacted queries) runs unchanged between the
segments, so both backends share one implementation of every mechanism.

A sentence model's layer followed by a `[CLS]`- or mean-pooled head runs as one session (``layer_head_<i>``,
``fuse_heads=True``, the default): the layer module keeps that head's logits for the hidden states it returned,
and the model's head reads them instead of calling the head's own session. Pair-pooled heads, and a pooling
knob other than the exported one, use the separate head sessions.

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
from ..modeling_eat import EATForSequenceClassification, EATForTokenClassification
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


def _key_bias(mask, B: int, n: int):
    """The segments' additive key bias (B, n) from an SDPA mask: None (all real), bool (B, 1, 1, n) (True =
    attend) or float additive (B, 1, 1, n). A mask that differs per query (a window band) has no such form."""
    if mask is None:
        return torch.zeros(B, n)
    if mask.shape[2] != 1:  # refused at load (attention_window); a guard against knobs set afterwards
        raise ExportError("attention_window cannot run on the ONNX Runtime backend")
    if mask.dtype == torch.bool:
        return torch.zeros(B, n).masked_fill(~mask[:, 0, 0], float("-inf"))
    return mask[:, 0, 0].float()


class OrtLayer(_Segment):
    """``layer_<i>`` segment, called as ``EATLayer`` is: (hidden, ctx) -> (hidden, q, k, scores computed).

    q is the `[CLS]` query only (B, H, 1, dh): all that `cls_attention` pruning reads. A token model's layer
    graph returns hidden alone (q and k are then None: its pruning reads norms)."""

    def forward(self, hidden, ctx):
        """hidden (B, n, d) and the batch's attention context -> (hidden, q_cls, k, attention scores computed)."""
        if ctx.radius is not None:  # refused at load; a guard against knobs set on the config afterwards
            raise ExportError("attention_window cannot run on the ONNX Runtime backend")
        B, n, _ = hidden.shape
        outputs = self.run(hidden=hidden, key_bias=_key_bias(ctx.dense_mask, B, n))
        q_cls, k = outputs[1:3] if len(outputs) == 3 else (None, None)
        return outputs[0], q_cls, k, B * n * n


class _FusedLogits:
    """The logits a fused layer + head session computed, kept for the head call that follows the layer: which
    layer, the hidden states (B, n, d) the layer returned (the head must be asked about these very tensors) and
    the logits (B, C)."""

    def __init__(self):
        self.layer, self.hidden, self.logits = 0, None, None

    def take(self, layer: int, hidden):
        """The kept logits when they belong to ``layer`` and ``hidden`` (then forgotten), else None."""
        if self.layer != layer or self.hidden is not hidden:
            return None
        logits = self.logits
        self.layer, self.hidden, self.logits = 0, None, None
        return logits


class OrtLayerHead(OrtLayer):
    """``layer_head_<i>`` segment, called as ``EATLayer`` is: runs the layer and the head after it in one
    session, returns what :class:`OrtLayer` returns and keeps the head's logits in ``fused`` for the model."""

    def __init__(self, session, fused: _FusedLogits, number: int):
        super().__init__(session)
        self.fused, self.number = fused, number

    def forward(self, hidden, ctx):
        """hidden (B, n, d) and the batch's attention context -> (hidden, q_cls, k, attention scores computed)."""
        if ctx.radius is not None:  # refused at load; a guard against knobs set on the config afterwards
            raise ExportError("attention_window cannot run on the ONNX Runtime backend")
        B, n, _ = hidden.shape
        hidden, q_cls, k, logits = self.run(hidden=hidden, key_bias=_key_bias(ctx.dense_mask, B, n))
        self.fused.layer, self.fused.hidden, self.fused.logits = self.number, hidden, logits
        return hidden, q_cls, k, B * n * n


class OrtTokenLayer(OrtLayer):
    """A token model's layer: ``layer_<i>`` for dense rows (``forward``, as :class:`OrtLayer`) and
    ``query_layer_<i>`` for the compacted queries of rows whose tokens have partly left (``forward_queries``,
    as ``EATLayer.forward_queries``)."""

    def __init__(self, session, query_session):
        super().__init__(session)
        self.queries = _Segment(query_session)

    def forward_queries(self, queries, keys_values, mask=None):
        """queries (B, m, d) attend to keys_values (B, nk, d) under mask (None or bool (B, 1, 1, nk), True =
        attend) -> the queries' new states (B, m, d)."""
        B, nk, _ = keys_values.shape
        return self.queries.run(queries=queries, keys_values=keys_values, key_bias=_key_bias(mask, B, nk))[0]


class OrtTokenHead(_Segment):
    """A token model's ``exit_<i>`` or ``final`` segment: every token's state (B, m, d) -> logits (B, m, C)."""

    def forward(self, hidden):
        """(B, m, d) -> (B, m, C)."""
        return self.run(hidden=hidden)[0]


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
    fused: _FusedLogits | None = None

    def _head(self, layer: int, hidden, state):
        """The head's logits (B, C): those its fused layer session computed for ``hidden``, else its own session."""
        logits = None if self.fused is None else self.fused.take(layer, hidden)
        return logits if logits is not None else super()._head(layer, hidden, state)


class OrtTokenClassifier(EATForTokenClassification):
    """An EAT token classifier whose segments run in ONNX Runtime (built by :func:`build_ort_model`).

    Modifications: embeddings, both forms of every layer (dense rows and compacted queries), the token exit
    heads and the final classifier are ONNX Runtime sessions; the token loop (token exits, compaction, pruning)
    is EATForTokenClassification's own."""

    precision: str = "fp32"
    export_dir: Path | None = None


def build_ort_model(folder: str | Path, *, knobs: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None, fuse_heads: bool = True) -> OrtSequenceClassifier | OrtTokenClassifier:
    """The ONNX Runtime model of an export folder (checksums verified), ``knobs`` applied over the exported ones:
    an :class:`OrtSequenceClassifier`, or an :class:`OrtTokenClassifier` for a token model's export.
    fuse_heads: run each sentence layer with its head as one session where the export has that graph and its
    pooling is the one the knobs ask for."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if precision not in manifest["segments"]:
        raise ExportError(f"{folder}: exported at {', '.join(manifest['segments'])} only, not {precision}; "
                          f"export again with --precision {precision}")
    kind = manifest.get("model", "sequence")  # exports made before token models had no "model" entry
    config = EATConfig.from_dict(manifest["config"])
    config.set_knobs(**(knobs or {}))
    check_exportable(config, f"{folder} with these knobs", kind)
    segments = manifest["segments"][precision]
    if len(segments["layers"]) != config.num_hidden_layers:
        raise ExportError(f"{folder}: {len(segments['layers'])} layer segments for a {config.num_hidden_layers}-layer "
                          "config; export again")

    def session(name: str):
        """The session of the segment file ``name`` of this export."""
        return make_session(folder / name, threads)

    with torch.device("meta"):  # the structure only; every module with weights is replaced below
        model = (OrtTokenClassifier if kind == "token" else OrtSequenceClassifier)(config)
    embeddings = OrtEmbeddings(session(segments["embeddings"]))
    embeddings.max_positions = config.max_position_embeddings
    model.bert.embeddings = embeddings
    if kind == "token":
        model.bert.encoder.layer = nn.ModuleList(OrtTokenLayer(session(name), session(query_name))
                                                 for name, query_name in zip(segments["layers"],
                                                                             segments["query_layers"]))
        model.exit_heads = nn.ModuleDict({layer: OrtTokenHead(session(name))
                                          for layer, name in segments["exit_heads"].items()})
        model.classifier = OrtTokenHead(session(segments["final"]))
    else:
        model.bert.encoder.layer = nn.ModuleList(_sentence_layers(config, manifest, segments, session, model,
                                                                  fuse_heads))
        width = config.hidden_size * (4 if config.exit_pooling == "pair" else 1)
        model.exit_heads = nn.ModuleDict({layer: OrtHead(session(name), width)
                                          for layer, name in segments["exit_heads"].items()})
        model.bert.pooler = OrtFinal(session(segments["final"]))
        model.classifier = nn.Identity()
    model.dropout = nn.Identity()
    model.precision, model.export_dir = precision, folder
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:  # pragma: no cover - a module the runner forgot to replace
        raise ExportError(f"ONNX runner left modules without weights: {leftover[:3]}")
    return model.eval()


def _sentence_layers(config: EATConfig, manifest: dict[str, Any], segments: dict[str, Any], session,
                     model: OrtSequenceClassifier, fuse_heads: bool) -> list[OrtLayer]:
    """A sentence runner's layer modules: the fused layer + head session where the export has one whose pooling
    is the one the head after that layer reads now (`[CLS]` for the final head, ``exit_pooling`` for exit
    heads), the plain layer session elsewhere."""
    fused = segments.get("layer_heads", {}) if fuse_heads else {}
    exported_pooling = manifest.get("fused_pooling", {})
    model.fused = _FusedLogits()
    layers: list[OrtLayer] = []
    for number, name in enumerate(segments["layers"], start=1):
        wanted = "cls" if number == config.num_hidden_layers else config.exit_pooling
        key = str(number)
        if key in fused and exported_pooling.get(key) == wanted:
            layers.append(OrtLayerHead(session(fused[key]), model.fused, number))
        else:
            layers.append(OrtLayer(session(name)))
    return layers


_EXPORT_CACHE: dict[str, Path] = {}


def load_onnx_model(path: str | Path, *, knobs: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None, token_level: bool | None = None):
    """An :class:`~eat.deploy.InferenceModel` on ONNX Runtime from an export folder or a checkpoint (exported
    first, to a temporary folder reused within this process). token_level: export a checkpoint as a token
    classification model (default: what it says it is); an export folder says what it holds."""
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
        token = _is_token_checkpoint(model_dir) if token_level is None else token_level
        from ..checkpoints import read_config_dict

        # the knobs must have an ONNX form before anything is exported (the checkpoint's own, then the caller's)
        probe = EATConfig.from_dict(read_config_dict(str(model_dir)))
        probe.set_knobs(**(knobs or {}))
        check_exportable(probe, f"{path} with these knobs", "token" if token else "sequence")
        key = f"{model_dir.resolve()}:{'token' if token else 'sequence'}"
        if key not in _EXPORT_CACHE:
            # both precisions at once (a benchmark's peers want both); the window knob is off in the export (the
            # check above refused a window the caller keeps); the caller's knobs are applied to the runner
            exported = Path(tempfile.mkdtemp(prefix="eat-onnx-"))
            export_checkpoint(model_dir, exported, precisions=("fp32", "int8"), knobs={"attention_window": None},
                              force=True, token_level=token)
            atexit.register(shutil.rmtree, exported, True)  # sessions hold their graphs; the files can go
            _EXPORT_CACHE[key] = exported
        folder = _EXPORT_CACHE[key]
    model = build_ort_model(folder, knobs=knobs, precision=precision, threads=threads)
    if token_level is not None and token_level != isinstance(model, EATForTokenClassification):
        raise ExportError(f"{folder}: holds a {'token' if not token_level else 'sentence'} classification model, "
                          f"not the {'token' if token_level else 'sentence'} model asked for")
    tokenizer = load_tokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    return InferenceModel(model=model, config=model.config, tokenizer=tokenizer, precision=precision,
                          backend="onnxruntime", token_level=isinstance(model, EATForTokenClassification))


__all__ = ["OrtSequenceClassifier", "OrtTokenClassifier", "build_ort_model", "load_onnx_model", "make_session"]
