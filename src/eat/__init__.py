"""EAT: Efficient Adaptive Transformer.

Input-adaptive inference for BERT-family encoders: progressive token pruning, sparse (sliding-window) attention
and dynamic early exit (per sentence, or per token for sequence labelling) in one BERT-compatible model, plus the pipeline that measures what they are worth.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

from .configuration_eat import KNOB_DEFAULTS, EATConfig, KnobError, normalize_exit_layers, normalize_keep_schedule
from .modeling_eat import (
    EATForSequenceClassification,
    EATForTokenClassification,
    EATModel,
    WorkCounters,
    half_depth_layers,
    keep_layers,
)

__version__ = "0.1.0"

AutoConfig.register("eat", EATConfig, exist_ok=True)
AutoModel.register(EATConfig, EATModel, exist_ok=True)
AutoModelForSequenceClassification.register(EATConfig, EATForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(EATConfig, EATForTokenClassification, exist_ok=True)

__all__ = [
    "EATConfig",
    "EATModel",
    "EATForSequenceClassification",
    "EATForTokenClassification",
    "KnobError",
    "KNOB_DEFAULTS",
    "WorkCounters",
    "half_depth_layers",
    "keep_layers",
    "normalize_exit_layers",
    "normalize_keep_schedule",
]
