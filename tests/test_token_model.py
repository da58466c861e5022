"""Token classification with token-level exits: parity, real work removed (counters, shapes), batch invariance."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

from eat import EATConfig
from eat.checkpoints import CheckpointError, load_classifier
from eat.modeling_eat import EATForTokenClassification, EATLayer, token_exit_decision, token_exit_owner
from eat.training import token_multi_exit_loss

from .conftest import mixed_batch, tiny_config


def tiny_tagger(seed: int = 0, **knobs) -> EATForTokenClassification:
    """A random tiny token classifier with exit heads after every layer."""
    torch.manual_seed(seed)
    return EATForTokenClassification(tiny_config(num_labels=5, exit_layers="all", **knobs)).eval()


def word_mask_for(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """First-subword flags: random, never on [CLS] or [SEP], always on the first word."""
    generator = torch.Generator().manual_seed(seed)
    words = (torch.rand(mask.shape, generator=generator) > 0.35) & mask.bool()
    lengths = mask.sum(1)
    words[:, 0] = False
    words[torch.arange(len(lengths)), lengths - 1] = False
    words[:, 1] = True
    return words


def middle_tau(model, ids, mask, words) -> float:
    """A threshold that lets roughly half the labelled tokens exit early (random weights are unconfident)."""
    with torch.no_grad():
        out = model(ids, mask, word_mask=words, output_exit_logits=True, disable_exit=True)
    confidence = out.exit_logits.softmax(-1).amax(-1)  # (B, E, n)
    return float(confidence[:, 0][words].median())


def test_parity_with_hf_bert_token_classification():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=5)
    hf = BertForTokenClassification(config).eval()
    eat = EATForTokenClassification(EATConfig(**config.to_dict())).eval()
    eat.load_state_dict(hf.state_dict(), strict=True)
    ids, mask = mixed_batch(lengths=(20, 7, 13))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = eat(ids, mask).logits
    real = mask.bool()
    assert (expected[real] - got[real]).abs().max() < 1e-5
    assert torch.isnan(got[~real]).all()  # padding gets no label


def test_thresholds_zero_and_above_one():
    model = tiny_tagger()
    ids, mask = mixed_batch(lengths=(12, 6, 9))
    words = word_mask_for(mask)
    with torch.no_grad():
        model.config.set_knobs(exit_policy="confidence", exit_threshold=0.0)
        early = model(ids, mask, word_mask=words)
        model.config.set_knobs(exit_threshold=1.5)
        never = model(ids, mask, word_mask=words)
    real = mask.bool()
    assert (early.token_exit_layer[real] == 1).all()
    assert early.work.token_layers == int(mask.sum())  # one layer of work per token
    assert (never.token_exit_layer[real] == 4).all()
    assert never.work.token_layers == int(mask.sum()) * 4


@pytest.mark.parametrize("kv", ["keep", "drop"])
def test_token_exits_shrink_the_queries(kv):
    model = tiny_tagger(token_exit_kv=kv)
    ids, mask = mixed_batch(lengths=(30, 18, 25))
    words = word_mask_for(mask)
    tau = middle_tau(model, ids, mask, words)
    model.config.set_knobs(exit_policy="confidence", exit_threshold=tau)
    seen = []
    original = EATLayer.forward_queries

    def spy(layer, queries, keys_values, mask=None):
        seen.append((queries.shape[1], keys_values.shape[1]))
        return original(layer, queries, keys_values, mask)

    EATLayer.forward_queries = spy
    try:
        with torch.no_grad():
            out = model(ids, mask, word_mask=words)
    finally:
        EATLayer.forward_queries = original
    real_tokens = int(mask.sum())
    assert out.work.token_layers < real_tokens * 4  # fewer token-layers than the static model
    assert out.work.token_layers == int(out.tokens_per_layer.sum())
    assert (out.tokens_per_layer[:, 1:] <= out.tokens_per_layer[:, :-1]).all()  # never grows
    assert seen, "after the first exits, layers must run on the remaining queries only"
    assert all(m < 30 for m, _ in seen)  # query tensors really shorter
    if kv == "keep":
        assert all(nk >= m for m, nk in seen) and out.work.kv_token_layers > 0
    else:
        assert all(nk == m for m, nk in seen) and out.work.kv_token_layers == 0
    # a token's label comes from the head of the layer it left at
    with torch.no_grad():
        heads = model(ids, mask, word_mask=words, output_exit_logits=True).exit_logits  # (B, E, n, C)
    row, position = words.nonzero()[0]
    layer = int(out.token_exit_layer[row, position])
    assert torch.allclose(out.logits[row, position], heads[row, layer - 1, position], atol=1e-5)


@pytest.mark.parametrize("knobs", [
    dict(token_exit_kv="keep"),
    dict(token_exit_kv="keep", exit_policy="agreement", exit_patience=2),
    dict(token_exit_kv="drop", token_exit_window=1),
    dict(token_exit_kv="keep", keep_ratio=[1.0, 0.6, 1.0, 1.0], attention_window=6),
])
def test_batched_equals_one_at_a_time(knobs):
    model = tiny_tagger(seed=3, **knobs)
    ids, mask = mixed_batch(seed=2, lengths=(22, 9, 15, 5))
    words = word_mask_for(mask, seed=2)
    tau = middle_tau(model, ids, mask, words)
    policy = knobs.get("exit_policy", "confidence")
    model.config.set_knobs(exit_policy=policy, exit_threshold=tau * 0.8 if policy == "agreement" else tau)
    with torch.no_grad():
        batched = model(ids, mask, word_mask=words)
        assert int(batched.token_exit_layer[words].min()) < 4  # some tokens really left early
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = model(ids[row:row + 1, :n], word_mask=words[row:row + 1, :n])
            labelled = words[row, :n]
            assert torch.equal(alone.token_exit_layer[0], batched.token_exit_layer[row, :n])
            assert torch.allclose(alone.logits[0][labelled], batched.logits[row, :n][labelled], atol=1e-5)


def test_pruning_never_drops_a_labelled_token():
    model = tiny_tagger(keep_ratio=0.3)
    ids, mask = mixed_batch(lengths=(30, 12))
    words = word_mask_for(mask)
    with torch.no_grad():
        out = model(ids, mask, word_mask=words)
    assert not torch.isnan(out.logits[words]).any()  # every labelled token got a label
    assert (out.token_exit_layer[words] == 4).all()
    assert out.tokens_per_layer[0, -1] < out.tokens_per_layer[0, 0]  # but unlabelled tokens did go
    assert out.tokens_per_layer[0, -1] >= int(words[0].sum())


def test_owner_and_window_rules():
    labelled = torch.tensor([[False, True, False, True, True, False, False]])
    assert token_exit_owner(labelled).tolist() == [[1, 1, 1, 3, 4, 4, 4]]
    # confidences of labelled tokens at 1, 3, 4: only token 3 is unsure
    logits = torch.zeros(1, 7, 2)
    logits[0, [1, 4], 0] = 10.0
    logits[0, 3, 0] = 0.1
    active = torch.ones(1, 7, dtype=torch.bool)
    alone, _, _ = token_exit_decision(logits, labelled, active, "confidence", 0.9, 0.1, window=0)
    assert alone.tolist() == [[False, True, False, False, True, False, False]]
    windowed, _, _ = token_exit_decision(logits, labelled, active, "confidence", 0.9, 0.1, window=1)
    assert windowed.tolist() == [[False, True, False, False, False, False, False]]  # 4 waits for its neighbour 3
    # agreement: confident AND the same prediction as the previous head
    first, streak, previous = token_exit_decision(logits, labelled, active, "agreement", 0.9, 0.1, 0, 2)
    assert not first.any() and streak.tolist() == [[1] * 7]  # one head seen: no agreement yet
    flipped = logits.clone()
    flipped[0, 4] = torch.tensor([0.0, 10.0])  # token 4 changes its mind
    second, streak, _ = token_exit_decision(flipped, labelled, active, "agreement", 0.9, 0.1, 0, 2, streak, previous)
    assert second.tolist() == [[False, True, False, False, False, False, False]]
    assert streak[0, 1] == 2 and streak[0, 4] == 1
    with pytest.raises(ValueError, match="token-level"):
        token_exit_decision(logits, labelled, active, "none", 0.9, 0.1, window=0)


def test_training_mode_gives_every_head_and_a_loss_that_backpropagates():
    model = tiny_tagger().train()
    ids, mask = mixed_batch(lengths=(10, 6))
    words = word_mask_for(mask)
    labels = torch.where(words, torch.randint(0, 5, ids.shape), torch.full_like(ids, -100))
    out = model(ids, mask, word_mask=words)
    assert out.exit_logits.shape == (2, 4, ids.shape[1], 5)
    loss = token_multi_exit_loss(out.exit_logits, labels, torch.full((4,), 0.25), 1.0, 2.0)
    loss.backward()
    assert model.exit_heads["1"].classifier.weight.grad is not None
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_save_load_roundtrip_and_wrong_kind(tmp_path):
    model = tiny_tagger(token_exit_kv="drop", token_exit_window=2)
    model.save_pretrained(tmp_path)
    loaded = load_classifier(str(tmp_path), token_level=True)
    assert isinstance(loaded, EATForTokenClassification)
    assert loaded.config.token_exit_kv == "drop" and loaded.config.token_exit_window == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    with pytest.raises(CheckpointError, match="token"):
        load_classifier(str(tmp_path))  # a tagger is not a sentence classifier


def test_bad_token_knobs():
    from eat import KnobError

    with pytest.raises(KnobError, match="token_exit_kv"):
        tiny_config(token_exit_kv="maybe")
    with pytest.raises(KnobError, match="token_exit_window"):
        tiny_config(token_exit_window=-1)


def test_negative_entropy_threshold_turns_token_exits_off():
    # nothing has a negative entropy, so exits are off: as for sentence models, only the final head runs (the
    # token loop used to evaluate every head on every token and let none leave)
    model = tiny_tagger()
    ids, mask = mixed_batch(lengths=(12, 6, 9))
    words = word_mask_for(mask)
    with torch.no_grad():
        model.config.set_knobs(exit_policy="entropy", entropy_threshold=-0.1)
        off = model(ids, mask, word_mask=words)
        model.config.set_knobs(exit_policy="none")
        none = model(ids, mask, word_mask=words)
    real = mask.bool()
    assert (off.token_exit_layer[real] == 4).all()
    assert off.work.exit_head_rows == none.work.exit_head_rows == int(mask.sum())  # the final head only
    assert torch.equal(off.logits[real], none.logits[real])


@pytest.mark.parametrize("token", [False, True])
def test_missing_exit_heads_are_named_and_added_from_the_final_head(token):
    from eat.modeling_eat import EATForSequenceClassification

    torch.manual_seed(0)
    model = (EATForTokenClassification if token else EATForSequenceClassification)(tiny_config()).eval()
    model.config.set_knobs(exit_layers=[2, 4])
    ids, mask = mixed_batch(lengths=(7, 5))
    with pytest.raises(ValueError, match=r"names layers \[2\] that have no exit head"):
        model(ids, mask)
    model.add_exit_heads([2, 4])
    assert sorted(model.exit_heads) == ["2"]
    assert torch.equal(model.exit_heads["2"].classifier.weight, model.classifier.weight)  # a copy of the final head
    with torch.no_grad():
        out = model(ids, mask, output_exit_logits=True, disable_exit=True)
    assert out.exit_logits.shape[1] == 2 and not torch.isnan(out.exit_logits[:, 0]).all()
