"""EATConfig: a `BertConfig` that also carries every adaptive knob of EAT.

Every knob has an "off" value, and with all of them off the model computes exactly what BERT computes:

=====================  =========================  ==================================================
knob                   off value                  meaning
=====================  =========================  ==================================================
keep_ratio             1.0                        fraction of tokens kept after each layer (schedule)
prune_importance       (any)                      "cls_attention", "mean_attention" or "norm"
prune_mode             (any)                      "drop" (gather away) or "merge" (ToMe matching)
keep_sep               (any)                      never drop `[SEP]` tokens
attention_window       None                       sliding-window width (tokens, both sides together)
num_global_tokens      (any)                      leading tokens with global attention (`[CLS]` = 1)
attention_block_size   None                       query block of the blocked window kernel
attention_backend      (any)                      window kernel: "blocked" (SDPA per block) or "flex" (compiled)
exit_layers            None (last layer only)     1-based layers that carry an exit head, or "all"
exit_depth             None (the model's depth)   the deepest layer run: rows still running after it leave
                                                  with its head's output (it must be an exit layer) and the
                                                  layers after it never run; sequence models only
exit_policy            "none"                     "none", "confidence", "entropy", "patience" or "agreement"
                                                  (the last exit_patience heads agree AND max prob >= tau);
                                                  regression (num_labels 1): "delta" (PABEE: the last
                                                  exit_patience predictions change by < tau each) or "spread"
                                                  (they lie within a band narrower than tau)
exit_threshold         (any)                      `tau`: exit when max softmax probability >= tau
entropy_threshold      (any)                      exit when prediction entropy (nats) <= threshold
exit_patience          (any)                      PABEE: exit after this many consecutive agreeing heads
classifier_activation  "tanh"                     pooler activation ("relu" for DistilBERT checkpoints)
exit_pooling           (any)                      what an intermediate exit head reads: "cls" (the `[CLS]`
                                                  vector), "mean" (the mean of the real tokens) or "pair"
                                                  (each segment's mean a, b and |a - b|, a * b); part of
                                                  the trained heads: set it before training them
token_exit_window      (any)                      token tasks: a token exits only when every real token within
                                                  this many positions is confident too (0 = itself only)
token_exit_kv          (any)                      token tasks: "keep" exited tokens as keys/values (frozen
                                                  states, TOKEE) or "drop" them from attention altogether
=====================  =========================  ==================================================

Schedules (`keep_ratio`) take a scalar, a pair or a per-layer list and are normalised by
:func:`normalize_keep_schedule`; exit layers by :func:`normalize_exit_layers`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from transformers import BertConfig

PRUNE_IMPORTANCES = ("cls_attention", "mean_attention", "norm")
PRUNE_MODES = ("drop", "merge")
ATTENTION_BACKENDS = ("blocked", "flex")
EXIT_POLICIES = ("none", "confidence", "entropy", "patience", "agreement", "delta", "spread")
# the rules for one real-valued output (num_labels == 1, regression) and those for class probabilities
REGRESSION_EXIT_POLICIES = ("delta", "spread")
CLASSIFIER_ACTIVATIONS = ("tanh", "relu")
EXIT_POOLINGS = ("cls", "mean", "pair")
TOKEN_EXIT_KV = ("keep", "drop")

# The adaptive knobs and their defaults (every mechanism off). Anything else passed to `set_knobs` is an error.
KNOB_DEFAULTS: dict[str, Any] = {
    "keep_ratio": 1.0,
    "prune_importance": "cls_attention",
    "prune_mode": "drop",
    "keep_sep": True,
    "attention_window": None,
    "num_global_tokens": 1,
    "attention_block_size": None,
    "attention_backend": "blocked",
    "exit_layers": None,
    "exit_depth": None,
    "exit_policy": "none",
    "exit_threshold": 0.9,
    "entropy_threshold": 0.1,
    "exit_patience": 2,
    "classifier_activation": "tanh",
    "exit_pooling": "cls",
    "token_exit_window": 0,
    "token_exit_kv": "keep",
}

# The knobs that switch every mechanism off while keeping the model's shape knobs (exit heads, pooling, activation):
# what a reference pass (a teacher, frozen features, an everything-off accuracy) runs with.
MECHANISMS_OFF: dict[str, Any] = {"exit_policy": "none", "keep_ratio": 1.0, "attention_window": None,
                                  "exit_depth": None}


class KnobError(ValueError):
    """An adaptive knob has an unknown name or an impossible value; the message names the field."""


def normalize_keep_schedule(value: float | Sequence[float], num_layers: int) -> tuple[float, ...]:
    """Turn a keep-ratio schedule into one ratio per layer.

    Entry ``i`` (0-based) of the result is the fraction of the tokens *entering* the pruning step after layer
    ``i`` that are kept for layer ``i + 1``; ratios compound from layer to layer. The last entry is always
    1.0, because nothing runs after the last layer.

    - a scalar ``r``: every layer but the last keeps ``r``;
    - a pair ``(first, last)``: linear from ``first`` after layer 0 to ``last`` after layer ``num_layers - 2``;
    - a list of ``num_layers`` ratios (or ``num_layers - 1``, the last being implied): used as given.

    Every ratio must lie in (0, 1]. Raises :class:`KnobError` naming ``keep_ratio`` otherwise.
    """
    if num_layers < 1:
        raise KnobError(f"num_hidden_layers must be >= 1, got {num_layers}")
    prunable = num_layers - 1
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ratios = [float(value)] * prunable
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = [float(v) for v in value]
        if len(values) == 2 and num_layers != 2 and num_layers != 3:
            first, last = values
            steps = max(prunable - 1, 1)
            ratios = [first + (last - first) * i / steps for i in range(prunable)]
        elif len(values) == num_layers:
            ratios = values[:prunable]
            if values[-1] != 1.0 and not (0.0 < values[-1] <= 1.0):
                raise KnobError(f"keep_ratio: every ratio must lie in (0, 1], got {values[-1]}")
        elif len(values) == prunable:
            ratios = values
        else:
            raise KnobError(
                f"keep_ratio: expected a scalar, a pair or {num_layers} per-layer ratios, got {len(values)} values"
            )
    else:
        raise KnobError(f"keep_ratio: expected a number or a list of numbers, got {value!r}")
    for ratio in ratios:
        if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
            raise KnobError(f"keep_ratio: every ratio must lie in (0, 1], got {ratio}")
    return tuple(ratios) + (1.0,)


def normalize_exit_layers(value: None | str | int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Turn an exit-layer spec into a sorted tuple of 1-based layer numbers that always ends with the last layer.

    ``None`` means only the final classifier (no early exit); ``"all"`` a head after every layer; an int or a
    list names layers (1 = after the first layer). Raises :class:`KnobError` naming ``exit_layers`` for a layer
    outside ``1..num_layers``.
    """
    if value is None:
        layers: list[int] = []
    elif isinstance(value, str):
        if value != "all":
            raise KnobError(f"exit_layers: expected a list of layers or 'all', got {value!r}")
        layers = list(range(1, num_layers + 1))
    elif isinstance(value, int) and not isinstance(value, bool):
        layers = [value]
    elif isinstance(value, Sequence):
        layers = list(value)
    else:
        raise KnobError(f"exit_layers: expected a list of layers or 'all', got {value!r}")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= num_layers:
            raise KnobError(f"exit_layers: layer {layer!r} is outside 1..{num_layers} (the model's depth)")
    return tuple(sorted(set(layers) | {num_layers}))


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise KnobError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def validate_knobs(config: "EATConfig") -> None:
    """Check every knob of ``config``; raise :class:`KnobError` naming the first bad field."""
    layers = config.num_hidden_layers
    normalize_keep_schedule(config.keep_ratio, layers)
    exit_layers = normalize_exit_layers(config.exit_layers, layers)
    depth = config.exit_depth
    if depth is not None:
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= layers:
            raise KnobError(f"exit_depth: expected None or a layer in 1..{layers} (the model's depth), got {depth!r}")
        if depth not in exit_layers:  # the rows still running there need a head to answer them
            raise KnobError(f"exit_depth: layer {depth} has no exit head in exit_layers {config.exit_layers!r}; "
                            f"name it in exit_layers (heads: {', '.join(map(str, exit_layers))})")
    _choice("prune_importance", config.prune_importance, PRUNE_IMPORTANCES)
    _choice("prune_mode", config.prune_mode, PRUNE_MODES)
    _choice("exit_policy", config.exit_policy, EXIT_POLICIES)
    regression = getattr(config, "num_labels", 2) == 1
    if config.exit_policy != "none" and regression and config.exit_policy not in REGRESSION_EXIT_POLICIES:
        # softmax over one output is always 1: every row would leave at the first head
        raise KnobError(f"exit_policy: {config.exit_policy!r} reads class probabilities; a regression model (one "
                        f"output) exits by {' or '.join(REGRESSION_EXIT_POLICIES)}")
    if config.exit_policy in REGRESSION_EXIT_POLICIES and not regression:
        raise KnobError(f"exit_policy: {config.exit_policy!r} is for regression heads (one output); this model has "
                        f"{config.num_labels} classes")
    _choice("classifier_activation", config.classifier_activation, CLASSIFIER_ACTIVATIONS)
    _choice("exit_pooling", config.exit_pooling, EXIT_POOLINGS)
    _choice("attention_backend", config.attention_backend, ATTENTION_BACKENDS)
    if config.attention_backend == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            raise KnobError("attention_backend: 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)") from None
        if config.prune_mode == "merge" and any(r < 1.0 for r in normalize_keep_schedule(config.keep_ratio, layers)):
            raise KnobError("attention_backend: 'flex' does not support merge mode (size-weighted attention); "
                            "use 'blocked'")
    window = config.attention_window
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise KnobError(f"attention_window: expected None or an integer >= 1, got {window!r}")
    block = config.attention_block_size
    if block is not None and (not isinstance(block, int) or block < 1):
        raise KnobError(f"attention_block_size: expected None or an integer >= 1, got {block!r}")
    if not isinstance(config.num_global_tokens, int) or config.num_global_tokens < 1:
        raise KnobError(f"num_global_tokens: expected an integer >= 1 ([CLS] is always global), "
                        f"got {config.num_global_tokens!r}")
    if not isinstance(config.exit_threshold, (int, float)) or config.exit_threshold < 0:
        raise KnobError(f"exit_threshold: expected a number >= 0, got {config.exit_threshold!r}")
    if not isinstance(config.entropy_threshold, (int, float)):
        raise KnobError(f"entropy_threshold: expected a number, got {config.entropy_threshold!r}")
    if not isinstance(config.exit_patience, int) or config.exit_patience < 1:
        raise KnobError(f"exit_patience: expected an integer >= 1, got {config.exit_patience!r}")
    _choice("token_exit_kv", config.token_exit_kv, TOKEN_EXIT_KV)
    if not isinstance(config.token_exit_window, int) or config.token_exit_window < 0:
        raise KnobError(f"token_exit_window: expected an integer >= 0, got {config.token_exit_window!r}")
    if config.prune_importance == "mean_attention" and window is not None:
        # Mean attention received needs every query's full attention row, which is exactly what the window
        # kernel avoids computing.
        raise KnobError("prune_importance: 'mean_attention' needs dense attention; use 'cls_attention' or 'norm' "
                        "with attention_window")


class EATConfig(BertConfig):
    """Configuration of an EAT model: every `BertConfig` field plus the adaptive knobs (see the module docstring).

    A plain BERT ``config.json`` loads into it unchanged (all knobs off). Use :meth:`set_knobs` to change knobs
    by name: unknown names and impossible values raise :class:`KnobError`.
    """

    model_type = "eat"

    keep_ratio: float | list[float] = 1.0
    prune_importance: str = "cls_attention"
    prune_mode: str = "drop"
    keep_sep: bool = True
    attention_window: int | None = None
    num_global_tokens: int = 1
    attention_block_size: int | None = None
    attention_backend: str = "blocked"
    exit_layers: list[int] | str | None = None
    exit_depth: int | None = None
    exit_policy: str = "none"
    exit_threshold: float = 0.9
    entropy_threshold: float = 0.1
    exit_patience: int = 2
    classifier_activation: str = "tanh"
    exit_pooling: str = "cls"
    token_exit_window: int = 0
    token_exit_kv: str = "keep"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # A BERT config.json carries model_type "bert"; this object is an EAT config whatever it was read from.
        self.__dict__.pop("model_type", None)
        if isinstance(self.keep_ratio, tuple):
            self.keep_ratio = list(self.keep_ratio)
        if isinstance(self.exit_layers, tuple):
            self.exit_layers = list(self.exit_layers)
        validate_knobs(self)

    # --- knob access -------------------------------------------------------------------------------------------
    def set_knobs(self, **knobs: Any) -> "EATConfig":
        """Set adaptive knobs by name, validating names and values; returns ``self``.

        On an error nothing is changed.
        """
        for name in knobs:
            if name not in KNOB_DEFAULTS:
                hint = difflib.get_close_matches(name, KNOB_DEFAULTS, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise KnobError(f"{name}: unknown EAT knob{extra}; known knobs: {', '.join(KNOB_DEFAULTS)}")
        previous = {name: getattr(self, name) for name in knobs}
        for name, value in knobs.items():
            setattr(self, name, list(value) if isinstance(value, tuple) else value)
        try:
            validate_knobs(self)
        except KnobError:
            for name, value in previous.items():
                setattr(self, name, value)
            raise
        return self

    def knobs(self) -> dict[str, Any]:
        """The current adaptive knobs as a plain dict (JSON-ready)."""
        return {name: getattr(self, name) for name in KNOB_DEFAULTS}

    @property
    def keep_schedule(self) -> tuple[float, ...]:
        """Normalised per-layer keep ratios (see :func:`normalize_keep_schedule`)."""
        return normalize_keep_schedule(self.keep_ratio, self.num_hidden_layers)

    @property
    def exit_layer_list(self) -> tuple[int, ...]:
        """Normalised 1-based exit layers, always ending with the last layer."""
        return normalize_exit_layers(self.exit_layers, self.num_hidden_layers)


__all__ = ["EATConfig", "KnobError", "KNOB_DEFAULTS", "MECHANISMS_OFF", "EXIT_POLICIES", "REGRESSION_EXIT_POLICIES",
           "normalize_keep_schedule", "normalize_exit_layers",
           "validate_knobs"]
