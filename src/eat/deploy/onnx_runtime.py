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

A sentence model's call in which nothing adaptive can happen (:func:`runs_static`: no row can leave early, every
keep ratio 1.0, no window, no exit logits asked for) runs the export's whole-model graph (``model.onnx``, the
static model as one session) instead of the segments, when the export has one and ``whole_graph=True`` (the
default): the same function without a session call per layer. Decided per call from the config as it is then, so
knobs set after loading and ``disable_exit`` are honoured. The whole session is opened when the model is built if
its knobs are static then, else at the first static call.

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
import torch.nn.functional as F
from torch import nn

from ..configuration_eat import EATConfig
from ..modeling_eat import (EATForSequenceClassification, EATForTokenClassification, EATSequenceClassifierOutput,
                            WorkCounters, _early_exit_enabled, exit_head_width)
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
    """A module that runs one ONNX Runtime session: torch tensors in, torch tensors out (no copy out). ``calls``
    counts its session runs (which sessions served a call, for tests and profiles)."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_names = {node.name for node in session.get_inputs()}
        self.calls = 0

    def run(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        """Feed the named inputs the graph has (an input the export pruned, e.g. unused token types, is skipped)."""
        arrays = {name: np.ascontiguousarray(value.detach().numpy()) for name, value in feeds.items()
                  if name in self.input_names}
        self.calls += 1
        return [torch.from_numpy(array) for array in self.session.run(None, arrays)]


def _check_positions(n: int, limit: int) -> None:
    """ValueError when an input of ``n`` tokens is longer than the model's position limit."""
    if n > limit:
        raise ValueError(f"input of {n} tokens is longer than the model's position limit "
                         f"({limit}); truncate it (the tokenizer's max_length) first")


class OrtEmbeddings(_Segment):
    """``embeddings`` segment: (B, n) ids (and token types) -> (B, n, d)."""

    def forward(self, input_ids, token_type_ids=None):
        """(B, n) ids and token types (None = all 0) -> (B, n, d); refuses inputs past the position limit."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        _check_positions(input_ids.shape[1], self.max_positions)
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


class OrtWholeModel(_Segment):
    """The whole-model graph (``model.onnx``): the static sentence model as one session."""

    def forward(self, input_ids, attention_mask, token_type_ids):
        """input_ids, attention_mask (1 real, 0 padding), token_type_ids: (B, n) -> logits (B, C) float32."""
        return self.run(input_ids=input_ids.long(), attention_mask=attention_mask.long(),
                        token_type_ids=token_type_ids.long())[0]


def runs_static(config: EATConfig, *, training: bool = False, disable_exit: bool = False,
                output_exit_logits: bool = False) -> bool:
    """Whether a sentence model's pass under ``config`` computes exactly the static model: no exit head's logits
    asked for (only the final head runs), no row can leave before the last layer (the model's own rule,
    ``_early_exit_enabled``, or ``exit_layers=None``: no head but the final one), every keep ratio 1.0 (so no
    pruning and no merging) and no attention window.

    Checked on every call of an ONNX Runtime runner that has a whole graph, the adaptive ones included: the
    tests are ordered so that an exiting model is told no after a few config reads."""
    if training or output_exit_logits:
        return False
    if _early_exit_enabled(config, training, disable_exit) and config.exit_layers is not None:
        return False  # rows may leave early
    return config.attention_window is None and min(config.keep_schedule) == 1.0


class OrtSequenceClassifier(EATForSequenceClassification):
    """An EAT sequence classifier whose segments run in ONNX Runtime (built by :func:`build_ort_model`).

    Modifications: embeddings, layers, exit heads and the final head are ONNX Runtime sessions; the layer loop,
    exit rule, compaction and pruning are EATModel's own. A call in which nothing adaptive can happen
    (:func:`runs_static`) runs the export's whole-model graph instead, when it has one (``whole_graph``)."""

    precision: str = "fp32"
    export_dir: Path | None = None
    fused: _FusedLogits | None = None

    def __init__(self, config: EATConfig):
        super().__init__(config)
        # the whole-model session (an OrtWholeModel once opened), and the export file and threads it opens from
        self.whole_graph: OrtWholeModel | None = None
        self.whole_graph_file: Path | None = None
        self.whole_graph_threads: int | None = None

    def _head(self, layer: int, hidden, state):
        """The head's logits (B, C): those its fused layer session computed for ``hidden``, else its own session."""
        logits = None if self.fused is None else self.fused.take(layer, hidden)
        return logits if logits is not None else super()._head(layer, hidden, state)

    def open_whole_graph(self) -> OrtWholeModel | None:
        """The whole-model session, opened now if it is not yet (None when the export has no whole graph or the
        runner was built with ``whole_graph=False``)."""
        if self.whole_graph is None and self.whole_graph_file is not None:
            self.whole_graph = OrtWholeModel(make_session(self.whole_graph_file, self.whole_graph_threads))
        return self.whole_graph

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *,
                output_exit_logits: bool = False, disable_exit: bool = False, on_exit=None, **unused):
        """As :meth:`EATForSequenceClassification.forward`; a call :func:`runs_static` allows runs the whole-model
        session (when there is one), the others the segments under EAT's layer loop."""
        if self._whole_graph_serves(output_exit_logits, disable_exit):
            return self._static_forward(input_ids, attention_mask, token_type_ids, labels, on_exit)
        return super().forward(input_ids, attention_mask, token_type_ids, labels,
                               output_exit_logits=output_exit_logits, disable_exit=disable_exit, on_exit=on_exit,
                               **unused)

    def _whole_graph_serves(self, output_exit_logits: bool, disable_exit: bool) -> bool:
        """Whether this call runs the whole-model session: there is one, nothing adaptive can happen
        (:func:`runs_static`), and the exit heads have the width the pooling knob reads (else the segmented
        forward raises its error about them, as it does without a whole graph)."""
        if self.whole_graph_file is None or not runs_static(self.config, training=self.training,
                                                            disable_exit=disable_exit,
                                                            output_exit_logits=output_exit_logits):
            return False
        width = exit_head_width(self.config)
        return all(head.dense.in_features == width for head in self.exit_heads.values())

    def _static_forward(self, input_ids, attention_mask, token_type_ids, labels,
                        on_exit) -> EATSequenceClassifierOutput:
        """One call of the whole-model session, with the outputs the layer loop gives with exits off: every row
        ran every layer with all its real tokens, only the final head ran. input_ids etc.: (B, n)."""
        self._check_exit_heads()  # the segmented forward's check: exit_layers naming layers without a head
        config, whole = self.config, self.open_whole_graph()
        B, n = input_ids.shape
        L = config.num_hidden_layers
        _check_positions(n, config.max_position_embeddings)
        # the loop's own input checks (right padding, no empty row) and real lengths (B,)
        lengths = self.bert._initial_state(input_ids, attention_mask, config.keep_schedule, token_type_ids).lengths
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        logits = whole(input_ids, attention_mask, token_type_ids)  # (B, C)
        exit_layer = torch.full((B,), L, dtype=torch.long)
        tokens_per_layer = lengths[:, None].expand(B, L).clone()  # (B, L): no token left in any layer
        # the counters the layer loop keeps: L layers on (B, n) padded slots with B n^2 scores each, one head per row
        work = WorkCounters(padded_token_layers=L * B * n, attention_scores=L * B * n * n, exit_head_rows=B)
        work.finish(tokens_per_layer, exit_layer)
        if on_exit is not None:  # the last layer answers every row (a server delivers its answers here)
            on_exit(L, torch.arange(B), logits, lengths)
        loss = None
        if labels is not None:  # as the segmented forward: MSE for one regression output, else cross-entropy
            loss = (F.mse_loss(logits[:, 0], labels.to(logits.dtype)) if self.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return EATSequenceClassifierOutput(loss=loss, logits=logits, exit_layer=exit_layer,
                                           tokens_per_layer=tokens_per_layer, exit_logits=None,
                                           exit_layers=config.exit_layer_list, work=work)


class OrtTokenClassifier(EATForTokenClassification):
    """An EAT token classifier whose segments run in ONNX Runtime (built by :func:`build_ort_model`).

    Modifications: embeddings, both forms of every layer (dense rows and compacted queries), the token exit
    heads and the final classifier are ONNX Runtime sessions; the token loop (token exits, compaction, pruning)
    is EATForTokenClassification's own."""

    precision: str = "fp32"
    export_dir: Path | None = None


def build_ort_model(folder: str | Path, *, knobs: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None, fuse_heads: bool = True,
                    whole_graph: bool = True) -> OrtSequenceClassifier | OrtTokenClassifier:
    """The ONNX Runtime model of an export folder (checksums verified), ``knobs`` applied over the exported ones:
    an :class:`OrtSequenceClassifier`, or an :class:`OrtTokenClassifier` for a token model's export.
    fuse_heads: run each sentence layer with its head as one session where the export has that graph and its
    pooling is the one the knobs ask for. whole_graph: run calls in which nothing adaptive can happen
    (:func:`runs_static`) on the export's whole-model graph where it has one (exports made before it existed do
    not); False runs every call on the segments (e.g. to time both)."""
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
        if whole_graph and "whole" in segments:
            model.whole_graph_file, model.whole_graph_threads = folder / segments["whole"], threads
            if runs_static(config):  # static knobs: open it now, not in the first (maybe timed) call
                model.open_whole_graph()
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
                    threads: int | None = None, token_level: bool | None = None, whole_graph: bool = True):
    """An :class:`~eat.deploy.InferenceModel` on ONNX Runtime from an export folder or a checkpoint (exported
    first, to a temporary folder reused within this process). token_level: export a checkpoint as a token
    classification model (default: what it says it is); an export folder says what it holds. whole_graph: see
    :func:`build_ort_model` (False: segments only)."""
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
    model = build_ort_model(folder, knobs=knobs, precision=precision, threads=threads, whole_graph=whole_graph)
    if token_level is not None and token_level != isinstance(model, EATForTokenClassification):
        raise ExportError(f"{folder}: holds a {'token' if not token_level else 'sentence'} classification model, "
                          f"not the {'token' if token_level else 'sentence'} model asked for")
    tokenizer = load_tokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    return InferenceModel(model=model, config=model.config, tokenizer=tokenizer, precision=precision,
                          backend="onnxruntime", token_level=isinstance(model, EATForTokenClassification))


__all__ = ["OrtSequenceClassifier", "OrtTokenClassifier", "OrtWholeModel", "build_ort_model", "load_onnx_model",
           "make_session", "runs_static"]
