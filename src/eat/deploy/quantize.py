"""Reduced-precision copies of EAT models for CPU inference: dynamic int8 and bf16.

int8 is PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``, the ``x86`` engine: fbgemm
with oneDNN fallbacks): weights stored as int8 with one scale per output channel, activations quantized per call
from their own range (one scale per call), int32 accumulation. Chosen by measurement on a Zen 4 EPYC (see
``docs/backends.md``): the ``onednn`` engine was slower; per-channel weights were no slower than per-tensor and
suit the fused QKV weight, whose three blocks have ranges of their own. Every linear
layer is quantized: the Q, K, V projections as ONE fused (d -> 3 d) int8 matmul
(:attr:`~eat.modeling_eat.EATSelfAttention.fused_qkv`), the attention output, the feed-forward, the pooler, the
classifier and every exit head. Embeddings and LayerNorms stay fp32 (they are lookups and reductions, not
matmuls). The exit rule and pruning then run on the int8 model's own logits and attention: nothing of the fp32
model is consulted.

bf16 casts every weight to bfloat16; it is offered only where the CPU computes bf16 natively (AVX-512 BF16 or
AMX), where it is emulated it is several times slower than fp32.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..modeling_eat import EATSelfAttention

PRECISIONS = ("fp32", "bf16", "int8")


class PrecisionError(ValueError):
    """A precision that is unknown or that this machine cannot run well."""


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` (bf16 only with native CPU support), else
    :class:`PrecisionError` naming the choices."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        from ..training import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            raise PrecisionError("precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX); this CPU "
                                 "emulates it, several times slower than fp32: use fp32 or int8")
    return precision


def _fused_linear(attention: EATSelfAttention) -> nn.Linear:
    """One float (d -> 3 d) linear whose output is Q, K, V concatenated (the order EATSelfAttention unpacks)."""
    parts = (attention.query, attention.key, attention.value)
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts))
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


def quantize_int8(model: nn.Module, *, engine: str = "x86", inplace: bool = False) -> nn.Module:
    """A dynamic-int8 copy of an EAT model (sequence or token classification) for CPU inference.

    Every ``nn.Linear`` is replaced by a dynamically quantized one; each self-attention's Q, K and V become one
    fused int8 projection (its separate projections are quantized too: ``forward_queries`` of token exits reads
    them). ``engine``: PyTorch's quantized engine (``x86``, ``fbgemm``, ``onednn``), set process-wide because the
    packed weights are made for it. Returns the model in eval mode; the input model is left alone unless
    ``inplace``."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if engine not in torch.backends.quantized.supported_engines:
        raise PrecisionError(f"quantized engine {engine!r} is not in this torch build "
                             f"({', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = engine
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if isinstance(module, EATSelfAttention):
            module.fused_qkv = _fused_linear(module)
            module._fused = None  # the fp32 fused cache is not used any more
    with warnings.catch_warnings():
        # torch >= 2.10 announces the move of eager quantization to torchao; the API still works as documented
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model


def to_bf16(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A bfloat16 copy of the model (weights and activations bf16; logits come out bf16)."""
    check_precision("bf16")
    model = model if inplace else copy.deepcopy(model)
    return model.to(torch.bfloat16).eval()


def apply_precision(model: nn.Module, precision: str, *, inplace: bool = False) -> nn.Module:
    """The model at ``precision`` ("fp32" returns it as it is)."""
    check_precision(precision)
    if precision == "int8":
        return quantize_int8(model, inplace=inplace)
    if precision == "bf16":
        return to_bf16(model, inplace=inplace)
    return model


__all__ = ["PRECISIONS", "PrecisionError", "apply_precision", "check_precision", "quantize_int8", "to_bf16"]
