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

A sentence model's call in which nothing adaptive can happen (:func:`runs_static`: no row can leave early, no
``exit_depth`` cap below the last layer, every keep ratio 1.0, no window, no exit logits asked for) runs the
export's whole-model graph (``model.onnx``, the static model as one session) instead of the segments, when the
export has one and ``whole_graph=True`` (the default): the same function without a session call per layer.
Decided per call from the config as it is then, so knobs set after loading and ``disable_exit`` are honoured.
The whole session is opened when the model is built if its knobs are static then, else at the first static call.

Sessions: all graph optimisations, ``intra_op_num_threads`` = torch's thread count, one inter-op thread, and
thread spinning off (``session.intra_op.allow_spinning = 0``): when ORT shares a process with PyTorch (the
benchmark times both, interleaved), spinning threads steal the cores of the next call.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_eat import KNOB_DEFAULTS, EATConfig
from ..modeling_eat import (EATForSequenceClassification, EATForTokenClassification, EATSequenceClassifierOutput,
                            EMPTY_ROW, NOT_RIGHT_PADDED, WorkCounters, _early_exit_enabled, exit_head_width,
                            pass_depth)
from .onnx_export import ExportError, check_exportable, export_checkpoint, read_manifest, require_onnxruntime


def make_session(path: Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session for one segment file, or a serialized model (spinning off, torch's thread
    count)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


class _Segment(nn.Module):
    """A module that runs one ONNX Runtime session: torch tensors in, torch tensors out (no copy out). ``calls``
    counts its session runs (which sessions served a call, for tests and profiles)."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_names = {node.name for node in session.get_inputs()}
        self.calls = 0

    def run(self, outputs: list[str] | None = None, **feeds: torch.Tensor) -> list[torch.Tensor]:
        """Feed the named inputs the graph has (an input the export pruned, e.g. unused token types, is skipped);
        returns the graph's ``outputs`` (None: all of them)."""
        arrays = {name: np.ascontiguousarray(value.detach().numpy()) for name, value in feeds.items()
                  if name in self.input_names}
        self.calls += 1
        return [torch.from_numpy(array) for array in self.session.run(outputs, arrays)]


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

    q is the `[CLS]` query only (B, H, 1, dh): all that `cls_attention` pruning reads, asked of the session
    only when pruning follows this layer (``pruning``, set per call by the runner: its keep ratio for layer
    ``number`` below 1.0; else q and k are None, and a batch of 32 is spared copying its keys out). A token
    model's layer graph returns hidden alone (q and k are then None: its pruning reads norms)."""

    pruning: "_PruningLayers | None" = None  # set by build_ort_model on sentence runners
    number: int = 0  # 1-based

    def _outputs(self, *extra: str) -> list[str] | None:
        """The session outputs to fetch: all when pruning after this layer reads q and k (or the runner did not
        say), else hidden (and ``extra``)."""
        layers = None if self.pruning is None else self.pruning.layers
        if layers is None or layers[self.number - 1]:
            return None
        return ["hidden_out", *extra]

    def forward(self, hidden, ctx):
        """hidden (B, n, d) and the batch's attention context -> (hidden, q_cls, k, attention scores computed)."""
        if ctx.radius is not None:  # refused at load; a guard against knobs set on the config afterwards
            raise ExportError("attention_window cannot run on the ONNX Runtime backend")
        B, n, _ = hidden.shape
        outputs = self.run(self._outputs(), hidden=hidden, key_bias=_key_bias(ctx.dense_mask, B, n))
        q_cls, k = outputs[1:3] if len(outputs) == 3 else (None, None)
        return outputs[0], q_cls, k, B * n * n


class _PruningLayers:
    """Which layers pruning follows in the current call (``layers[i]``: after layer i + 1; None: unknown, fetch
    q and k everywhere), set by the runner per call from its cached plan: the layers read it instead of the
    config, whose keep schedule costs microseconds per read."""

    def __init__(self):
        self.layers: tuple[bool, ...] | None = None


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
        names = self._outputs("logits")
        outputs = self.run(names, hidden=hidden, key_bias=_key_bias(ctx.dense_mask, B, n))
        hidden, logits = outputs[0], outputs[-1]
        q_cls, k = (outputs[1], outputs[2]) if names is None else (None, None)
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


class OrtCascade(_Segment):
    """The exit cascade graph (:mod:`eat.deploy.onnx_cascade`): a batch-1 input through every layer it needs,
    the exit rule included, in one session call. Inputs input_ids, token_type_ids (1, n) int64, key_bias (1, n)
    float32, exit_threshold and entropy_threshold () float32; outputs logits (1, C), exit_layer (1,) int64. The
    runner feeds its session numpy arrays directly (``OrtSequenceClassifier._cascade_forward``)."""


class OrtWholeModel(_Segment):
    """The whole-model graph (``model.onnx``): the static sentence model as one session. Inputs input_ids,
    attention_mask (1 real, 0 padding), token_type_ids (B, n) int64; output logits (B, C) float32. The runner
    feeds its session numpy arrays directly (``OrtSequenceClassifier._static_forward``)."""


def runs_static(config: EATConfig, *, training: bool = False, disable_exit: bool = False,
                output_exit_logits: bool = False) -> bool:
    """Whether a sentence model's pass under ``config`` computes exactly the static model: no exit head's logits
    asked for (only the final head runs), no row can leave before the last layer (the model's own rule,
    ``_early_exit_enabled``, or ``exit_layers=None``: no head but the final one; nor an ``exit_depth`` cap below
    the last layer, which answers every row with an exit head), every keep ratio 1.0 (so no pruning and no
    merging) and no attention window.

    Checked on every call of an ONNX Runtime runner that has a whole graph, the adaptive ones included: the
    tests are ordered so that an exiting model is told no after a few config reads."""
    if training or output_exit_logits:
        return False
    if _early_exit_enabled(config, training, disable_exit) and config.exit_layers is not None:
        return False  # rows may leave early
    if pass_depth(config, disable_exit=disable_exit) < config.num_hidden_layers:
        return False  # every row leaves at exit_depth, by its exit head
    return config.attention_window is None and min(config.keep_schedule) == 1.0


class OrtSequenceClassifier(EATForSequenceClassification):
    """An EAT sequence classifier whose segments run in ONNX Runtime (built by :func:`build_ort_model`).

    Modifications: embeddings, layers, exit heads and the final head are ONNX Runtime sessions; the layer loop,
    exit rule, compaction and pruning are EATModel's own. A call in which nothing adaptive can happen
    (:func:`runs_static`) runs the export's whole-model graph instead, when it has one (``whole_graph``). A
    batch-1 call with exits on runs the exit cascade graph (:mod:`eat.deploy.onnx_cascade`: the layers, heads
    and exit rule as one session with ``If`` nodes) when the knobs allow it (``cascade``)."""

    precision: str = "fp32"
    export_dir: Path | None = None
    fused: _FusedLogits | None = None

    def __init__(self, config: EATConfig):
        super().__init__(config)
        # the whole-model session (an OrtWholeModel once opened) and the export file it opens from; the threads of
        # every session opened after load (the whole graph, cascades)
        self.whole_graph: OrtWholeModel | None = None
        self.whole_graph_file: Path | None = None
        self.session_threads: int | None = None
        # the exit cascade: on or off, the export's manifest, and the sessions built so far by the knobs baked
        # into them (exit layers, policy, patience, pooling, depth cap); None where the knobs have no cascade
        self.cascade_enabled = False
        self.manifest: dict[str, Any] | None = None
        self.cascades: dict[tuple, OrtCascade | None] = {}
        self.plans: dict[tuple, _FastPlan] = {}  # by the knobs' raw values (see _plan)
        self.pruning = _PruningLayers()  # shared with the layers (OrtLayer._outputs)

    def _head(self, layer: int, hidden, state):
        """The head's logits (B, C): those its fused layer session computed for ``hidden``, else its own session."""
        logits = None if self.fused is None else self.fused.take(layer, hidden)
        return logits if logits is not None else super()._head(layer, hidden, state)

    def open_whole_graph(self) -> OrtWholeModel | None:
        """The whole-model session, opened now if it is not yet (None when the export has no whole graph or the
        runner was built with ``whole_graph=False``)."""
        if self.whole_graph is None and self.whole_graph_file is not None:
            self.whole_graph = OrtWholeModel(make_session(self.whole_graph_file, self.session_threads))
        return self.whole_graph

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *,
                output_exit_logits: bool = False, disable_exit: bool = False, on_exit=None, **unused):
        """As :meth:`EATForSequenceClassification.forward`; a call :func:`runs_static` allows runs the whole-model
        session (when there is one), a batch-1 call with exits on the cascade session (when the knobs have one),
        the others the segments under EAT's layer loop."""
        self.pruning.layers = None  # fetch q and k everywhere unless the plan says where pruning follows
        if not self.training and not output_exit_logits:
            plan = self._plan(disable_exit)
            if plan.whole is not None:
                return self._static_forward(plan, input_ids, attention_mask, token_type_ids, labels, on_exit)
            if plan.cascade is not None and input_ids.shape[0] == 1:
                return self._cascade_forward(plan, input_ids, attention_mask, token_type_ids, labels, on_exit)
            self.pruning.layers = plan.prunes_after
        with torch.inference_mode(), single_threaded_torch(input_ids.shape[0] > 1):
            return super().forward(input_ids, attention_mask, token_type_ids, labels,
                                   output_exit_logits=output_exit_logits, disable_exit=disable_exit,
                                   on_exit=on_exit, **unused)

    def _plan(self, disable_exit: bool) -> "_FastPlan":
        """Which single-session path serves an inference call under the knobs as they are now (cached by the knobs'
        raw values: reading a transformers config attribute costs microseconds, a batch-1 call is ~1 ms)."""
        raw = self.config.__dict__
        key = (disable_exit, *map(raw.get, _KNOB_NAMES))
        try:
            plan = self.plans.get(key)
        except TypeError:  # a list-valued knob (keep ratios or exit layers per layer)
            key = tuple(_frozen(value) for value in key)
            plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._make_plan(disable_exit)
        return plan

    def _make_plan(self, disable_exit: bool) -> "_FastPlan":
        """The :class:`_FastPlan` of the current knobs: the whole graph when nothing adaptive can happen
        (:func:`runs_static`) and the exit heads have the width the pooling knob reads (else the segmented forward
        raises its error about them, as it does without a whole graph); else the cascade when exits are on and the
        knobs have one (batch-1 calls only)."""
        self._check_exit_heads()  # the segmented forward's check: exit_layers naming layers without a head
        config = self.config
        depth = pass_depth(config, disable_exit=disable_exit)
        # pruning never follows the last layer a pass runs (the layer loop skips it there): q, k not fetched
        plan = _FastPlan(layers=config.num_hidden_layers, depth=depth, exit_layers=config.exit_layer_list,
                         prunes_after=tuple(ratio < 1.0 and number < depth
                                            for number, ratio in enumerate(config.keep_schedule, start=1)),
                         pair=config.exit_pooling == "pair",
                         max_positions=config.max_position_embeddings,
                         exit_threshold=np.array(config.exit_threshold, dtype=np.float32),
                         entropy_threshold=np.array(config.entropy_threshold, dtype=np.float32))
        width = exit_head_width(config)
        if (self.whole_graph_file is not None and runs_static(config, disable_exit=disable_exit)
                and all(head.dense.in_features == width for head in self.exit_heads.values())):
            plan.whole = self.open_whole_graph()
        elif (self.cascade_enabled and _early_exit_enabled(config, False, disable_exit)
              and config.exit_layers is not None):
            plan.cascade = self.open_cascade()
        return plan

    def _cascade_key(self) -> tuple:
        """What a cascade graph bakes in from the config (the thresholds are its inputs); the depth cap as the
        layers the graph runs (None and the model's depth build the same graph)."""
        config = self.config
        return (config.exit_layer_list, config.exit_policy, config.exit_patience, config.exit_pooling,
                config.keep_schedule, config.attention_window, pass_depth(config))

    def open_cascade(self) -> OrtCascade | None:
        """The cascade session for the knobs as they are now, built on first use (None when the knobs have no
        cascade form, see :func:`~eat.deploy.onnx_cascade.cascade_unsupported`, or it is switched off)."""
        if not self.cascade_enabled or self.manifest is None:
            return None
        key = self._cascade_key()
        if key not in self.cascades:
            from .onnx_cascade import build_cascade, cascade_unsupported

            cascade = None
            if cascade_unsupported(self.config, self.manifest, self.precision) is None:
                graph = build_cascade(self.export_dir, self.manifest, self.precision, self.config)
                cascade = OrtCascade(make_session(graph, self.session_threads))
            self.cascades[key] = cascade
        return self.cascades[key]

    # The single-session paths below do all their torch work (output tensors, the output object) BEFORE the
    # session call and only numpy copies after it: an ONNX Runtime call of the int8 model leaves the CPU caches
    # cold, and right after it each torch op costs ~20 us and building the output object ~90 us (AMD EPYC Zen 5,
    # measured), against ~1 us warm; that was ~0.3 ms of a ~1-2 ms batch-1 call for the static model and EAT alike.

    def _cascade_forward(self, plan: "_FastPlan", input_ids, attention_mask, token_type_ids, labels,
                         on_exit) -> EATSequenceClassifierOutput:
        """One call of the cascade session for a batch of one row (1, n), with the outputs the layer loop gives:
        the exit layer, the real tokens that entered each layer it ran, and the counters of that many layers
        and heads."""
        ids, mask, types, lengths = _numpy_inputs(input_ids, attention_mask, token_type_ids, plan.max_positions)
        B, n = ids.shape
        key_bias = np.zeros((B, n), dtype=np.float32)
        if mask is not None:
            key_bias[mask == 0] = -np.inf  # padding keys
        feeds = {"input_ids": ids, "token_type_ids": types, "key_bias": key_bias,
                 "exit_threshold": plan.exit_threshold, "entropy_threshold": plan.entropy_threshold}
        if plan.pair:  # the segment means' weights (1, 2, n), as the layer loop builds them
            feeds["pair_weights"] = _pair_weights(types, mask)
        output, logits, exit_layer, tokens_per_layer = self._prepared_output(plan, B)
        plan.cascade.calls += 1
        answer, layer = plan.cascade.session.run(None, feeds)  # (1, C), (1,)
        logits[:] = answer
        layers_run = int(layer[0])
        exit_layer[:] = layers_run
        tokens_per_layer[:, :layers_run] = lengths[:, None]  # (1, L): 0 in the layers the row skipped
        heads_read = sum(1 for number in plan.exit_layers if number <= layers_run)
        output["work"] = WorkCounters(layers_run=layers_run * B, token_layers=int(lengths.sum()) * layers_run,
                                      padded_token_layers=layers_run * B * n,
                                      attention_scores=layers_run * B * n * n, exit_head_rows=heads_read * B)
        return self._finish(output, lengths, labels, on_exit)

    def _prepared_output(self, plan: "_FastPlan", B: int):
        """(output object, numpy views of its logits (B, C), exit_layer (B,) and tokens_per_layer (B, L)) for
        a single-session call to fill in. exit_layer starts at the last layer the pass runs (``plan.depth``);
        tokens_per_layer is as wide as the model (L layers), zeros in the layers a row skipped."""
        logits = torch.empty(B, self.num_labels)
        exit_layer = torch.full((B,), plan.depth, dtype=torch.long)
        tokens_per_layer = torch.zeros(B, plan.layers, dtype=torch.long)
        output = _new_output(logits=logits, exit_layer=exit_layer, tokens_per_layer=tokens_per_layer,
                             exit_layers=plan.exit_layers)
        return output, logits.numpy(), exit_layer.numpy(), tokens_per_layer.numpy()

    def _finish(self, output: EATSequenceClassifierOutput, lengths, labels, on_exit) -> EATSequenceClassifierOutput:
        """Tell ``on_exit`` (every row answered at its exit layer; a single-session call answers them all at once)
        and add the loss as the segmented forward computes it (MSE for one regression output, else cross-entropy).
        lengths: (B,) real tokens per row."""
        if on_exit is not None:
            tokens, exit_layer = torch.from_numpy(lengths), output.exit_layer
            for layer in exit_layer.unique().tolist():
                rows = (exit_layer == layer).nonzero()[:, 0]
                on_exit(int(layer), rows, output.logits[rows], tokens[rows])
        if labels is not None:
            logits = output.logits
            output["loss"] = (F.mse_loss(logits[:, 0], labels.to(logits.dtype)) if self.num_labels == 1
                              else F.cross_entropy(logits, labels))
        return output

    def _static_forward(self, plan: "_FastPlan", input_ids, attention_mask, token_type_ids, labels,
                        on_exit) -> EATSequenceClassifierOutput:
        """One call of the whole-model session, with the outputs the layer loop gives with exits off: every row
        ran every layer with all its real tokens, only the final head ran. input_ids etc.: (B, n)."""
        ids, mask, types, lengths = _numpy_inputs(input_ids, attention_mask, token_type_ids, plan.max_positions)
        B, n = ids.shape
        L = plan.layers  # == plan.depth: a pass capped below L is never static (runs_static)
        output, logits, _, tokens_per_layer = self._prepared_output(plan, B)  # exit layer: L, as prepared
        tokens_per_layer[:] = lengths[:, None]  # (B, L): no token left in any layer
        # the counters the layer loop keeps: L layers on (B, n) padded slots with B n^2 scores each, one head per row
        output["work"] = WorkCounters(layers_run=L * B, token_layers=int(lengths.sum()) * L,
                                      padded_token_layers=L * B * n, attention_scores=L * B * n * n,
                                      exit_head_rows=B)
        plan.whole.calls += 1
        logits[:] = plan.whole.session.run(None, {
            "input_ids": ids, "attention_mask": np.ones((B, n), dtype=np.int64) if mask is None else mask,
            "token_type_ids": types})[0]  # (B, C)
        return self._finish(output, lengths, labels, on_exit)


def _numpy_inputs(input_ids, attention_mask, token_type_ids, max_positions: int):
    """The single-session paths' inputs as int64 numpy arrays (ids (B, n); mask (B, n) or None when absent or all
    real; token types (B, n), zeros when absent) and real lengths (B,), with the layer loop's input checks: the
    position limit, right padding, no empty row. In numpy, not torch: right after an ONNX Runtime call the caches
    are cold and each torch op costs ~20 us there (AMD EPYC Zen 5), several times a numpy op."""
    ids = _int64(input_ids)
    B, n = ids.shape
    _check_positions(n, max_positions)
    types = np.zeros((B, n), dtype=np.int64) if token_type_ids is None else _int64(token_type_ids)
    mask = None if attention_mask is None else _int64(attention_mask)
    if mask is None or mask.all():
        return ids, mask, types, np.full(B, n, dtype=np.int64)
    real = mask != 0
    lengths = real.sum(1)
    if not np.array_equal(real, np.arange(n)[None, :] < lengths[:, None]):
        raise ValueError(NOT_RIGHT_PADDED)
    if (lengths == 0).any():
        raise ValueError(EMPTY_ROW)
    return ids, mask, types, lengths.astype(np.int64)


def _pair_weights(types: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """:func:`~eat.modeling_eat.pair_pooling_weights` of a batch without merged tokens, in numpy: (B, 2, n) float32
    weights of each row's two segment means. types: (B, n) token type ids (0 or 1); mask: (B, n) (0 = padding) or
    None (all real). numpy because the torch version costs ~160 us on the caches a session call leaves cold (a
    pair-pooled STS-B cascade call, Zen 5), a few numpy ops a fraction of that."""
    weight = np.ones(types.shape, dtype=np.float32) if mask is None else (mask != 0).astype(np.float32)
    second = types.astype(np.float32)
    both = np.stack([weight * (1.0 - second), weight * second], axis=1)  # (B, 2, n)
    total = both.sum(-1, keepdims=True)  # (B, 2, 1)
    both = both / np.maximum(total, np.float32(1e-6))
    # a row without a second segment averages the first again (b = a)
    return np.where(total[:, 1:] > 0, both, both[:, :1]).astype(np.float32, copy=False)


def _int64(tensor) -> np.ndarray:
    """A CPU tensor (or array) as a contiguous int64 numpy array (no copy when it already is one)."""
    array = tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    return np.ascontiguousarray(array, dtype=np.int64)


_KNOB_NAMES = tuple(KNOB_DEFAULTS)
_OUTPUT_FIELDS = tuple(EATSequenceClassifierOutput.__dataclass_fields__)


def _new_output(**values) -> EATSequenceClassifierOutput:
    """An :class:`EATSequenceClassifierOutput` of ``values`` as its constructor builds it (attributes, and the
    non-None ones as items in field order), without transformers' ``ModelOutput.__post_init__`` checks: they
    cost ~50 us on the caches a session call leaves cold, and the fields here are known to be right."""
    output = EATSequenceClassifierOutput.__new__(EATSequenceClassifierOutput)
    for name in _OUTPUT_FIELDS:
        value = values.get(name)
        object.__setattr__(output, name, value)
        if value is not None:
            OrderedDict.__setitem__(output, name, value)
    return output


def _frozen(value):
    """A knob's raw value in a hashable form (lists, as set_knobs stores sequences, become tuples)."""
    return tuple(value) if isinstance(value, list) else value


@dataclass
class _FastPlan:
    """What a single-session call needs from the config, read once per set of knob values: the whole-model
    session (when nothing adaptive can happen), or the cascade session (batch-1 calls with exits on), neither
    (the segments serve every call), and the config values those paths read."""

    layers: int  # the model's depth L (the width of tokens_per_layer)
    depth: int  # the layers a pass runs: exit_depth when it applies, else L (pass_depth)
    exit_layers: tuple[int, ...]
    prunes_after: tuple[bool, ...]  # per layer: pruning or merging follows it (its q and k are read)
    pair: bool  # pair-pooled exit heads: the cascade reads pair_weights
    max_positions: int
    exit_threshold: np.ndarray  # () float32, as the cascade session reads it
    entropy_threshold: np.ndarray
    whole: OrtWholeModel | None = None
    cascade: OrtCascade | None = None


class OrtTokenClassifier(EATForTokenClassification):
    """An EAT token classifier whose segments run in ONNX Runtime (built by :func:`build_ort_model`).

    Modifications: embeddings, both forms of every layer (dense rows and compacted queries), the token exit
    heads and the final classifier are ONNX Runtime sessions; the token loop (token exits, compaction, pruning)
    is EATForTokenClassification's own."""

    precision: str = "fp32"
    export_dir: Path | None = None

    def forward(self, input_ids, *args, **kwargs):
        """As :meth:`EATForTokenClassification.forward`, in inference mode, the torch work between the sessions
        of a batch on one thread (:func:`single_threaded_torch`)."""
        with torch.inference_mode(), single_threaded_torch(input_ids.shape[0] > 1):
            return super().forward(input_ids, *args, **kwargs)


@contextmanager
def single_threaded_torch(active: bool = True):
    """Run the torch work between ONNX Runtime sessions (exit rule, row and token compaction, pooling) on one
    thread, restoring the thread count after (``active`` False: leave it alone).

    That work is small, and with torch's thread pool its OpenMP worker spins for a while after each op on the
    other core, just when the next session's threads want it: on 2 cores (AMD EPYC Zen 5) the SST-2 demo EAT
    model on ORT int8 took 38.8 ms per batch of 32 with torch at 2 threads between its sessions and 31.1 ms at
    1 (the sessions keep the threads they were built with). The runners switch it on for batches of more than
    one row: one row's tensors are below torch's parallel grain, and switching cost a batch-1 call more than it
    saved."""
    threads = torch.get_num_threads()
    if threads == 1 or not active:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_ort_model(folder: str | Path, *, knobs: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None, fuse_heads: bool = True, whole_graph: bool = True,
                    cascade: bool = True) -> OrtSequenceClassifier | OrtTokenClassifier:
    """The ONNX Runtime model of an export folder (checksums verified), ``knobs`` applied over the exported ones:
    an :class:`OrtSequenceClassifier`, or an :class:`OrtTokenClassifier` for a token model's export.
    fuse_heads: run each sentence layer with its head as one session where the export has that graph and its
    pooling is the one the knobs ask for. whole_graph: run calls in which nothing adaptive can happen
    (:func:`runs_static`) on the export's whole-model graph where it has one (exports made before it existed do
    not); False runs every call on the segments (e.g. to time both). cascade: run batch-1 calls with exits on
    as one graph (:mod:`eat.deploy.onnx_cascade`) where the knobs allow it; built now for the knobs given (not
    in the first, maybe timed, call) and again when exit layers, policy, patience or exit_depth change."""
    folder = Path(folder)
    threads = threads or torch.get_num_threads()  # fixed now: sessions opened later must not read a changed count
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
        model.session_threads = threads
        model.bert.encoder.layer = nn.ModuleList(_sentence_layers(config, manifest, segments, session, model,
                                                                  fuse_heads))
        width = config.hidden_size * (4 if config.exit_pooling == "pair" else 1)
        model.exit_heads = nn.ModuleDict({layer: OrtHead(session(name), width)
                                          for layer, name in segments["exit_heads"].items()})
        model.bert.pooler = OrtFinal(session(segments["final"]))
        model.classifier = nn.Identity()
        if whole_graph and "whole" in segments:
            model.whole_graph_file = folder / segments["whole"]
            if runs_static(config):  # static knobs: open it now, not in the first (maybe timed) call
                model.open_whole_graph()
    model.dropout = nn.Identity()
    model.precision, model.export_dir = precision, folder
    if kind != "token":
        model.cascade_enabled, model.manifest = cascade, manifest
        if cascade and _early_exit_enabled(config, False, False) and config.exit_layers is not None:
            model.open_cascade()
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
        layers[-1].pruning, layers[-1].number = model.pruning, number  # which outputs it fetches (OrtLayer._outputs)
    return layers


_EXPORT_CACHE: dict[str, Path] = {}


def load_onnx_model(path: str | Path, *, knobs: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None, token_level: bool | None = None, whole_graph: bool = True,
                    cascade: bool = True):
    """An :class:`~eat.deploy.InferenceModel` on ONNX Runtime from an export folder or a checkpoint (exported
    first, to a temporary folder reused within this process). token_level: export a checkpoint as a token
    classification model (default: what it says it is); an export folder says what it holds. whole_graph: see
    :func:`build_ort_model` (False: segments only); cascade: the same (False: batch 1 on the segments too)."""
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
    model = build_ort_model(folder, knobs=knobs, precision=precision, threads=threads, whole_graph=whole_graph,
                            cascade=cascade)
    if token_level is not None and token_level != isinstance(model, EATForTokenClassification):
        raise ExportError(f"{folder}: holds a {'token' if not token_level else 'sentence'} classification model, "
                          f"not the {'token' if token_level else 'sentence'} model asked for")
    tokenizer = load_tokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    return InferenceModel(model=model, config=model.config, tokenizer=tokenizer, precision=precision,
                          backend="onnxruntime", token_level=isinstance(model, EATForTokenClassification))


__all__ = ["OrtCascade", "OrtSequenceClassifier", "OrtTokenClassifier", "OrtWholeModel", "build_ort_model",
           "load_onnx_model", "make_session", "runs_static", "single_threaded_torch"]
