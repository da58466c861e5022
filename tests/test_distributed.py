"""Data-parallel training: `eat train` under torchrun (2 CPU processes, gloo) equals a 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from eat.distributed import Distributed, local_rows, setup

from .conftest import REPO


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = setup("cpu")
    assert (context.rank, context.world_size, context.is_main, context.enabled) == (0, 1, True, False)
    batch = {"labels": torch.arange(5)}
    assert local_rows(batch, context) is batch
    shares = [local_rows(batch, Distributed(rank=r, world_size=2))["labels"].tolist() for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]


@pytest.fixture(scope="module")
def dropout_free_backbone(tmp_path_factory, backbone_path) -> str:
    """A tiny random BERT without dropout (so that 1 and 2 processes see the same function), real tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-nodropout")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone_path).save_pretrained(folder)
    return str(folder)


def test_torchrun_two_processes_equal_one_process(tmp_path, data_dir, dropout_free_backbone):
    # 61 rows in batches of 10: the last global batch has one row, so one process gets none that step
    args = ["train", "--task", "sst2", "--variant", "eat", "--preset", "smoke", "--model", dropout_free_backbone,
            "--train-limit", "61", "--batch-size", "10", "--epochs", "2", "--eval-limit", "48", "--lr", "1e-3"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "EAT_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "eat.cli", *args, "--out", str(tmp_path / "one"), "--threads", "1"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "eat.cli", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert pair.returncode == 0, pair.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    two = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert one["steps"] == two["steps"] == 14  # ceil(61 / 10) * 2 epochs: the global batch is --batch-size
    assert one["dev_accuracy"] == pytest.approx(two["dev_accuracy"], abs=1e-9)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert differ < 1e-4, f"1-process and 2-process weights differ by up to {differ}"
    start = load_file(os.path.join(dropout_free_backbone, "model.safetensors"))
    query = "encoder.layer.0.attention.self.query.weight"
    assert float((a["bert." + query] - start[query]).abs().max()) > 1e-3  # training did move the weights
    # rank 0 alone evaluated and printed the dev score
    assert sum("validation" in line for line in pair.stdout.splitlines()) == 1, pair.stdout
