"""Export an EAT model (sequence or token classification) as ONNX segments, with a manifest.

Early exit and pruning decide shapes at run time (rows or tokens leave, tokens are gathered away), which one
static graph cannot express per row. So the model is cut where EAT's logic runs: one graph for the embeddings,
one per layer, one per exit head and one for the final head, each with dynamic batch (and length) axes.
:mod:`eat.deploy.onnx_runtime` runs them with EAT's own exit, compaction and pruning code in between.

Segments and their tensors (B rows, n tokens, d hidden, H heads, dh head size, C labels, w head input width):

- ``embeddings``: input_ids (B, n) int64, token_type_ids (B, n) int64 -> hidden (B, n, d)
- ``layer_<i>`` (1-based): hidden (B, n, d), key_bias (B, n) float (0 = real key, -inf = padding, log token
  size after merging) -> hidden (B, n, d), q_cls (B, H, 1, dh) (the `[CLS]` query, for `cls_attention`
  pruning), k (B, H, n, dh) (keys, for pruning and merging); Q, K and V are one fused matmul
- ``exit_<i>``: pooled (B, w) -> logits (B, C) (the pooling itself runs between segments)
- ``final``: cls (B, d) -> logits (B, C)
- ``layer_head_<i>`` (sentence models, beside the above): ``layer_<i>`` and the head after it as ONE graph,
  hidden (B, n, d), key_bias (B, n) -> hidden, q_cls, k as ``layer_<i>`` plus logits (B, C) of that head on
  its pooled input: `[CLS]` (``final`` after the last layer; ``exit_pooling="cls"``) or the mean of the real
  tokens weighted by their size (``exit_pooling="mean"``; the weights are ``exp(key_bias)``: 1 real, 0
  padding, the token's size after merging). The runner then pays one session call per layer instead of two.
  Pair pooling reads token types the layer graph does not have, so pair heads stay separate. The manifest's
  ``fused_pooling`` names each fused segment's pooling.
- ``model`` (sentence models, beside the above): the whole model with every mechanism off as ONE graph, the
  static model (BERT) a user would export: input_ids (B, n) int64, attention_mask (B, n) int64 (1 real, 0
  padding), token_type_ids (B, n) int64 -> logits (B, C): embeddings, every layer, the final head on `[CLS]`; no
  exit head, no pruning. Built from the same segment modules as above, so it computes what the segments compute
  with exits off. The runner uses it whenever nothing adaptive can happen in a call (see
  :mod:`eat.deploy.onnx_runtime`); the manifest lists it as ``segments[precision]["whole"]``. Exports made before
  it existed have no such entry and run on the segments alone. Token models have no whole graph (their static
  form was not asked for: no peer times it).

Token classification models (:class:`~eat.modeling_eat.EATForTokenClassification`, ``"model": "token"`` in the
manifest) run two forms of every layer, as their layer loop does:

- ``layer_<i>``: hidden (B, n, d), key_bias (B, n) -> hidden (B, n, d) (every token a query; pruning reads
  hidden-state norms, so no q or k comes out)
- ``query_layer_<i>``: queries (B, m, d), keys_values (B, nk, d), key_bias (B, nk) -> hidden (B, m, d): the
  same layer for the tokens still running (``EATLayer.forward_queries``), attending to every token still a
  key (exited tokens stay keys under ``token_exit_kv="keep"``); Q from the queries, K and V one fused matmul
  on the keys. A separate graph because its queries and keys are different tensors of different lengths.
- ``exit_<i>`` / ``final``: hidden (B, m, d) -> per-token logits (B, m, C)

``manifest.json`` records the model kind, the segments per precision, the model config (knobs and labels
included), the tokenizer files copied beside them, the library versions and a sha256 of every file; a file
that does not match its checksum is refused when loading. ``--precision int8`` adds ONNX Runtime's dynamic int8
quantization (``onnxruntime.quantization.quantize_dynamic``, QInt8 weights, one scale per output
channel) of every segment with matrix products (all but the embeddings) next to the fp32 files; the embedding
lookups inside the whole-model graph stay fp32 too, as the embeddings segment does.

Knobs the export cannot express (refused with :class:`ExportError`): ``attention_window`` (the blocked window
kernel reads overlapping strided views) and, for sentence models, ``prune_importance="mean_attention"`` (needs
every query).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_eat import EATConfig
from ..modeling_eat import EATForSequenceClassification, EATForTokenClassification

MANIFEST = "manifest.json"
FORMAT = "eat-onnx-segments/1"
MODEL_KINDS = {"sequence": EATForSequenceClassification, "token": EATForTokenClassification}
OPSET = 17
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
INSTALL_HINT = "pip install 'eat[onnx]'"


class ExportError(ValueError):
    """The model or its knobs cannot be exported, or an export folder is damaged. The message says which."""


def require_onnxruntime():
    """The ``onnxruntime`` module, or an :class:`ExportError` with the install hint."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"onnxruntime is not installed; install it with: {INSTALL_HINT}") from error
    return onnxruntime


def check_exportable(config: EATConfig, where: str = "this model", kind: str = "sequence") -> None:
    """:class:`ExportError` when a knob of ``config`` has no form in the ONNX segments of a ``kind`` model
    ("sequence" or "token": token models prune by hidden-state norm only, so prune_importance is not theirs, and
    refuse an ``exit_depth`` cap, as their eager forward does)."""
    if config.attention_window is not None:
        raise ExportError(f"{where}: attention_window={config.attention_window} cannot be expressed by the ONNX "
                          "export (the blocked window kernel reads overlapping strided views); set "
                          "attention_window=None or use backend torch")
    if kind == "token" and config.exit_depth not in (None, config.num_hidden_layers):
        # refused here too, not only at the first call: a checkpoint is not exported for knobs it cannot run
        raise ExportError(f"{where}: exit_depth={config.exit_depth} is for sequence models; a token model runs "
                          "every layer a token needs (set exit_depth=None)")
    if kind == "sequence" and config.prune_importance == "mean_attention" and min(config.keep_schedule) < 1.0:
        raise ExportError(f"{where}: prune_importance='mean_attention' needs every query of a layer; the ONNX "
                          "segments return only the [CLS] query (use cls_attention or norm, or backend torch)")


# ------------------------------------------------------------------------------------------- segment modules


class EmbeddingSegment(nn.Module):
    """Embeddings as :class:`~eat.modeling_eat.EATEmbeddings` computes them at inference (no dropout)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids, token_type_ids):
        """(B, n), (B, n) int64 -> (B, n, d)."""
        emb = self.embeddings
        n = input_ids.shape[1]
        hidden = emb.word_embeddings(input_ids) + emb.position_embeddings.weight[:n]
        if emb.token_type_embeddings is not None:
            hidden = hidden + emb.token_type_embeddings(token_type_ids)
        return emb.LayerNorm(hidden)


class LayerSegment(nn.Module):
    """One EAT layer with dense attention under an additive key bias (the same function as
    ``EATLayer.forward`` with ``attention_window=None``), returning what pruning reads (``pruning_outputs``;
    token models prune by norm and need neither q nor k)."""

    def __init__(self, layer: nn.Module, pruning_outputs: bool = True):
        super().__init__()
        self.layer = layer
        self.pruning_outputs = pruning_outputs
        attention = layer.attention.self
        self.heads, self.head_size = attention.num_heads, attention.head_size
        # one (3d, d) projection: exported as one initializer, so ORT runs one MatMul for Q, K and V
        self.qkv = nn.Linear(attention.query.in_features, 3 * attention.query.out_features)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]))
            self.qkv.bias.copy_(torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))

    def forward(self, hidden, key_bias):
        """hidden (B, n, d), key_bias (B, n) -> hidden (B, n, d), q_cls (B, H, 1, dh), k (B, H, n, dh) (only
        hidden without pruning outputs)."""
        qkv = self.qkv(hidden).unflatten(-1, (3, self.heads, self.head_size))  # (B, n, 3, H, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, dh)
        hidden = _attend_and_feed_forward(self.layer, q, k, v, key_bias, hidden, self.head_size)
        return (hidden, q[:, :, :1], k) if self.pruning_outputs else hidden


class QueryLayerSegment(nn.Module):
    """One EAT layer for a subset of the tokens (``EATLayer.forward_queries`` with an additive key bias): the
    queries attend to keys/values given separately, which include the queries themselves."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        attention = layer.attention.self
        self.heads, self.head_size = attention.num_heads, attention.head_size
        self.query = attention.query
        # K and V as one (2d, d) projection: one MatMul on the keys in ORT
        self.kv = nn.Linear(attention.key.in_features, 2 * attention.key.out_features)
        with torch.no_grad():
            self.kv.weight.copy_(torch.cat([attention.key.weight, attention.value.weight]))
            self.kv.bias.copy_(torch.cat([attention.key.bias, attention.value.bias]))

    def forward(self, queries, keys_values, key_bias):
        """queries (B, m, d), keys_values (B, nk, d), key_bias (B, nk) -> hidden (B, m, d)."""
        q = self.query(queries).unflatten(-1, (self.heads, self.head_size)).transpose(1, 2)  # (B, H, m, dh)
        kv = self.kv(keys_values).unflatten(-1, (2, self.heads, self.head_size))  # (B, nk, 2, H, dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, nk, dh)
        return _attend_and_feed_forward(self.layer, q, k, v, key_bias, queries, self.head_size)


def _attend_and_feed_forward(layer: nn.Module, q, k, v, key_bias, residual, head_size: int):
    """The rest of an EAT layer after its projections: softmax attention of q (B, H, m, dh) over k, v
    (B, H, nk, dh) under key_bias (B, nk), output projection with the residual (B, m, d), feed-forward; both
    LayerNorms. Returns (B, m, d)."""
    scores = q @ k.transpose(-1, -2) * (head_size ** -0.5) + key_bias[:, None, None, :]  # (B, H, m, nk)
    context = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, m, d)
    out = layer.attention.output
    hidden = out.LayerNorm(out.dense(context) + residual)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
    return layer.output.LayerNorm(layer.output.dense(inner) + hidden)


class LayerHeadSegment(nn.Module):
    """A sentence model's layer and the head after it as one graph (see the module docstring): the layer's
    outputs plus the head's logits on the pooled layer output."""

    def __init__(self, layer: nn.Module, head: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ExportError(f"exit_pooling {pooling!r} has no fused layer + head graph (cls or mean)")
        self.layer, self.head, self.pooling = LayerSegment(layer), head, pooling

    def forward(self, hidden, key_bias):
        """hidden (B, n, d), key_bias (B, n) -> hidden (B, n, d), q_cls (B, H, 1, dh), k (B, H, n, dh),
        logits (B, C)."""
        hidden, q_cls, k = self.layer(hidden, key_bias)
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, d)
        else:  # the size-weighted mean of the real tokens, as exit_head_input's "mean"
            weight = key_bias.exp()  # (B, n): 1 real token, 0 padding, its size after merging
            pooled = (hidden * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
        return hidden, q_cls, k, self.head(pooled)


class FinalSegment(nn.Module):
    """The last layer's head: pooler (dense + activation) on `[CLS]`, then the classifier."""

    def __init__(self, model: EATForSequenceClassification):
        super().__init__()
        self.pooler, self.classifier = model.bert.pooler, model.classifier

    def forward(self, cls):
        """(B, d) -> (B, C)."""
        return self.classifier(self.pooler(cls))


class WholeModelSegment(nn.Module):
    """A sentence model with every mechanism off as one graph: the static model (BERT). The same segment modules
    as the segmented export (embeddings, each layer with its fused QKV projection, the final head), chained
    without EAT's loop in between: no exit head, no pruning, no window."""

    def __init__(self, model: EATForSequenceClassification):
        super().__init__()
        self.embeddings = EmbeddingSegment(model.bert.embeddings)
        self.layers = nn.ModuleList(LayerSegment(layer, pruning_outputs=False) for layer in model.bert.encoder.layer)
        self.final = FinalSegment(model)

    def forward(self, input_ids, attention_mask, token_type_ids):
        """input_ids, attention_mask (1 real, 0 padding), token_type_ids: (B, n) int64 -> logits (B, C)."""
        hidden = self.embeddings(input_ids, token_type_ids)  # (B, n, d)
        # the segments' additive key bias (B, n): 0 on real keys, -inf on padding (a row is never all padding:
        # the runner refuses such a row before calling)
        key_bias = torch.zeros_like(attention_mask, dtype=hidden.dtype).masked_fill(attention_mask == 0,
                                                                                    float("-inf"))
        for layer in self.layers:
            hidden = layer(hidden, key_bias)  # (B, n, d)
        return self.final(hidden[:, 0])


# ------------------------------------------------------------------------------------------------- export


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    """One segment through the TorchScript-tracing exporter (fast, and dynamic axes by name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the parity tests check the graphs
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def _lookup_nodes(path: Path) -> list[str]:
    """Names of the graph's ``Gather`` nodes that read an initializer: embedding lookups (only the whole-model
    graph has them; a segment's ``Gather`` picks from an activation)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "Gather" and node.input[0] in weights]


def _quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of one segment: QInt8 weights with one scale per output channel,
    activations quantized per call. Embedding lookups stay fp32: ORT would quantize them (``Gather`` is in its
    dynamic op list), but the embeddings segment is never quantized, so the whole-model graph keeps them fp32 too
    and computes what the int8 segments compute with exits off.

    Per channel, as the torch backend (``per_channel_dynamic_qconfig``): with one scale per weight matrix (ORT's
    default) the SST-2 demo models lost 0.81 accuracy points on all 872 dev rows at batch 1 (static 83.03 ->
    82.22, EAT tuned 83.03 -> 82.22); per channel they score 83.26 / 83.37 (AMD EPYC Zen 5, this export)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" warning, once per segment, says nothing here
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=_lookup_nodes(source))
    finally:
        root.setLevel(level)


def model_kind(model: nn.Module) -> str:
    """"sequence" or "token": which EAT task model ``model`` is (an :class:`ExportError` for anything else)."""
    for kind, model_class in MODEL_KINDS.items():
        if isinstance(model, model_class):
            return kind
    raise ExportError(f"{type(model).__name__}: only EAT sequence and token classifiers export to ONNX segments")


_BATCH_LENGTH = {0: "batch", 1: "length"}


def _export_layers(eager: nn.Module, out: Path, kind: str, files: dict[str, Any]) -> None:
    """The layer segments of ``eager`` into ``out/fp32`` (and their names into ``files``): ``layer_<i>`` for
    both kinds, ``query_layer_<i>`` beside it for token models. Example inputs: 2 rows of 7 tokens (5 queries)."""
    d, B, n = eager.config.hidden_size, 2, 7
    hidden, bias = torch.randn(B, n, d), torch.zeros(B, n)
    for number, layer in enumerate(eager.bert.encoder.layer, start=1):
        name = f"fp32/layer_{number}.onnx"
        if kind == "sequence":
            _export(LayerSegment(layer), (hidden, bias), out / name, ["hidden", "key_bias"],
                    ["hidden_out", "q_cls", "k"],
                    {"hidden": _BATCH_LENGTH, "key_bias": _BATCH_LENGTH, "hidden_out": _BATCH_LENGTH,
                     "q_cls": {0: "batch"}, "k": {0: "batch", 2: "length"}})
        else:
            _export(LayerSegment(layer, pruning_outputs=False), (hidden, bias), out / name, ["hidden", "key_bias"],
                    ["hidden_out"], {"hidden": _BATCH_LENGTH, "key_bias": _BATCH_LENGTH,
                                     "hidden_out": _BATCH_LENGTH})
            query_name = f"fp32/query_layer_{number}.onnx"
            _export(QueryLayerSegment(layer), (hidden[:, :5], hidden, bias), out / query_name,
                    ["queries", "keys_values", "key_bias"], ["hidden_out"],
                    {"queries": {0: "batch", 1: "queries"}, "keys_values": {0: "batch", 1: "keys"},
                     "key_bias": {0: "batch", 1: "keys"}, "hidden_out": {0: "batch", 1: "queries"}})
            files["query_layers"].append(query_name)
        files["layers"].append(name)


def _export_heads(eager: nn.Module, out: Path, kind: str, files: dict[str, Any]) -> None:
    """The exit heads and the final head of ``eager`` into ``out/fp32`` (their names into ``files``). Sentence
    heads read pooled features (B, w); token heads every token's state (B, m, d)."""
    d, B, n = eager.config.hidden_size, 2, 7
    for layer, head in sorted(eager.exit_heads.items(), key=lambda item: int(item[0])):
        name = f"fp32/exit_{layer}.onnx"
        if kind == "sequence":
            _export(head, (torch.randn(B, head.dense.in_features),), out / name, ["pooled"], ["logits"],
                    {"pooled": {0: "batch"}, "logits": {0: "batch"}})
        else:
            _export(head, (torch.randn(B, n, d),), out / name, ["hidden"], ["logits"],
                    {"hidden": _BATCH_LENGTH, "logits": _BATCH_LENGTH})
        files["exit_heads"][str(layer)] = name
    if kind == "sequence":
        _export(FinalSegment(eager), (torch.randn(B, d),), out / "fp32" / "final.onnx", ["cls"], ["logits"],
                {"cls": {0: "batch"}, "logits": {0: "batch"}})
    else:  # the classifier on every token (its dropout is the identity at inference)
        _export(eager.classifier, (torch.randn(B, n, d),), out / "fp32" / "final.onnx", ["hidden"], ["logits"],
                {"hidden": _BATCH_LENGTH, "logits": _BATCH_LENGTH})
    files["final"] = "fp32/final.onnx"


def _export_layer_heads(eager: nn.Module, out: Path, files: dict[str, Any]) -> dict[str, str]:
    """``layer_head_<i>`` of a sentence model (every layer followed by a head that pools `[CLS]` or the mean)
    into ``out/fp32``, their names into ``files["layer_heads"]``; returns each fused segment's pooling."""
    config = eager.config
    d, B, n = config.hidden_size, 2, 7
    hidden, bias = torch.randn(B, n, d), torch.zeros(B, n)
    heads = {int(layer): (head, config.exit_pooling) for layer, head in eager.exit_heads.items()}
    heads[config.num_hidden_layers] = (FinalSegment(eager), "cls")
    files["layer_heads"], pooling = {}, {}
    for number, (head, head_pooling) in sorted(heads.items()):
        if head_pooling not in ("cls", "mean"):
            continue
        name = f"fp32/layer_head_{number}.onnx"
        _export(LayerHeadSegment(eager.bert.encoder.layer[number - 1], head, head_pooling), (hidden, bias),
                out / name, ["hidden", "key_bias"], ["hidden_out", "q_cls", "k", "logits"],
                {"hidden": _BATCH_LENGTH, "key_bias": _BATCH_LENGTH, "hidden_out": _BATCH_LENGTH,
                 "q_cls": {0: "batch"}, "k": {0: "batch", 2: "length"}, "logits": {0: "batch"}})
        files["layer_heads"][str(number)] = name
        pooling[str(number)] = head_pooling
    return pooling


def _export_whole(eager: EATForSequenceClassification, out: Path, files: dict[str, Any]) -> None:
    """The whole sentence model with every mechanism off (:class:`WholeModelSegment`) as ``out/fp32/model.onnx``,
    its name into ``files["whole"]``. Example inputs: 2 rows of 7 tokens, the second padded after 4."""
    B, n = 2, 7
    ids = torch.randint(3, min(eager.config.vocab_size, 1000), (B, n))
    mask = (torch.arange(n) < torch.tensor([[n], [4]])).long()  # (B, n)
    name = "fp32/model.onnx"
    _export(WholeModelSegment(eager), (ids, mask, torch.zeros_like(ids)), out / name,
            ["input_ids", "attention_mask", "token_type_ids"], ["logits"],
            {"input_ids": _BATCH_LENGTH, "attention_mask": _BATCH_LENGTH, "token_type_ids": _BATCH_LENGTH,
             "logits": {0: "batch"}})
    files["whole"] = name


def _quantized_copy(out: Path, segments: dict[str, Any]) -> dict[str, Any]:
    """int8 twins (ORT dynamic quantization) of every fp32 segment with matrix products, written to
    ``out/int8``; returns the int8 segment table (the embeddings, lookups, stay the fp32 file)."""
    (out / "int8").mkdir(exist_ok=True)

    def quantized(name: str) -> str:
        """Quantize the fp32 segment ``name``; returns the int8 file's name."""
        target = name.replace("fp32/", "int8/")
        _quantize_int8(out / name, out / target)
        return target

    int8: dict[str, Any] = {"embeddings": segments["embeddings"]}
    for key, value in segments.items():
        if key == "embeddings":
            continue
        if isinstance(value, list):
            int8[key] = [quantized(name) for name in value]
        elif isinstance(value, dict):
            int8[key] = {layer: quantized(name) for layer, name in value.items()}
        else:
            int8[key] = quantized(value)
    return int8


def export_segments(model: nn.Module, out: str | Path, *, precisions: tuple[str, ...] = ("fp32",),
                    tokenizer_dir: str | Path | None = None, source: str | None = None,
                    force: bool = False, fuse_heads: bool = True) -> dict[str, Any]:
    """Write ``model`` (an EAT sequence or token classifier) as ONNX segments plus ``manifest.json`` into
    ``out``; returns the manifest.

    Exports from a deep copy (tracing must not touch the caller's model). precisions: "fp32" always, plus "int8"
    for ONNX Runtime int8 segments. tokenizer_dir: a folder whose tokenizer files are copied into
    ``out/tokenizer``. A non-empty ``out`` is refused unless ``force``. fuse_heads (sentence models): also
    write ``layer_head_<i>``, each layer and the head after it as one graph (the runner's default). Sentence
    models also get ``model.onnx`` per precision, the whole model with every mechanism off as one graph (the
    static model; see the module docstring); token models do not.
    """
    kind = model_kind(model)
    unknown = set(precisions) - {"fp32", "int8"}
    if unknown:
        raise ExportError(f"ONNX export precision {sorted(unknown)}: choose fp32 or int8")
    check_exportable(model.config, source or "this model", kind)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: folder exists and is not empty; choose another OUT or pass --force")
    if "int8" in precisions:
        require_onnxruntime()
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp32").mkdir(exist_ok=True)
    eager = copy.deepcopy(model).float().eval()
    config = eager.config
    ids = torch.randint(3, min(config.vocab_size, 1000), (2, 7))
    files: dict[str, dict[str, Any]] = {"fp32": {"layers": [], "exit_heads": {}}}
    if kind == "token":
        files["fp32"]["query_layers"] = []
    with torch.no_grad():
        _export(EmbeddingSegment(eager.bert.embeddings), (ids, torch.zeros_like(ids)), out / "fp32" / "embeddings.onnx",
                ["input_ids", "token_type_ids"], ["hidden"],
                {"input_ids": _BATCH_LENGTH, "token_type_ids": _BATCH_LENGTH, "hidden": _BATCH_LENGTH})
        files["fp32"]["embeddings"] = "fp32/embeddings.onnx"
        _export_layers(eager, out, kind, files["fp32"])
        _export_heads(eager, out, kind, files["fp32"])
        fused_pooling = _export_layer_heads(eager, out, files["fp32"]) if kind == "sequence" and fuse_heads else {}
        if kind == "sequence":
            _export_whole(eager, out, files["fp32"])
    if "int8" in precisions:
        files["int8"] = _quantized_copy(out, files["fp32"])
    tokenizer_files = []
    if tokenizer_dir is not None:
        for file_name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / file_name).is_file():
                (out / "tokenizer").mkdir(exist_ok=True)
                shutil.copy2(Path(tokenizer_dir) / file_name, out / "tokenizer" / file_name)
                tokenizer_files.append(f"tokenizer/{file_name}")
    manifest = {
        "format": FORMAT, "model": kind, "source": source, "precisions": list(files), "segments": files,
        "fused_pooling": fused_pooling,
        "config": config.to_dict(), "knobs": config.knobs(),
        "labels": {str(k): v for k, v in config.id2label.items()},
        "tokenizer_files": tokenizer_files, "opset": OPSET, "versions": _versions(),
        "sha256": {}}
    every_file = sorted({str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST})
    manifest["sha256"] = {name: sha256(out / name) for name in every_file}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def _versions() -> dict[str, str]:
    """Versions of the libraries that made the export (those installed)."""
    import importlib

    from .. import __version__ as eat_version

    versions = {"eat": eat_version, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:  # pragma: no cover - fp32 export needs neither; int8 checked for onnxruntime before
            pass
    return versions


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export folder, after checking every listed file against its sha256 (``verify``).
    Raises :class:`ExportError` naming the file that is missing or does not match."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST}; not a folder written by `eat export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; export again")
    if verify:
        for name, digest in manifest.get("sha256", {}).items():
            file = folder / name
            if not file.is_file():
                raise ExportError(f"{file}: listed in {path} but missing; export again")
            if sha256(file) != digest:
                raise ExportError(f"{file}: does not match the checksum in {path} (changed or corrupt); export again")
    return manifest


def export_checkpoint(path: str | Path, out: str | Path, *, precisions: tuple[str, ...] = ("fp32",),
                      knobs: dict[str, Any] | None = None, force: bool = False,
                      token_level: bool | None = None) -> dict[str, Any]:
    """Load a run or model folder and export it (:func:`export_segments`); knobs are saved as its defaults.
    token_level: a token classification model (default: what the checkpoint says)."""
    from . import _is_token_checkpoint
    from ..checkpoints import load_classifier, model_folder

    model_dir = model_folder(path)
    token = _is_token_checkpoint(model_dir) if token_level is None else token_level
    model = load_classifier(str(model_dir), knobs=knobs or {}, token_level=token)
    return export_segments(model, out, precisions=precisions, tokenizer_dir=model_dir, source=str(path), force=force)


__all__ = ["ExportError", "EmbeddingSegment", "FinalSegment", "LayerHeadSegment", "LayerSegment", "MANIFEST",
           "MODEL_KINDS",
           "QueryLayerSegment", "WholeModelSegment", "check_exportable", "export_checkpoint", "export_segments",
           "model_kind",
           "read_manifest", "require_onnxruntime", "sha256"]
