"""The model: parity with Hugging Face, and proof (by shapes and counters) that each mechanism removes work."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig,
                          DistilBertForSequenceClassification)

from eat import EATConfig, EATForSequenceClassification, EATModel, KnobError, keep_layers
from eat import modeling_eat
from eat.checkpoints import CheckpointError, distilbert_to_bert_state_dict, load_classifier
from eat.modeling_eat import (bipartite_merge_plan, compaction_index, dense_attention, exit_decision,
                              sliding_window_attention)

from .conftest import mixed_batch, tiny_config, tiny_model

# --------------------------------------------------------------------------------------------------------- parity


def _bert_config(**extra):
    return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=3, **extra)


def test_parity_with_hf_bert_sequence_classification():
    torch.manual_seed(0)
    hf = BertForSequenceClassification(_bert_config()).eval()
    eat = EATForSequenceClassification(EATConfig(**hf.config.to_dict())).eval()
    eat.load_state_dict(hf.state_dict(), strict=True)
    ids, mask = mixed_batch(lengths=(20, 7, 13))
    token_types = (torch.arange(ids.shape[1]) > 4).long().expand_as(ids) * mask
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        got = eat(ids, mask, token_types).logits
    assert (expected - got).abs().max() < 1e-5


def test_parity_with_hf_bert_with_a_chunked_feed_forward():
    """Hugging Face's `chunk_size_feed_forward` (the feed-forward a few tokens at a time, for long inputs): the
    same outputs as Hugging Face, and as unchunked also when the length is no multiple of the chunk (which HF
    refuses), at inference and in training (gradients too)."""
    torch.manual_seed(2)
    hf = BertForSequenceClassification(_bert_config(chunk_size_feed_forward=5, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0)).eval()
    eat = EATForSequenceClassification(EATConfig(**hf.config.to_dict())).eval()
    eat.load_state_dict(hf.state_dict(), strict=True)
    assert eat.bert.encoder.layer[0].chunk_size_feed_forward == 5
    ids, mask = mixed_batch(lengths=(20, 7, 13))
    with torch.no_grad():
        assert (hf(input_ids=ids, attention_mask=mask).logits - eat(ids, mask).logits).abs().max() < 1e-5
    whole = EATForSequenceClassification(EATConfig(**{**hf.config.to_dict(), "chunk_size_feed_forward": 0})).eval()
    whole.load_state_dict(hf.state_dict(), strict=True)
    for layer in eat.bert.encoder.layer:
        layer.chunk_size_feed_forward = 8  # 20 tokens: chunks of 8, 8 and 4
    with torch.no_grad():
        assert (whole(ids, mask).logits - eat(ids, mask).logits).abs().max() < 1e-6
    for model in (eat, whole):
        model.train()
        model(ids, mask).logits.square().sum().backward()
    chunked_grad = eat.bert.encoder.layer[1].intermediate.dense.weight.grad
    assert chunked_grad.abs().sum() > 0
    assert (chunked_grad - whole.bert.encoder.layer[1].intermediate.dense.weight.grad).abs().max() < 1e-5


def test_parity_with_hf_distilbert_sequence_classification(tmp_path):
    torch.manual_seed(1)
    config = DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, num_labels=2)
    hf = DistilBertForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    eat = load_classifier(str(tmp_path))
    assert eat.config.type_vocab_size == 0 and eat.config.classifier_activation == "relu"
    ids, mask = mixed_batch(lengths=(15, 6, 11))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = eat(ids, mask).logits
    assert (expected - got).abs().max() < 1e-5
    # the mapping itself: every DistilBERT backbone weight has a BERT name
    mapped = distilbert_to_bert_state_dict(hf.state_dict())
    assert "bert.encoder.layer.2.attention.self.query.weight" in mapped
    assert "bert.pooler.dense.weight" in mapped


def test_encoder_parity_on_packaged_minilm(backbone_path):
    hf = BertModel.from_pretrained(backbone_path).eval()
    eat = EATModel.from_pretrained(backbone_path).eval()
    ids, mask = mixed_batch(lengths=(40, 12, 25), vocab=30522)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask)
        got = eat(ids, mask)
    real = mask.bool()
    assert (expected.last_hidden_state[real] - got.last_hidden_state[real]).abs().max() < 1e-5
    assert (expected.pooler_output - got.pooler_output).abs().max() < 1e-5


def test_auto_classes_and_save_round_trip_every_knob(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    knobs = dict(keep_ratio=[0.9, 0.8, 0.7, 1.0], prune_importance="norm", prune_mode="merge", keep_sep=False,
                 attention_window=8, num_global_tokens=2, attention_block_size=4, exit_layers=[1, 3],
                 exit_depth=3, exit_policy="patience", exit_threshold=0.77, entropy_threshold=0.3, exit_patience=3,
                 classifier_activation="relu", exit_pooling="mean", attention_backend="blocked", token_exit_window=1,
                 token_exit_kv="drop")
    model = tiny_model(**knobs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EATForSequenceClassification)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "eat"
    assert loaded.config.knobs() == knobs
    tiny_config(attention_backend="flex", attention_window=4).save_pretrained(tmp_path / "flex")
    assert EATConfig.from_pretrained(tmp_path / "flex").attention_backend == "flex"
    ids, mask = mixed_batch()
    with torch.no_grad():
        assert torch.allclose(model(ids, mask).logits, loaded(ids, mask).logits, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- schedules


def test_keep_schedule_normalisation():
    from eat import normalize_keep_schedule as norm

    assert norm(1.0, 4) == (1.0, 1.0, 1.0, 1.0)
    assert norm(0.5, 4) == (0.5, 0.5, 0.5, 1.0)
    assert norm((0.9, 0.5), 6) == pytest.approx((0.9, 0.8, 0.7, 0.6, 0.5, 1.0))
    assert norm([0.9, 0.8, 0.7, 0.6], 4) == (0.9, 0.8, 0.7, 1.0)
    assert norm([0.9, 0.8, 0.7], 4) == (0.9, 0.8, 0.7, 1.0)
    for bad in (0.0, 1.5, -0.1, [0.5] * 7, "x", float("nan")):
        with pytest.raises(KnobError, match="keep_ratio"):
            norm(bad, 4)


def test_exit_layer_normalisation_and_bad_knobs():
    from eat import normalize_exit_layers as norm

    assert norm(None, 6) == (6,)
    assert norm("all", 3) == (1, 2, 3)
    assert norm([4, 2], 6) == (2, 4, 6)
    with pytest.raises(KnobError, match="exit_layers"):
        norm([7], 6)
    config = tiny_config()
    with pytest.raises(KnobError, match="attention_window"):
        config.set_knobs(attention_window=0)
    with pytest.raises(KnobError, match="keep_ratio"):
        config.set_knobs(keep_ratio=1.2)
    with pytest.raises(KnobError, match="exit_layers"):
        config.set_knobs(exit_layers=[9])
    with pytest.raises(KnobError, match="exit_treshold.*did you mean 'exit_threshold'"):
        config.set_knobs(exit_treshold=0.5)
    with pytest.raises(KnobError, match="exit_policy"):
        config.set_knobs(exit_policy="sometimes")
    assert config.attention_window is None and config.keep_ratio == 1.0  # failed calls changed nothing
    with pytest.raises(KnobError, match="attention_window"):
        EATConfig(attention_window=-3)


# ---------------------------------------------------------------------------------------------------- early exit


def test_tau_above_one_never_exits_and_tau_zero_exits_at_first_head():
    ids, mask = mixed_batch()
    never = tiny_model(exit_layers="all", exit_policy="confidence", exit_threshold=1.01)
    with torch.no_grad():
        out = never(ids, mask)
    assert out.exit_layer.tolist() == [4] * 5
    assert out.work.exit_head_rows == 5  # only the final head ran: nothing can pass tau > 1
    always = tiny_model(exit_layers="all", exit_policy="confidence", exit_threshold=0.0)
    with torch.no_grad():
        out = always(ids, mask)
    assert out.exit_layer.tolist() == [1] * 5
    assert out.work.layers_run == 5
    assert (out.tokens_per_layer[:, 1:] == 0).all()  # no layer after the first ran for anyone


def test_per_sample_exit_compacts_the_batch_and_matches_cached_heads():
    model = tiny_model(seed=3, exit_layers="all", exit_policy="confidence")
    ids, mask = mixed_batch(seed=4, lengths=(17, 9, 30, 4, 12, 22, 8))
    with torch.no_grad():
        cached = model(ids, mask, output_exit_logits=True, disable_exit=True)
    confidence = cached.exit_logits.softmax(-1).amax(-1)  # (B, E)
    tau = float(confidence[:, 0].median())  # about half the rows leave at the first head
    model.config.set_knobs(exit_threshold=tau)
    with torch.no_grad():
        out = model(ids, mask)
    # expected exit per row from the cache: first head whose confidence >= tau, else the last
    passes = confidence >= tau
    passes[:, -1] = True
    expected_exit = passes.float().argmax(1) + 1
    assert out.exit_layer.tolist() == expected_exit.tolist()
    assert 1 < len(set(out.exit_layer.tolist()))
    chosen = cached.exit_logits[torch.arange(len(ids)), expected_exit - 1]
    assert torch.allclose(out.logits, chosen, atol=1e-5)
    # exited rows really left: later layers saw fewer rows
    rows_per_layer = (out.tokens_per_layer > 0).sum(0)
    assert rows_per_layer[0] == len(ids) and rows_per_layer[-1] < len(ids)
    assert out.work.padded_token_layers < cached.work.padded_token_layers


def test_entropy_and_patience_policies():
    logits = torch.tensor([[5.0, -5.0], [0.1, 0.0]])
    leave, _, _ = exit_decision(logits, "entropy", 0.9, 0.05, 2)
    assert leave.tolist() == [True, False]
    streak = previous = None
    decisions = []
    for step in ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]):
        leave, streak, previous = exit_decision(torch.tensor(step), "patience", 0.9, 0.1, 2, streak, previous)
        decisions.append(leave.tolist())
    assert decisions == [[False, False], [True, False], [True, True]]
    model = tiny_model(seed=2, exit_layers="all", exit_policy="patience", exit_patience=1)
    ids, mask = mixed_batch()
    with torch.no_grad():
        assert model(ids, mask).exit_layer.tolist() == [1] * 5  # one agreeing head is enough


# ------------------------------------------------------------------------------------------------- token pruning


def test_pruning_shortens_tensors_per_sample_ratio():
    model = tiny_model(keep_ratio=0.5, prune_importance="cls_attention")
    ids, mask = mixed_batch(lengths=(17, 9, 30, 4, 12))
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
             for layer in model.bert.encoder.layer]
    with torch.no_grad():
        out = model(ids, mask)
    for hook in hooks:
        hook.remove()
    assert [s[1] for s in shapes] == [30, 15, 8, 4]  # the longest row halves each layer: tensors really shrink
    expected = torch.tensor([17, 9, 30, 4, 12])
    for column in range(4):
        assert out.tokens_per_layer[:, column].tolist() == expected.tolist()
        expected = torch.maximum(torch.ceil(expected * 0.5).long(), torch.full_like(expected, 2))  # CLS + SEP kept
    assert out.work.token_layers == int(out.tokens_per_layer.sum())


@pytest.mark.parametrize("importance", ["cls_attention", "mean_attention", "norm"])
def test_pruning_keeps_cls_and_sep(importance):
    model = tiny_model(keep_ratio=0.3, prune_importance=importance, keep_sep=True)
    ids, mask = mixed_batch(lengths=(25, 10))
    with torch.no_grad():
        out = model.bert(ids, mask)
    for row, length in enumerate((25, 10)):
        kept = out.token_positions[row][out.attention_mask[row]].tolist()
        assert kept[0] == 0 and kept[-1] == length - 1  # [CLS] first, [SEP] (last real token) kept
        assert kept == sorted(kept)  # order preserved
    assert out.last_hidden_state.shape[1] < 25


def test_padding_never_counts_as_kept_token():
    model = tiny_model(keep_ratio=0.5)
    ids, mask = mixed_batch(lengths=(30, 6))
    with torch.no_grad():
        out = model.bert(ids, mask)
    assert (out.token_positions[1][out.attention_mask[1]] < 6).all()
    assert out.tokens_per_layer[1].tolist() == [6, 3, 2, 2]


def test_merge_mode_conserves_token_weight():
    ids, mask = mixed_batch(lengths=(30, 17, 9))
    model = tiny_model(keep_ratio=0.6, prune_mode="merge")
    seen_sizes = []
    original = model.bert._reduce_tokens

    def spy(hidden, state, ratio, q, k):
        result = original(hidden, state, ratio, q, k)
        seen_sizes.append((state.sizes * (state.key_mask if state.key_mask is not None else 1)).sum(1))
        return result

    model.bert._reduce_tokens = spy
    with torch.no_grad():
        out = model(ids, mask)
    assert len(seen_sizes) == 3
    for sizes in seen_sizes:
        assert torch.allclose(sizes, torch.tensor([30.0, 17.0, 9.0]))  # merged tokens carry their weight
    assert out.tokens_per_layer[0, -1] < 30


def test_bipartite_merge_plan_is_pure_and_respects_protection():
    torch.manual_seed(0)
    metric = torch.randn(1, 8, 4)
    mergeable = torch.ones(1, 8, dtype=torch.bool)
    mergeable[0, 0] = False
    src, dst = bipartite_merge_plan(metric, torch.tensor([2]), mergeable)
    assert int(src.sum()) == 2 and not bool(src[0, 0])
    keep = torch.tensor([[True, False, True, True]])
    index, valid = compaction_index(keep, keep.sum(1))
    assert index.tolist() == [[0, 2, 3]] and valid.all()


# --------------------------------------------------------------------------------------------- sparse attention


def _window_reference_mask(n, radius, g, key_mask):
    p = torch.arange(n)
    allowed = ((p[:, None] - p[None, :]).abs() <= radius) | (p[:, None] < g) | (p[None, :] < g)
    return allowed[None, None] & key_mask[:, None, None, :]


@pytest.mark.parametrize("chunk_bytes", [None, 1, 12000])
@pytest.mark.parametrize("layout", ["heads", "tokens"])
@pytest.mark.parametrize("n,radius,block,g", [(37, 4, None, 1), (64, 8, 4, 2), (20, 3, 7, 1), (9, 1, None, 1)])
def test_sliding_window_equals_dense_with_equivalent_mask(n, radius, block, g, layout, chunk_bytes, monkeypatch):
    """Both layouts the model produces (contiguous (B, H, n, dh), and a linear's (B, n, H, dh) output viewed per
    head), with the query blocks in one SDPA call, one block per call, or a few per call (long inputs)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(modeling_eat, "WINDOW_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(n)
    if layout == "heads":
        q, k, v = (torch.randn(2, 3, n, 8) for _ in range(3))
    else:
        q, k, v = (torch.randn(2, n, 3, 8).transpose(1, 2) for _ in range(3))
        assert not k.is_contiguous()
    key_mask = torch.ones(2, n, dtype=torch.bool)
    key_mask[1, n - 5:] = False
    got, scores = sliding_window_attention(q, k, v, radius, g, block, key_mask)
    expected = dense_attention(q, k, v, _window_reference_mask(n, radius, g, key_mask))
    assert (got - expected)[:, :, :].abs().max() < 1e-5
    single, _ = sliding_window_attention(q[:1], k[:1], v[:1], radius, g, block, key_mask[:1])  # batch 1: views
    assert (single - expected[:1]).abs().max() < 1e-5
    assert scores < 2 * n * n or n < 4 * radius


def _count_band_calls(monkeypatch) -> list[int]:
    """Wrap the kernel's direct flash-attention call (the band-view path) with a call counter."""
    calls = []
    flash = modeling_eat._FLASH_CPU

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])  # interior blocks in this call
        return flash(*args, **kwargs)

    monkeypatch.setattr(modeling_eat, "_FLASH_CPU", counted)
    return calls


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", ["heads", "tokens"])
@pytest.mark.parametrize("n,radius,block,g", [(37, 4, None, 1), (64, 8, 4, 2), (300, 10, 7, 3), (9, 1, None, 1)])
def test_sliding_window_band_views_equal_dense_with_equivalent_mask(n, radius, block, g, layout, with_bias,
                                                                    monkeypatch):
    """Inference without padding reads interior blocks' keys as overlapping views and merges the global keys by
    log-sum-exp: the same function as dense attention under the window mask (with a merge-mode key bias too),
    and the interior really went through that path (one call per batch row, covering every interior block)."""
    calls = _count_band_calls(monkeypatch)
    torch.manual_seed(n)
    if layout == "heads":
        q, k, v = (torch.randn(2, 3, n, 8) for _ in range(3))
    else:
        q, k, v = (torch.randn(2, n, 3, 8).transpose(1, 2) for _ in range(3))
    key_bias = torch.rand(2, n) if with_bias else None
    with torch.no_grad():
        got, _ = sliding_window_attention(q, k, v, radius, g, block, key_bias=key_bias)
    reference_mask = _window_reference_mask(n, radius, g, torch.ones(2, n, dtype=torch.bool)).float().log()
    if with_bias:
        reference_mask = reference_mask + key_bias[:, None, None, :]
    expected = dense_attention(q, k, v, reference_mask)
    assert (got - expected).abs().max() < 1e-5
    block = block or radius
    interior = max(0, (n - block - radius) // block + 1 - -(-(radius + g) // block))  # bands inside [g, n)
    assert calls == ([interior] * 2 if interior else [])
    if n > 4 * (block + radius):
        assert interior > 0


@pytest.mark.parametrize("band_views", [True, False])
def test_sliding_window_runs_in_bf16(band_views, monkeypatch):
    """A bf16 model (e.g. bf16 inference on a CPU with native bf16): the flash kernel's log-sum-exp comes back
    in float32 and must not leak into the bf16 merge; both paths stay within bf16 rounding of fp32 dense."""
    calls = _count_band_calls(monkeypatch)
    if not band_views:
        monkeypatch.setattr(modeling_eat, "_FLASH_CPU", None)
    torch.manual_seed(2)
    n, radius = 300, 10
    q, k, v = (torch.randn(1, n, 3, 8).transpose(1, 2) for _ in range(3))
    with torch.no_grad():
        got, _ = sliding_window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), radius)
    expected = dense_attention(q, k, v, _window_reference_mask(n, radius, 1, torch.ones(1, n, dtype=torch.bool)))
    assert got.dtype == torch.bfloat16 and (got.float() - expected).abs().max() < 0.05
    assert (len(calls) == 1) == band_views


def test_sliding_window_training_and_padding_take_the_gathering_path(monkeypatch):
    """The band path's log-sum-exp has no gradient and padded bands could be empty: with inputs that need
    gradients, or with padding, the kernel gathers keys instead, and still equals dense attention."""
    calls = _count_band_calls(monkeypatch)
    torch.manual_seed(1)
    n, radius = 64, 4
    inputs = [torch.randn(1, 2, n, 4, requires_grad=True) for _ in range(3)]
    got, _ = sliding_window_attention(*inputs, radius)
    got.square().sum().backward()
    window_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    reference_mask = _window_reference_mask(n, radius, 1, torch.ones(1, n, dtype=torch.bool))
    dense_attention(*inputs, reference_mask).square().sum().backward()
    assert all((w - t.grad).abs().max() < 1e-4 for w, t in zip(window_grads, inputs))
    key_mask = torch.ones(1, n, dtype=torch.bool)
    key_mask[0, -3:] = False
    with torch.no_grad():
        sliding_window_attention(*inputs, radius, key_mask=key_mask)
    assert calls == []


@pytest.mark.parametrize("chunk_bytes", [None, 2000])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_sliding_window_gradients_equal_dense_with_equivalent_mask(dropout_p, chunk_bytes, monkeypatch):
    """Training through the window kernel (windowed training): the same gradients as dense attention under the
    window mask, in one SDPA call or several; with dropout (another SDPA path) it must at least run backward."""
    if chunk_bytes is not None:
        monkeypatch.setattr(modeling_eat, "WINDOW_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    n, radius = 23, 3
    inputs = [torch.randn(2, 2, n, 4, requires_grad=True) for _ in range(3)]
    key_mask = torch.ones(2, n, dtype=torch.bool)
    key_mask[0, n - 4:] = False
    got, _ = sliding_window_attention(*inputs, radius, 1, None, key_mask, dropout_p=dropout_p)
    got.square().sum().backward()
    if dropout_p:
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)
        return
    window_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    dense_attention(*inputs, _window_reference_mask(n, radius, 1, key_mask)).square().sum().backward()
    for window_grad, t in zip(window_grads, inputs):
        assert (window_grad - t.grad).abs().max() < 1e-4


def test_sliding_window_work_grows_linearly():
    q = k = v = torch.randn(1, 2, 1024, 8)
    _, small = sliding_window_attention(q[:, :, :512], k[:, :, :512], v[:, :, :512], 16)
    _, large = sliding_window_attention(q, k, v, 16)
    assert large == pytest.approx(2 * small, rel=0.02)
    assert large < 1024 * 1024 / 10


def test_window_model_matches_dense_model_with_mask_and_counts_fewer_scores():
    dense = tiny_model(seed=5)
    sparse = tiny_model(seed=5, attention_window=8)
    ids, mask = mixed_batch(lengths=(60, 33))
    with torch.no_grad():
        out_sparse = sparse(ids, mask)
        out_dense = dense(ids, mask)
        full = sparse(ids[:1, :6], mask[:1, :6])  # window wider than the sequence: dense path, same as dense model
        full_dense = dense(ids[:1, :6], mask[:1, :6])
    assert out_sparse.work.attention_scores < out_dense.work.attention_scores
    assert not torch.allclose(out_sparse.logits, out_dense.logits)  # the window really changed what is seen
    assert torch.allclose(full.logits, full_dense.logits, atol=1e-6)


# --------------------------------------------------------------------------------------- batch vs one-at-a-time


@pytest.mark.parametrize("mode, pooling", [("drop", "cls"), ("merge", "cls"), ("drop", "mean"), ("merge", "mean"),
                                           ("drop", "pair"), ("merge", "pair")])
def test_batched_equals_one_at_a_time_with_everything_on(mode, pooling):
    knobs = dict(keep_ratio=[0.8, 0.7, 0.6], attention_window=6, exit_layers="all", exit_policy="confidence",
                 prune_mode=mode, exit_pooling=pooling)
    model = tiny_model(seed=7, **knobs)
    lengths = (17, 9, 30, 4, 12, 23, 2)
    ids, mask = mixed_batch(seed=8, lengths=lengths)
    # a second segment from the middle of each row on (pair heads read both; the others ignore token types)
    types = ((torch.arange(ids.shape[1])[None, :] >= torch.tensor(lengths)[:, None] // 2) & mask.bool()).long()
    with torch.no_grad():
        cached = model(ids, mask, types, output_exit_logits=True, disable_exit=True)
        # a tau between the confidences of the rows at the second head (the first for pair heads, whose random
        # start is surer there), so exits are mixed
        slot = 0 if pooling == "pair" else 1
        model.config.set_knobs(exit_threshold=float(cached.exit_logits[:, slot].softmax(-1).amax(-1).median()))
        batched = model(ids, mask, types)
        singles = [model(ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n]) for i, n in enumerate(lengths)]
    assert len(set(batched.exit_layer.tolist())) > 1  # exits are mixed inside the batch
    for i, single in enumerate(singles):
        assert torch.allclose(batched.logits[i], single.logits[0], atol=1e-4)
        assert batched.exit_layer[i] == single.exit_layer[0]
        assert batched.tokens_per_layer[i].tolist() == single.tokens_per_layer[0].tolist()


def test_mean_pooled_exit_heads_read_the_mean_of_the_real_tokens():
    """exit_pooling "mean": an exit head reads the mean of its row's real tokens (padding excluded; merged tokens
    weighted by size), the final head still BERT's pooled `[CLS]`; "cls" reads the `[CLS]` vector."""
    from eat.modeling_eat import exit_head_input

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (B=2, n=3, d=2)
    key_mask = torch.tensor([[True, True, True], [True, True, False]])
    sizes = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert torch.equal(exit_head_input(hidden, "cls"), hidden[:, 0])
    assert torch.allclose(exit_head_input(hidden, "mean"), hidden.mean(1))
    assert torch.allclose(exit_head_input(hidden, "mean", key_mask)[1], hidden[1, :2].mean(0))
    weighted = exit_head_input(hidden, "mean", key_mask, sizes)
    assert torch.allclose(weighted[0], (2 * hidden[0, 0] + hidden[0, 1] + hidden[0, 2]) / 4)
    assert torch.allclose(weighted[1], hidden[1, :2].mean(0))

    model = tiny_model(seed=3, exit_layers="all", exit_pooling="mean")
    ids, mask = mixed_batch(seed=4, lengths=(17, 9, 30))
    captured = {}
    model.bert.encoder.layer[0].register_forward_hook(lambda m, a, out: captured.__setitem__(1, out[0]))
    with torch.no_grad():
        out = model(ids, mask, output_exit_logits=True, disable_exit=True)
        real = mask.bool()[..., None]
        expected = model.exit_heads["1"]((captured[1] * real).sum(1) / real.sum(1))
        model.config.set_knobs(exit_pooling="cls")
        cls_out = model(ids, mask, output_exit_logits=True, disable_exit=True)
        cls_expected = model.exit_heads["1"](captured[1][:, 0])
    assert torch.allclose(out.exit_logits[:, 0], expected, atol=1e-6)
    assert torch.allclose(cls_out.exit_logits[:, 0], cls_expected, atol=1e-6)
    assert not torch.allclose(out.exit_logits[:, 0], cls_out.exit_logits[:, 0])
    assert torch.allclose(out.logits, cls_out.logits, atol=1e-6)  # the final head is the same either way
    with pytest.raises(KnobError, match="exit_pooling"):
        model.config.set_knobs(exit_pooling="max")


def test_pair_exit_heads_read_both_segments_means_and_their_comparison():
    """exit_pooling "pair": [a, b, |a - b|, a * b] of the two segments' real-token means (padding excluded, merged
    tokens weighted by size; b = a for a row without a second segment), 4 x hidden wide; the heads start as the
    final head on the average of a and b; a model whose heads were built for another pooling is refused."""
    from eat.modeling_eat import exit_head_input, pair_pooling_weights

    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)  # (B=2, n=4, d=2)
    key_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    segments = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    sizes = torch.tensor([[3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    pooled = exit_head_input(hidden, "pair", key_mask, sizes, segments)
    a, b = (3 * hidden[0, 0] + hidden[0, 1]) / 4, hidden[0, 2:].mean(0)
    assert pooled.shape == (2, 8)
    assert torch.allclose(pooled[0], torch.cat([a, b, (a - b).abs(), a * b]))
    alone = hidden[1, :2].mean(0)  # one segment: b = a, |a - b| = 0
    assert torch.allclose(pooled[1], torch.cat([alone, alone, torch.zeros(2), alone * alone]))
    # the (B, 2, n) weights the model caches once per batch shape: each row a distribution over real tokens
    weights = pair_pooling_weights(hidden, key_mask, sizes, segments)
    assert weights.shape == (2, 2, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2)) and not weights[1, :, 2:].any()
    assert torch.equal(exit_head_input(hidden, "pair", pair_weights=weights), pooled)

    model = tiny_model(seed=3, exit_layers="all", exit_pooling="pair")
    assert model.exit_heads["1"].dense.in_features == 4 * model.config.hidden_size
    ids, mask = mixed_batch(seed=4, lengths=(17, 9, 30))
    types = ((torch.arange(ids.shape[1])[None, :] >= 5) & mask.bool()).long()
    captured = {}
    for i in (0, 1):
        model.bert.encoder.layer[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i + 1, out[0]))
    with torch.no_grad():
        model.init_exit_heads_from_final()
        out = model(ids, mask, types, output_exit_logits=True, disable_exit=True)
        real = mask.bool()
        first, second = (real & (types == 0)).float()[..., None], (real & (types == 1)).float()[..., None]
        a = (captured[1] * first).sum(1) / first.sum(1)
        b = (captured[1] * second).sum(1) / second.sum(1)
        expected = model.exit_heads["1"](torch.cat([a, b, (a - b).abs(), a * b], -1))
        a2 = (captured[2] * first).sum(1) / first.sum(1)  # layer 2's head reuses the weights layer 1's head cached
        b2 = (captured[2] * second).sum(1) / second.sum(1)
        expected_2 = model.exit_heads["2"](torch.cat([a2, b2, (a2 - b2).abs(), a2 * b2], -1))
        as_final = model.classifier(model.bert.pooler((a + b) / 2))  # the start: the final head on (a + b) / 2
    assert torch.allclose(out.exit_logits[:, 0], expected, atol=1e-5)
    assert torch.allclose(out.exit_logits[:, 1], expected_2, atol=1e-5)
    assert torch.allclose(out.exit_logits[:, 0], as_final, atol=1e-5)
    model.config.set_knobs(exit_pooling="mean")
    with pytest.raises(ValueError, match="another pooling"):
        model(ids, mask, types)


# ---------------------------------------------------------------------------------------------- helpers, errors


def test_half_depth_model_copies_every_other_layer():
    model = tiny_model(num_hidden_layers=6)
    half = keep_layers(model, [0, 2, 4])
    assert half.config.num_hidden_layers == 3
    assert torch.equal(half.bert.encoder.layer[1].output.dense.weight, model.bert.encoder.layer[2].output.dense.weight)
    with pytest.raises(ValueError, match="layers"):
        keep_layers(model, [6])


def test_empty_and_position_limit_sequences():
    model = tiny_model(keep_ratio=0.5, attention_window=4, exit_layers="all", exit_policy="confidence")
    with torch.no_grad():
        only_specials = model(torch.tensor([[1, 102 % 120]]))
        longest = model(torch.randint(3, 120, (2, 96)))
    assert only_specials.logits.shape == (1, 3) and torch.isfinite(only_specials.logits).all()
    assert longest.logits.shape == (2, 3)
    with pytest.raises(ValueError, match="position limit"):
        model(torch.randint(3, 120, (1, 97)))
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.ones(1, 5, dtype=torch.long), torch.tensor([[0, 1, 1, 1, 1]]))


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_classifier(str(tmp_path / "missing"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="gpt2.*not a BERT-family"):
        load_classifier(str(tmp_path / "gpt"))
    model = tiny_model()
    model.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_classifier(str(tmp_path / "corrupt"))
    model.save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="noweights"):
        load_classifier(str(tmp_path / "noweights"))
    model.save_pretrained(tmp_path / "three")
    with pytest.raises(CheckpointError, match="3 labels.*another task"):
        load_classifier(str(tmp_path / "three"), num_labels=2)


def test_fused_qkv_cache_follows_weight_changes():
    model = tiny_model()
    ids, mask = mixed_batch()
    with torch.no_grad():
        before = model(ids, mask).logits
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(2.0)
        after = model(ids, mask).logits
    reference = EATForSequenceClassification(model.config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        fresh = reference(ids, mask).logits
    assert not torch.allclose(before, after)
    assert torch.allclose(after, fresh, atol=1e-6)


def test_training_mode_evaluates_every_head_without_exiting():
    model = tiny_model(exit_layers="all", exit_policy="confidence", exit_threshold=0.0).train()
    ids, mask = mixed_batch()
    out = model(ids, mask, labels=torch.zeros(5, dtype=torch.long))
    assert out.exit_layer.tolist() == [4] * 5
    assert out.exit_logits.shape == (5, 4, 3) and torch.isfinite(out.exit_logits).all()
    out.loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert math.isfinite(out.loss.item())


@pytest.mark.slow
def test_flex_backend_matches_blocked_kernel():
    """Compiles FlexAttention (tens of seconds on CPU): behind the slow marker."""
    blocked = tiny_model(seed=9, attention_window=8)
    flex = tiny_model(seed=9, attention_window=8, attention_backend="flex")
    ids, mask = mixed_batch(lengths=(90, 40))
    with torch.no_grad():
        a, b = blocked(ids, mask), flex(ids, mask)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert b.work.attention_scores == 2 * 4 * 128 * 128  # one 128x128 block per row and layer: honest count


def test_pruning_ties_go_to_the_earlier_token_in_both_task_models():
    # one selection rule for sentence and token models: the most important tokens, exact ties to the earlier
    # position (the sentence loop used topk and the token loop a double argsort, whose tie orders differed and
    # could depend on a row's padding); untrained LayerNorms give many hidden states exactly the same norm
    importance = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, float("nan")]])
    real = torch.tensor([[True] * 6 + [False]])
    protected = torch.tensor([[True] + [False] * 6])
    keep = modeling_eat._keep_most_important(importance, real, protected, torch.tensor([3]))
    assert keep.tolist() == [[True, True, True, False, False, False, False]]
    padded = modeling_eat._keep_most_important(torch.cat([importance[:, :6], torch.zeros(1, 9)], 1),
                                               torch.cat([real[:, :6], torch.zeros(1, 9, dtype=torch.bool)], 1),
                                               torch.cat([protected[:, :6], torch.zeros(1, 9, dtype=torch.bool)], 1),
                                               torch.tensor([3]))
    assert padded[:, :6].tolist() == keep[:, :6].tolist() and not padded[:, 6:].any()
    # end to end: norm pruning on tied norms keeps the same tokens for a row alone and inside a padded batch
    model = tiny_model(seed=5, keep_ratio=0.5, prune_importance="norm")
    lengths = (17, 9, 30, 4, 12)
    ids, mask = mixed_batch(seed=6, lengths=lengths)
    with torch.no_grad():
        batched = model.bert(ids, mask)
        for i, n in enumerate(lengths):
            alone = model.bert(ids[i:i + 1, :n])
            kept = batched.token_positions[i][batched.attention_mask[i]]
            assert kept.tolist() == alone.token_positions[0][alone.attention_mask[0]].tolist()


def test_exit_depth_stops_the_pass_at_a_head_and_never_runs_the_layers_after_it():
    """exit_depth=2 of 4: rows the rule does not pass leave at head 2 with its output; layers 3-4 never run (no
    tokens, no layer counted); training and the cache pass (disable_exit) still run every layer."""
    model = tiny_model(seed=3, exit_layers="all", exit_policy="confidence")
    ids, mask = mixed_batch(seed=4, lengths=(17, 9, 30, 4, 12, 22, 8))
    with torch.no_grad():
        cached = model(ids, mask, output_exit_logits=True, disable_exit=True)  # (B, 4, C) every head
        confidence = cached.exit_logits.softmax(-1).amax(-1)
        tau = float(confidence[:, 0].median())  # about half the rows leave at head 1
        model.config.set_knobs(exit_threshold=tau, exit_depth=2)
        capped = model(ids, mask)
        expected_exit = torch.where(confidence[:, 0] >= tau, 1, 2)
        assert capped.exit_layer.tolist() == expected_exit.tolist() and set(expected_exit.tolist()) == {1, 2}
        chosen = cached.exit_logits[torch.arange(len(ids)), expected_exit - 1]
        assert torch.allclose(capped.logits, chosen, atol=1e-5)
        assert capped.tokens_per_layer[:, 2:].sum() == 0 and capped.tokens_per_layer[:, 1].gt(0).sum() < len(ids)
        assert capped.work.layers_run == len(ids) + int((expected_exit == 2).sum())
        # a pure truncation: no rule, every row answered by head 2
        model.config.set_knobs(exit_policy="none", exit_layers=[2], exit_depth=2)
        truncated = model(ids, mask)
        assert truncated.exit_layer.tolist() == [2] * len(ids)
        assert torch.allclose(truncated.logits, cached.exit_logits[:, 1], atol=1e-5)
        assert truncated.work.exit_head_rows == len(ids) and truncated.tokens_per_layer[:, 2:].sum() == 0
        # the cache pass ignores the cap (the tuner replays every cap from it), as does training
        full = model(ids, mask, output_exit_logits=True, disable_exit=True)
        assert full.tokens_per_layer[:, 3].gt(0).all()
    model.train()
    trained = model(ids, mask)
    assert trained.tokens_per_layer[:, 3].gt(0).all()


def test_exit_depth_is_validated_reset_by_mechanisms_off_and_refused_by_token_models():
    from eat.configuration_eat import MECHANISMS_OFF
    from eat.modeling_eat import EATForTokenClassification

    with pytest.raises(KnobError, match="exit_depth: layer 2 has no exit head"):
        tiny_config(exit_layers=[1, 3], exit_depth=2)
    with pytest.raises(KnobError, match="exit_depth: layer 2 has no exit head"):
        tiny_config(exit_depth=2)  # exit_layers None: the last layer's head only
    with pytest.raises(KnobError, match=r"exit_depth: expected None or a layer in 1..4"):
        tiny_config(exit_layers="all", exit_depth=5)
    config = tiny_config(exit_layers="all", exit_depth=3, exit_policy="confidence")
    with pytest.raises(KnobError, match="exit_depth"):  # refused, and nothing changed
        config.set_knobs(exit_layers=[1, 2])
    assert config.exit_depth == 3 and config.exit_layers == "all"
    config.set_knobs(**MECHANISMS_OFF)
    assert config.exit_depth is None
    torch.manual_seed(0)
    tagger = EATForTokenClassification(tiny_config(exit_layers="all", exit_depth=2)).eval()
    ids, mask = mixed_batch(seed=1, lengths=(6, 9))
    with pytest.raises(KnobError, match="exit_depth: 2 is for sequence models"):
        tagger(ids, mask)
