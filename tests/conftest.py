"""Shared fixtures: tiny random configs, the packaged backbone, the shared data folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from eat import EATConfig, EATForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("EAT_DATA_DIR", REPO.parent / "shared" / "data" / "glue"))
CONLL_DIR = DATA_DIR.parent / "conll2003"

torch.set_num_threads(min(2, torch.get_num_threads()))


def benchmark_script(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not a package), fresh each call."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides) -> EATConfig:
    """Hidden 32, 4 heads, 4 layers, vocab 120: fast enough for dozens of forwards per test."""
    values = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=96, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, sep_token_id=102 % 120)
    values.update(overrides)
    return EATConfig(**values)


def tiny_model(seed: int = 0, **knobs) -> EATForSequenceClassification:
    """A random tiny EAT classifier in eval mode with the given knobs."""
    torch.manual_seed(seed)
    model = EATForSequenceClassification(tiny_config(**knobs)).eval()
    return model


def assert_window_refused(model, folder: Path, tmp_path: Path) -> None:
    """ONNX segments cannot express a sliding window (sequence and token models alike): asking for one is an
    ExportError naming the knob, both when an export in ``folder`` is loaded and when ``model`` is exported."""
    from eat.deploy.onnx_export import ExportError, export_segments
    from eat.deploy.onnx_runtime import build_ort_model

    with pytest.raises(ExportError, match="attention_window"):
        build_ort_model(folder, knobs={"attention_window": 8})
    model.config.set_knobs(attention_window=8)
    try:
        with pytest.raises(ExportError, match="attention_window=8"):
            export_segments(model, tmp_path / "windowed")
    finally:
        model.config.set_knobs(attention_window=None)


def mixed_batch(seed: int = 0, lengths=(17, 9, 30, 4, 12), vocab: int = 120, sep: int = 102 % 120):
    """Right-padded ids (with [CLS]=1 first and [SEP] last) and mask for rows of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, vocab, (length,), generator=generator)
        ids[row, 0] = 1
        ids[row, length - 1] = sep
        mask[row, :length] = 1
    return ids, mask


@pytest.fixture(scope="session")
def backbone_path() -> str:
    from eat.checkpoints import default_backbone

    return default_backbone()


@pytest.fixture(scope="session")
def conll_dir() -> Path:
    if not (CONLL_DIR / "eng.train").is_file():
        pytest.skip(f"CoNLL-2003 not found at {CONLL_DIR} (set EAT_DATA_DIR to the GLUE folder beside it)")
    return CONLL_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "sst2").is_dir():
        pytest.skip(f"GLUE data not found at {DATA_DIR} (set EAT_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, backbone_path) -> str:
    """A tiny random BERT (hidden 32, 2 layers) with the real uncased tokenizer: CLI runs in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone_path).save_pretrained(folder)
    return str(folder)
