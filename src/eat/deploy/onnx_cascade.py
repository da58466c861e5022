"""The exit cascade of a sentence model as ONE ONNX graph: early exit without a session call per layer.

The segmented runner (:mod:`eat.deploy.onnx_runtime`) pays, per input, one ONNX Runtime call for the embeddings
and one per layer, with EAT's exit rule running in Python in between. At batch 1 that overhead is a large share
of a call (about 30% in the profile of ``docs/backends.md``). With one row there is nothing to compact (the row
either leaves or the whole batch goes on), so the layer loop reduces to control flow that ONNX has: ``If``.

The cascade graph, composed at load time from the checksum-verified segment files of an export (no new export
format; the graph depends on knobs that a tuned point changes, so it is built for the knobs the runner has):

- inputs: input_ids (B, n) int64, token_type_ids (B, n) int64, key_bias (B, n) float (0 = real, -inf =
  padding), exit_threshold () float, entropy_threshold () float;
- outputs: logits (B, C) of the head the input left at, exit_layer (1,) int64;
- body: the ``embeddings`` segment, then per layer its fused ``layer_head_<i>`` segment where an exit head is
  read after it (``layer_<i>`` where not), the exit rule on that head's logits (:func:`~eat.modeling_eat.
  exit_decision` itself, traced, with the policy's state, e.g. the streak of agreeing heads, passed on as
  tensors) as the (1,) condition of an ``If``: leave with these logits, or run the next layers, which live in
  the ``else`` branch. The last layer's head answers whoever is still running; under an ``exit_depth`` cap the
  graph is built as if the model ended there: its layers stop after layer ``exit_depth``, whose exit head
  answers whoever is still running (as the layer loop does; the layers after it are not in the graph).

The graph takes ONE row (a batch of several fails to reshape the condition): with one row there is nothing to
compact, so it computes exactly what the layer loop does; the runner uses it at batch 1 only.
:func:`cascade_unsupported` lists the knobs it cannot express (pruning or merging, windows). Pair-pooled exit heads
(sentence pairs) read features the cascade builds itself from a ``pair_weights`` input (1, 2, n), the weights of
:func:`~eat.modeling_eat.pair_pooling_weights` the runner computes: after such a layer come its ``layer_<i>``
segment, the pair features and the inlined ``exit_<i>`` head.
Nodes whose outputs nothing reads (the `[CLS]` query and keys the fused segments return for pruning) are dropped.
The exit threshold and entropy threshold are inputs, so a threshold sweep or a tuned tau needs no new graph; exit
layers, policy, patience and the depth cap are baked in (the runner builds a new cascade when they change).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configuration_eat import EATConfig
from ..modeling_eat import exit_decision, pass_depth

# policies whose rule reads only this head's logits (no state passes between heads)
STATELESS_POLICIES = ("confidence", "entropy")
STATEFUL_POLICIES = ("patience", "agreement", "delta", "spread")


def cascade_unsupported(config: EATConfig, manifest: dict[str, Any], precision: str) -> str | None:
    """Why the cascade cannot compute this sentence model under ``config`` from the export (``manifest``) at
    ``precision``, or None when it can. It needs: exits on (a policy, exit layers), no pruning or merging (keep
    ratios 1.0), no attention window, and a fused ``layer_head`` segment with the right pooling after every
    exit layer up to :func:`~eat.modeling_eat.pass_depth` (`[CLS]` or mean pooling; pair heads have none)."""
    if config.exit_policy in (None, "none") or config.exit_layers is None:
        return "no early exit"
    if config.exit_policy not in STATELESS_POLICIES + STATEFUL_POLICIES:
        return f"exit_policy {config.exit_policy!r}"
    if min(config.keep_schedule) < 1.0:
        return "token pruning or merging (keep ratios below 1.0) changes shapes per layer"
    if config.attention_window is not None:
        return "attention_window"
    if manifest.get("model", "sequence") != "sequence":
        return "a token classification model"
    segments = manifest["segments"][precision]
    fused = segments.get("layer_heads", {})
    pooling = manifest.get("fused_pooling", {})
    for layer in config.exit_layer_list:
        if layer > pass_depth(config):  # past the depth cap: not in the graph
            continue
        if config.exit_pooling == "pair" and layer < config.num_hidden_layers:
            if str(layer) not in segments["exit_heads"]:  # pair features are built in the cascade, the head inlined
                return f"no exit head segment after layer {layer}"
            continue
        wanted = "cls" if layer == config.num_hidden_layers else config.exit_pooling
        if str(layer) not in fused or pooling.get(str(layer)) != wanted:
            return f"no fused layer + head segment with {wanted} pooling after layer {layer}"
    return None


class ExitRuleStep(nn.Module):
    """EAT's exit rule after one head, as a graph: :func:`~eat.modeling_eat.exit_decision` on the logits (1, C)
    of ONE row: whether it leaves, as the (1,) condition of an ``If`` (a batch of several rows fails to reshape:
    the cascade is for batch 1 only). ``first``: the first head the rule reads (no state comes in). Stateful
    policies pass their state on: streak (1,) int64 and previous (1,) (patience, agreement: the prediction;
    delta: the value) or (1, <= patience) (spread: the last values)."""

    def __init__(self, config: EATConfig, first: bool):
        super().__init__()
        self.policy, self.patience, self.first = config.exit_policy, config.exit_patience, first

    def forward(self, logits, tau, entropy_threshold, streak=None, previous=None):
        """logits (B, C), tau (), entropy_threshold () [, streak, previous] -> leave (1,) bool [, streak,
        previous]."""
        leave, streak, previous = exit_decision(logits, self.policy, tau, entropy_threshold, self.patience,
                                                None if self.first else streak, None if self.first else previous)
        every = leave.reshape(1)  # (1,): the If condition (one row; no reduction over rows to pay for)
        if self.policy in STATELESS_POLICIES:
            return every
        return every, streak, previous


def _traced_rule(config: EATConfig, first: bool, classes: int):
    """The ONNX model of :class:`ExitRuleStep` (inputs logits, tau, entropy_threshold[, streak, previous];
    outputs leave[, streak_out, previous_out]), traced on one row."""
    import onnx

    from .onnx_export import OPSET

    rule = ExitRuleStep(config, first)
    logits, tau, entropy = torch.randn(1, classes), torch.tensor(0.5), torch.tensor(0.5)
    inputs, names, outputs = [logits, tau, entropy], ["logits", "tau", "entropy_threshold"], ["leave"]
    stateful = config.exit_policy in STATEFUL_POLICIES
    if stateful:
        outputs += ["streak_out", "previous_out"]
        if not first:
            regression = config.exit_policy in ("delta", "spread")
            previous = (torch.randn(1, 1) if config.exit_policy == "spread" else
                        torch.randn(1) if regression else torch.zeros(1, dtype=torch.long))
            inputs += [torch.ones(1, dtype=torch.long), previous]
            names += ["streak", "previous"]
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in ("logits", "streak", "previous", "streak_out", "previous_out")}
    if config.exit_policy == "spread":
        axes["previous"], axes["previous_out"] = {0: "batch", 1: "history"}, {0: "batch", 1: "history"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(rule, tuple(inputs), buffer, input_names=names, output_names=outputs,
                          dynamic_axes={k: v for k, v in axes.items() if k in names + outputs},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


class _Scope:
    """The nodes and initializers of one graph being built (the main graph or an ``If`` branch)."""

    def __init__(self):
        self.nodes, self.initializers = [], []


def _inline(scope: _Scope, model, prefix: str, feeds: dict[str, str]) -> dict[str, str]:
    """Copy ``model``'s graph into ``scope``: every value and node renamed with ``prefix``, its graph inputs
    read from the outer names in ``feeds`` (an input the graph does not have is skipped; one the graph has but
    ``feeds`` lacks is an error). Returns the new names of its graph outputs, by their old names."""
    from onnx import helper

    graph = model.graph
    weights = {tensor.name for tensor in graph.initializer}
    rename: dict[str, str] = {"": ""}
    for graph_input in graph.input:
        if graph_input.name in weights:  # an old-style initializer listed as an input
            continue
        if graph_input.name not in feeds:
            raise ValueError(f"cascade: segment input {graph_input.name!r} has no value to read")
        rename[graph_input.name] = feeds[graph_input.name]

    def new(name: str) -> str:
        """The composed graph's name of value ``name``."""
        if name not in rename:
            rename[name] = prefix + name
        return rename[name]

    for tensor in graph.initializer:
        copy = type(tensor)()
        copy.CopyFrom(tensor)
        copy.name = new(tensor.name)
        scope.initializers.append(copy)
    for node in graph.node:
        if any(attribute.type in (attribute.GRAPH, attribute.GRAPHS) for attribute in node.attribute):
            raise ValueError(f"cascade: segment node {node.name} has a subgraph; not supported")
        copy = helper.make_node(node.op_type, [new(x) for x in node.input], [new(y) for y in node.output],
                                name=prefix + (node.name or node.op_type), domain=node.domain)
        copy.attribute.extend(node.attribute)
        scope.nodes.append(copy)
    return {output.name: new(output.name) for output in graph.output}


def build_cascade(folder: str | Path, manifest: dict[str, Any], precision: str, config: EATConfig) -> bytes:
    """The serialized cascade model (see the module docstring) of the export in ``folder`` at ``precision``
    for ``config``'s exit layers, policy, patience and depth cap (layers 1 to
    :func:`~eat.modeling_eat.pass_depth` only). Raises ValueError when :func:`cascade_unsupported`."""
    import onnx
    from onnx import TensorProto, helper

    reason = cascade_unsupported(config, manifest, precision)
    if reason is not None:
        raise ValueError(f"cascade: {reason}")
    folder, segments = Path(folder), manifest["segments"][precision]
    L = config.num_hidden_layers  # the final head (`[CLS]`) reads layer L; exit heads the others
    depth = pass_depth(config)  # the last layer in the graph: its head answers whoever is still running
    exits = set(config.exit_layer_list)  # always holds L, and depth (validated: exit_depth is an exit layer)
    classes = config.num_labels
    stateful = config.exit_policy in STATEFUL_POLICIES
    pair = config.exit_pooling == "pair"  # then the graph also reads pair_weights (1, 2, n)
    sources = []  # every model inlined, for the opset table

    def load(name: str):
        """A segment file of the export as an ONNX model."""
        model = onnx.load(str(folder / name))
        sources.append(model)
        return model

    rules = {True: _traced_rule(config, True, classes)}
    if stateful:
        rules[False] = _traced_rule(config, False, classes)
    sources.extend(rules.values())

    def run_layers(scope: _Scope, start: int, hidden: str, state: tuple[str, str] | None) -> tuple[str, str]:
        """Nodes into ``scope`` for layers ``start``..depth on ``hidden``; returns the names of (logits, exit
        layer) that answer the input. state: the rule's (streak, previous) names after the last head read."""
        for layer in range(start, depth + 1):
            tag = f"L{layer}/"
            if layer not in exits:
                hidden = _inline(scope, load(segments["layers"][layer - 1]), tag,
                                 {"hidden": hidden, "key_bias": "key_bias"})["hidden_out"]
                continue
            if pair and layer < L:  # the layer, the pair features of its output, the exit head on them
                hidden = _inline(scope, load(segments["layers"][layer - 1]), tag,
                                 {"hidden": hidden, "key_bias": "key_bias"})["hidden_out"]
                logits = _inline(scope, load(segments["exit_heads"][str(layer)]), tag + "head/",
                                 {"pooled": _pair_features(scope, hidden, tag + "pair/")})["logits"]
            else:
                out = _inline(scope, load(segments["layer_heads"][str(layer)]), tag,
                              {"hidden": hidden, "key_bias": "key_bias"})
                hidden, logits = out["hidden_out"], out["logits"]
            if layer == depth:  # the last head in the graph answers whoever is still running
                return logits, _constant(scope, tag + "exit_layer", layer)
            feeds = {"logits": logits, "tau": "exit_threshold", "entropy_threshold": "entropy_threshold"}
            if state is not None:
                feeds["streak"], feeds["previous"] = state
            rule = _inline(scope, rules[state is None], tag + "rule/", feeds)
            if stateful:
                state = (rule["streak_out"], rule["previous_out"])
            leave_branch, stay_branch = _Scope(), _Scope()
            answer = (_identity(leave_branch, logits, tag + "leave/logits"),
                      _constant(leave_branch, tag + "leave/exit_layer", layer))
            stay = run_layers(stay_branch, layer + 1, hidden, state)
            outputs = [tag + "answer/logits", tag + "answer/exit_layer"]
            scope.nodes.append(helper.make_node(
                "If", [rule["leave"]], outputs, name=tag + "if",
                then_branch=_branch_graph(leave_branch, tag + "leave", answer),
                else_branch=_branch_graph(stay_branch, tag + "stay", stay)))
            return outputs[0], outputs[1]
        raise AssertionError("unreachable: the last layer in the graph always answers")  # pragma: no cover

    main = _Scope()
    hidden = _inline(main, load(segments["embeddings"]), "embeddings/",
                     {"input_ids": "input_ids", "token_type_ids": "token_type_ids"})["hidden"]
    logits, exit_layer = run_layers(main, 1, hidden, None)
    main.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="answer/logits"))
    main.nodes.append(helper.make_node("Identity", [exit_layer], ["exit_layer"], name="answer/exit_layer"))
    graph = helper.make_graph(
        main.nodes, "eat_cascade",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info("key_bias", TensorProto.FLOAT, ["batch", "length"]),
         helper.make_tensor_value_info("exit_threshold", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("entropy_threshold", TensorProto.FLOAT, [])]
        + ([helper.make_tensor_value_info("pair_weights", TensorProto.FLOAT, ["batch", 2, "length"])] if pair else []),
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("exit_layer", TensorProto.INT64, [1])],
        initializer=main.initializers)
    opsets: dict[str, int] = {}
    for model in sources:
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    _drop_unused(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version)
                                                    for domain, version in sorted(opsets.items())],
                              producer_name="eat-cascade")
    model.ir_version = max(source.ir_version for source in sources)
    return model.SerializeToString()


def _drop_unused(graph) -> None:
    """Remove, in ``graph`` and its ``If`` branches, the nodes whose outputs nothing reads (e.g. the `[CLS]`
    query and keys a fused segment returns for pruning, which the cascade never prunes with), until none is
    left: ORT would otherwise run them on every call."""
    def consumed(g, names: set[str]) -> None:
        """Every value a node of ``g`` or of its branches reads, and every graph output, into ``names``."""
        names.update(output.name for output in g.output)
        for node in g.node:
            names.update(node.input)
            for attribute in node.attribute:
                if attribute.type == attribute.GRAPH:
                    consumed(attribute.g, names)

    def prune(g, names: set[str]) -> bool:
        """Drop ``g``'s unread nodes (and its branches'); whether any went."""
        changed = False
        keep = []
        for node in g.node:
            for attribute in node.attribute:
                if attribute.type == attribute.GRAPH:
                    changed |= prune(attribute.g, names)
            if any(output in names for output in node.output):
                keep.append(node)
            else:
                changed = True
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
        return changed

    while True:
        names: set[str] = set()
        consumed(graph, names)
        if not prune(graph, names):
            break
    # initializers nothing reads any more (those of the dropped nodes)
    names = set()
    consumed(graph, names)

    def drop_weights(g) -> None:
        kept = [tensor for tensor in g.initializer if tensor.name in names]
        if len(kept) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(kept)
        for node in g.node:
            for attribute in node.attribute:
                if attribute.type == attribute.GRAPH:
                    drop_weights(attribute.g)

    drop_weights(graph)


def _pair_features(scope: _Scope, hidden: str, prefix: str) -> str:
    """Nodes for :func:`~eat.modeling_eat.exit_head_input`'s "pair" features of ``hidden`` (1, n, d) into
    ``scope``: the segment means a, b = pair_weights (1, 2, n) @ hidden, then [a, b, |a - b|, a * b] (1, 4 d), as
    the layer loop computes them (the same batched product). Returns the features' name."""
    from onnx import helper

    def node(op: str, inputs: list[str], name: str, **attributes) -> str:
        scope.nodes.append(helper.make_node(op, inputs, [prefix + name], name=prefix + name, **attributes))
        return prefix + name

    means = node("MatMul", ["pair_weights", hidden], "means")  # (1, 2, d)
    first, second = node("Split", [means], "split_0", axis=1), prefix + "split_1"  # equal halves: (1, 1, d) each
    scope.nodes[-1].output.append(second)
    axis = _constant(scope, prefix + "axis_1", 1)
    a = node("Squeeze", [first, axis], "a")
    b = node("Squeeze", [second, axis], "b")
    gap = node("Abs", [node("Sub", [a, b], "a_minus_b")], "gap")
    return node("Concat", [a, b, gap, node("Mul", [a, b], "a_times_b")], "features", axis=-1)


def _constant(scope: _Scope, name: str, value: int) -> str:
    """An int64 (1,) constant node in ``scope``; returns its name."""
    from onnx import helper

    scope.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                        value=helper.make_tensor(name + "/value", 7, [1], [value])))
    return name


def _identity(scope: _Scope, source: str, name: str) -> str:
    """``name`` = ``source`` in ``scope`` (a branch's output must be a value its own graph produces)."""
    from onnx import helper

    scope.nodes.append(helper.make_node("Identity", [source], [name], name=name))
    return name


def _branch_graph(scope: _Scope, name: str, outputs: tuple[str, str]):
    """An ``If`` branch: the nodes of ``scope`` with (logits, exit layer) as its outputs."""
    from onnx import TensorProto, helper

    return helper.make_graph(scope.nodes, name, [],
                             [helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, None),
                              helper.make_tensor_value_info(outputs[1], TensorProto.INT64, [1])],
                             initializer=scope.initializers)


__all__ = ["ExitRuleStep", "build_cascade", "cascade_unsupported"]
