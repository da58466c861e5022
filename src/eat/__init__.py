"""EAT: Efficient Adaptive Transformer.

Input-adaptive inference for BERT-family encoders: progressive token pruning, sparse (sliding-window) attention
and dynamic early exit in one BERT-compatible model, plus the pipeline that measures what they are worth.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_eat import KNOB_DEFAULTS, EATConfig, KnobError, normalize_exit_layers, normalize_keep_schedule
from .modeling_eat import (
    EATForSequenceClassification,
    EATModel,
    WorkCounters,
    half_depth_layers,
    keep_layers,
)

__version__ = "0.1.0"

AutoConfig.register("eat", EATConfig, exist_ok=True)
AutoModel.register(EATConfig, EATModel, exist_ok=True)
AutoModelForSequenceClassification.register(EATConfig, EATForSequenceClassification, exist_ok=True)

__all__ = [
    "EATConfig",
    "EATModel",
    "EATForSequenceClassification",
    "KnobError",
    "KNOB_DEFAULTS",
    "WorkCounters",
    "half_depth_layers",
    "keep_layers",
    "normalize_exit_layers",
    "normalize_keep_schedule",
]
