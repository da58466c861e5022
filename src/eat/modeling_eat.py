"""EAT: a BERT-compatible encoder whose token pruning, sparse attention and early exit remove real work.

One file, read top to bottom:

1. pure functions: attention kernels (dense SDPA, blocked sliding window), token importance, token
   compaction (drop), bipartite token merging (ToMe), exit policies;
2. the module tree with Hugging Face `BertModel` parameter names (`embeddings.*`, `encoder.layer.N.attention.self.query`,
   ...), so every BERT checkpoint loads with `from_pretrained`;
3. the layer loop (`EATModel.forward`), which keeps a batch's bookkeeping in `_TokenState` and shrinks the tensors:
   pruned tokens are gathered away, exited rows leave the batch, and padding is trimmed as soon as the longest
   row is gone;
4. `EATForSequenceClassification` with exit heads.

Shapes in comments: B batch rows still running, n current sequence length, d hidden size, H heads, dh head size.
Modifications with respect to Hugging Face `BertModel`: the attention kernel (fused QKV at inference, windowed
attention), the layer loop (pruning, exits, compaction); everything else computes the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_eat import EATConfig, KnobError

# ---------------------------------------------------------------------------------------------------------------
# 1. Pure functions
# ---------------------------------------------------------------------------------------------------------------


def dense_attention(q, k, v, mask=None, dropout_p: float = 0.0):
    """Full attention with `scaled_dot_product_attention`. q, k, v: (B, H, n, dh); mask broadcastable to
    (B, H, n, n), bool (True = attend) or additive float. Returns (B, H, n, dh)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _band_mask(block: int, radius: int, device) -> torch.Tensor:
    """(block, block + 2 * radius) bool: query t of a block sees window key w iff |t - (w - radius)| <= radius."""
    t = torch.arange(block, device=device)[:, None]
    w = torch.arange(block + 2 * radius, device=device)[None, :]
    offset = w - t  # key position minus query position, shifted by radius
    return (offset >= 0) & (offset <= 2 * radius)


def _window_geometry(n: int, radius: int, num_global: int, block: int | None):
    """(g, block, number of blocks, padded length, window width) of the blocked window kernel."""
    g = min(num_global, n)
    block = block or max(radius, 1)
    num_blocks = -(-n // block)
    return g, block, num_blocks, num_blocks * block, block + 2 * radius


def window_key_index(n: int, radius: int, num_global: int = 1, block: int | None = None, device="cpu"):
    """Key positions of every query block of :func:`sliding_window_attention`, flattened to (nb * (g + W),): the
    g global tokens, then the band [i * block - radius, i * block + block + radius) clamped into [0, n) (slots
    outside the sequence are masked by :func:`window_attention_mask`). One `index_select` with it gathers every
    block's keys in a single copy."""
    g, block, num_blocks, _, width = _window_geometry(n, radius, num_global, block)
    band = torch.arange(num_blocks, device=device)[:, None] * block - radius + torch.arange(width, device=device)
    glob = torch.arange(g, device=device).expand(num_blocks, g)
    return torch.cat([glob, band.clamp(0, n - 1)], dim=1).reshape(-1)


def window_attention_mask(B: int, n: int, radius: int, num_global: int = 1, block: int | None = None,
                          key_mask=None, key_bias=None, device="cpu"):
    """The per-block SDPA mask of :func:`sliding_window_attention`: (B * nb, 1, block, g + W), additive float
    (0 = attend, -inf = not), so SDPA does not convert a bool mask in every layer.

    It depends only on the batch's shape and padding, so the model builds it once per batch and every layer
    reuses it.
    """
    g, block, num_blocks, n_pad, width = _window_geometry(n, radius, num_global, block)
    # Which window keys are real: inside [g, n) (the global ones are already in front) and not padding.
    real = torch.ones(B, n, dtype=torch.bool, device=device) if key_mask is None else key_mask
    window_real = real.clone()
    window_real[:, :g] = False
    window_real = F.pad(window_real, (radius, radius + n_pad - n), value=False).unfold(1, width, block)  # (B, nb, W)
    allowed = _band_mask(block, radius, device)[None, None] & window_real[:, :, None, :]  # (B, nb, b, W)
    glob_real = real[:, None, None, :g].expand(B, num_blocks, block, g)
    allowed = torch.cat([glob_real, allowed], dim=-1)  # (B, nb, b, g + W)
    if key_bias is None:
        mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
    else:
        bias_win = F.pad(key_bias, (radius, radius + n_pad - n)).unfold(1, width, block)  # (B, nb, W)
        bias = torch.cat([key_bias[:, None, None, :g].expand(B, num_blocks, block, g),
                          bias_win[:, :, None, :].expand(B, num_blocks, block, width)], dim=-1)
        mask = bias.masked_fill(~allowed, float("-inf"))
    return mask.reshape(B * num_blocks, 1, block, g + width)


# Bytes of gathered keys (and as many of values) per SDPA call of the window kernel. Long inputs are cut into
# groups of query blocks so these buffers stay cache-sized and below glibc's 32 MiB mmap threshold: a larger
# buffer is mapped fresh on every call and its page faults cost ~10 ms per 38 MiB (8,192 tokens, 12 heads).
WINDOW_CHUNK_BYTES = 8 * 2**20


# The CPU flash-attention kernel behind SDPA, called directly because it also returns each query's log-sum-exp
# (needed to merge the band's softmax with the global keys'); None where this torch build lacks it.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _blocks_view(t, batch_row: int, first_token: int, count: int, step: int, rows: int):
    """(count, H, rows, dh) view of t (B, H, n, dh) whose i-th entry is t[batch_row, :, first_token + i * step :
    first_token + i * step + rows]. The windows of neighbouring blocks overlap in memory; nothing is copied.
    Needs unit stride on the last dimension (both layouts the model produces have it)."""
    s_batch, s_head, s_token, _ = t.stride()
    return t.as_strided((count, t.shape[1], rows, t.shape[3]), (step * s_token, s_head, s_token, 1),
                        t.storage_offset() + batch_row * s_batch + first_token * s_token)


def _band_views_apply(q, k, v, key_mask, dropout_p: float) -> bool:
    """Whether :func:`sliding_window_attention` may read interior blocks' keys as overlapping views (inference on
    CPU without padding): the flash kernel's log-sum-exp has no gradient, and padded rows could leave a band with
    no real key (a NaN row), so training, dropout and padded batches take the gathering path."""
    return (_FLASH_CPU is not None and q.device.type == "cpu" and key_mask is None and dropout_p == 0.0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def _interior_band_attention(q, k, v, out_blocks, block_masks, key_bias, radius: int, g: int, block: int,
                             width: int, first_inner: int, end_inner: int) -> None:
    """The interior query blocks of :func:`sliding_window_attention` (those whose band lies wholly in [g, n)),
    each row's blocks in one flash call on overlapping strided views of its keys; the global keys' softmax is
    merged in through the log-sum-exps. Writes blocks [first_inner, end_inner) of ``out_blocks``
    (B, num_blocks, block, H, dh); block_masks: (B, num_blocks, 1, block, g + width)."""
    B = q.shape[0]
    dh = q.shape[-1]
    count = end_inner - first_inner
    scale = 1.0 / math.sqrt(dh)
    for row in range(B):
        queries = _blocks_view(q, row, first_inner * block, count, block, block)  # (count, H, block, dh)
        keys, values = (_blocks_view(t, row, first_inner * block - radius, count, block, width) for t in (k, v))
        if key_bias is None:  # one (1, 1, block, W) mask broadcast over the blocks: SDPA reads 1/count of it
            band_mask = block_masks[row, first_inner:first_inner + 1, :, :, g:].expand(count, -1, -1, -1)
        else:  # merge-mode key biases differ from block to block
            band_mask = block_masks[row, first_inner:end_inner, :, :, g:]  # (count, 1, block, W)
        band_out, band_lse = _FLASH_CPU(queries, keys, values, attn_mask=band_mask)  # lse: (count, H, block)
        # The global keys' own softmax: scores (count, H, block, g), then both merged by their log-sum-exps.
        glob_scores = torch.matmul(queries, k[row, :, :g].transpose(-1, -2)) * scale
        if key_bias is not None:
            glob_scores = glob_scores + key_bias[row, :g]
        if g == 1:  # one global key (`[CLS]`): its softmax is 1, its output its value row
            glob_lse, glob_out = glob_scores[..., 0], v[row, :, :1]  # (count, H, block), (H, 1, dh)
        else:
            glob_lse = glob_scores.logsumexp(-1)
            glob_out = torch.matmul(torch.softmax(glob_scores, -1), v[row, :, :g])  # (count, H, block, dh)
        # softmax mass on the band; the kernel's lse is float32 whatever the inputs' dtype
        band_share = torch.sigmoid(band_lse - glob_lse.float()).unsqueeze(-1).to(band_out.dtype)
        merged = torch.lerp(glob_out, band_out, band_share)
        out_blocks[row, first_inner:end_inner] = merged.transpose(1, 2)


def sliding_window_attention(q, k, v, radius: int, num_global: int = 1, block: int | None = None,
                             key_mask=None, key_bias=None, dropout_p: float = 0.0, mask=None, index=None):
    """Sliding-window attention with global leading tokens, computed block by block.

    Token ``p`` attends to tokens ``j`` with ``|p - j| <= radius`` and to the first ``num_global`` tokens; the
    first ``num_global`` tokens attend to everything. Work is ``n * (block + 2 * radius + num_global)`` scores,
    never ``n * n``: queries are cut into blocks of ``block`` tokens and each block meets only the keys of its
    band plus the global keys.

    Two ways to give a block its keys:

    - interior blocks (band wholly inside the sequence) at inference without padding: the band is a contiguous
      run of key rows, so all of them are one overlapping strided view of ``k`` (no copy); SDPA runs on the band
      alone and the global keys join afterwards through the log-sum-exp (two softmaxes merged exactly);
    - otherwise (the two edge blocks, training, padded batches): the global keys and the band are gathered by
      `index_select` into one key list per block, in batched SDPA calls of up to ``WINDOW_CHUNK_BYTES`` each.

    q, k, v: (B, H, n, dh). key_mask: (B, n) bool (True = real token) or None. key_bias: (B, n) float added to
    every score of that key (log token sizes after merging) or None. mask: the result of
    :func:`window_attention_mask` for these arguments and index the result of :func:`window_key_index`, when
    the caller has them already (the model builds both once per batch).
    Returns ((B, H, n, dh) as a view of a token-major (B, n, H, dh) tensor, scores computed).
    """
    B, H, n, dh = q.shape
    g, block, num_blocks, n_pad, width = _window_geometry(n, radius, num_global, block)
    slots = g + width  # keys per query block
    if mask is None:
        mask = window_attention_mask(B, n, radius, num_global, block, key_mask, key_bias, q.device)
    if index is None:
        index = window_key_index(n, radius, num_global, block, q.device)
    block_masks = mask.view(B, num_blocks, 1, block, slots)
    # Token-major output (B, n_pad, H, dh), the order the output projection reads: the caller's
    # `transpose(1, 2).reshape(B, n, H * dh)` is then a view. Each block's result is copied in once.
    out = q.new_empty(B, n_pad, H, dh)
    out_blocks = out.view(B, num_blocks, block, H, dh)

    # Interior blocks i in [first_inner, end_inner): band [i * block - radius, i * block + block + radius) in
    # [g, n), so no band holds a global key and, without padding, every interior block has the same mask.
    first_inner, end_inner = 0, 0
    if _band_views_apply(q, k, v, key_mask, dropout_p):
        first_inner, end_inner = -(-(radius + g) // block), (n - block - radius) // block + 1
        if end_inner <= first_inner:  # no interior block (short input): every block in the gathering pass
            first_inner, end_inner = 0, 0
    if end_inner > first_inner:
        _interior_band_attention(q, k, v, out_blocks, block_masks, key_bias, radius, g, block, width,
                                 first_inner, end_inner)

    # Edge blocks (or every block): gathered keys, query blocks grouped so the gathered buffers stay small.
    padded_q = F.pad(q, (0, 0, 0, n_pad - n)) if n_pad != n else q
    block_queries = padded_q.view(B, H, num_blocks, block, dh)
    per_call = max(1, WINDOW_CHUNK_BYTES // (B * H * slots * dh * k.element_size()))
    edges = ((0, first_inner), (end_inner, num_blocks))  # without interior: (0, 0) and every block
    gathered = [(start, min(start + per_call, stop)) for lo, stop in edges for start in range(lo, stop, per_call)]
    for first, last in gathered:
        count = last - first
        # Keys of block i: the global ones, then positions [i * block - radius, i * block + block + radius).
        group_index = index[first * slots:last * slots]
        keys, values = (t.index_select(2, group_index).view(B, H, count, slots, dh).transpose(1, 2)
                        for t in (k, v))  # (B, count, H, slots, dh)
        queries = block_queries[:, :, first:last].transpose(1, 2)  # (B, count, H, block, dh)
        group_mask = block_masks[:, first:last]
        if B == 1:  # batch 1 (the long-input case): strided views, no copy; SDPA reads them as they are
            keys, values, queries, group_mask = keys[0], values[0], queries[0], group_mask[0]
        else:
            keys, values, queries = (t.reshape(B * count, H, -1, dh) for t in (keys, values, queries))
            group_mask = group_mask.reshape(B * count, 1, block, slots)
        group_out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group_mask, dropout_p=dropout_p)
        out_blocks[:, first:last] = group_out.view(B, count, H, block, dh).transpose(2, 3)

    # Global queries see every key; their rows replace the band's (in our own buffer: autograd-safe).
    glob_mask = _dense_mask(key_mask, key_bias)
    out_glob = F.scaled_dot_product_attention(q[:, :, :g], k, v, attn_mask=glob_mask, dropout_p=dropout_p)
    out[:, :g] = out_glob.transpose(1, 2)
    scores = B * (num_blocks * block * slots + g * n)
    return out[:, :n].transpose(1, 2), scores


_FLEX_COMPILED = None


def flex_window_block_mask(n: int, radius: int, num_global: int, key_lengths=None, device="cpu"):
    """FlexAttention block mask of the sliding window with global leading tokens (and key padding when
    ``key_lengths`` (B,) is given). Blocks wholly outside the band are skipped, so work grows with n * window."""
    from torch.nn.attention.flex_attention import create_block_mask

    def window(b, h, q_index, k_index):
        allowed = ((q_index - k_index).abs() <= radius) | (q_index < num_global) | (k_index < num_global)
        if key_lengths is not None:
            allowed = allowed & (k_index < key_lengths[b])
        return allowed

    batch = None if key_lengths is None else key_lengths.shape[0]
    return create_block_mask(window, batch, None, n, n, device=device)


def flex_window_attention(q, k, v, block_mask):
    """Sliding-window attention through compiled FlexAttention. q, k, v: (B, H, n, dh).

    Returns ((B, H, n, dh), scores computed = evaluated blocks x block area)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    out = _FLEX_COMPILED(q, k, v, block_mask=block_mask)
    blocks = int(block_mask.kv_num_blocks.sum())
    if block_mask.full_kv_num_blocks is not None:
        blocks += int(block_mask.full_kv_num_blocks.sum())
    q_block, kv_block = block_mask.BLOCK_SIZE
    per_head = blocks * q_block * kv_block // max(1, block_mask.kv_num_blocks.shape[1])
    batch_factor = q.shape[0] if block_mask.kv_num_blocks.shape[0] == 1 else 1
    return out, per_head * batch_factor


def _dense_mask(key_mask, key_bias):
    """SDPA mask (B, 1, 1, n) from a key mask (B, n) and/or an additive key bias (B, n); None when neither."""
    if key_bias is not None:
        bias = key_bias if key_mask is None else key_bias.masked_fill(~key_mask, float("-inf"))
        return bias[:, None, None, :]
    if key_mask is not None:
        return key_mask[:, None, None, :]
    return None


def cls_attention_importance(q, k, key_mask=None):
    """Attention paid by `[CLS]` to every token, averaged over heads. q, k: (B, H, n, dh) -> (B, n).

    Costs one query row (B * H * n * dh), so it is cheap even when the layer's attention ran in a fused kernel
    that never materialised its probabilities.
    """
    scores = q[:, :, :1] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, 1, n)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1).mean(dim=(1, 2))


def mean_attention_importance(q, k, key_mask=None):
    """Attention received by every token, averaged over real queries and heads. (B, H, n, dh) -> (B, n).

    Materialises the (B, H, n, n) probabilities, so it costs as much as one dense attention call.
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, n, n)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    if key_mask is None:
        return probs.mean(dim=(1, 2))
    query_weight = key_mask.to(probs.dtype)[:, None, :, None]  # padding queries do not vote
    return (probs * query_weight).sum(dim=(1, 2)) / (query_weight.sum(dim=(1, 2)) * probs.shape[1])


def compaction_index(keep, lengths_kept):
    """Indices that gather the kept tokens of every row to the front, in their original order.

    keep: (B, n) bool; lengths_kept: (B,) number of True per row. Returns (index (B, k), valid (B, k)) with
    k = max(lengths_kept); positions past a row's own count are filler (valid False).
    """
    B, n = keep.shape
    k = int(lengths_kept.max())
    positions = torch.arange(n, device=keep.device).expand(B, n)
    order = torch.where(keep, positions, positions + n)  # kept tokens sort first, each group in position order
    order = order.sort(dim=1).values[:, :k]
    valid = order < n
    return torch.where(valid, order, order - n), valid


def bipartite_merge_plan(metric, merges, mergeable):
    """ToMe bipartite soft matching: which even-position token merges into which odd-position token.

    metric: (B, n, c) token features (keys); merges: (B,) how many tokens each row should lose; mergeable: (B, n)
    bool, False for protected tokens and padding (they neither merge away nor receive). Pure function: knows
    nothing of models. Returns (src (B, na) bool: even token merges away, dst (B, na) long: odd-set index it
    merges into); the number of merges per row is capped by what can merge (at most half the tokens).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, na, c), (B, nb, c)
    similarity = a @ b.transpose(-1, -2)  # (B, na, nb)
    similarity = similarity.masked_fill(~mergeable[:, 1::2, None].transpose(1, 2), float("-inf"))
    best, dst = similarity.max(dim=-1)  # (B, na)
    best = best.masked_fill(~mergeable[:, ::2], float("-inf"))
    order = best.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    src = (rank < merges[:, None]) & torch.isfinite(best)
    return src, dst


# the input checks of a batch (the layer loop's, and the ONNX Runtime runner's numpy twin of them)
NOT_RIGHT_PADDED = "attention_mask must be right-padded (real tokens first); use padding_side='right'"
EMPTY_ROW = "a row of the batch has no real token (attention_mask all zero)"


def exit_decision(logits, policy: str, tau: float, entropy_threshold: float, patience: int, streak=None, previous=None):
    """Which rows leave at this head. logits: (B, C). Returns (exit (B,) bool, streak, previous prediction).

    - "confidence": max softmax probability >= tau (tau 0 exits at the first head, tau > 1 never);
    - "entropy": prediction entropy in nats <= entropy_threshold;
    - "patience": the last `patience` heads agree (PABEE with patience t is `patience = t + 1`);
    - "agreement": both: the last `patience` heads agree and the max probability is >= tau.

    Regression heads (logits (B, 1), one real value each) have rules of their own; tau is in the label's units:

    - "delta": PABEE's regression rule: the last `patience` predictions each differ from the one before by
      less than tau (state: streak (B,) and the previous prediction (B,));
    - "spread": the last `patience` predictions all lie within a band narrower than tau (max - min < tau), so a
      slow drift of small steps, which "delta" lets through, keeps a row running (state: streak (B,) heads seen
      and previous (B, <= patience) the last predictions).
    """
    if policy == "confidence":
        return logits.softmax(-1).amax(-1) >= tau, streak, previous
    if policy == "entropy":
        log_probs = logits.log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return entropy <= entropy_threshold, streak, previous
    if policy in ("patience", "agreement"):
        prediction = logits.argmax(-1)
        if previous is None:
            streak = torch.ones_like(prediction)
        else:
            streak = torch.where(prediction == previous, streak + 1, torch.ones_like(streak))
        leave = streak >= patience
        if policy == "agreement":
            leave = leave & (logits.softmax(-1).amax(-1) >= tau)
        return leave, streak, prediction
    if policy in ("delta", "spread"):
        value = logits[:, 0]  # (B,) the regression output
        if policy == "delta":
            if previous is None:
                streak = torch.ones(value.shape, dtype=torch.long, device=value.device)
            else:
                streak = torch.where((value - previous).abs() < tau, streak + 1, torch.ones_like(streak))
            return streak >= patience, streak, value
        # (B, h) the last h <= patience predictions, this head's last
        history = value[:, None] if previous is None else torch.cat([previous, value[:, None]], 1)[:, -patience:]
        streak = torch.ones(value.shape, dtype=torch.long, device=value.device) if streak is None else streak + 1
        leave = (streak >= patience) & (history.amax(1) - history.amin(1) < tau)
        return leave, streak, history
    return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), streak, previous


# ---------------------------------------------------------------------------------------------------------------
# 2. Modules (Hugging Face BERT parameter names)
# ---------------------------------------------------------------------------------------------------------------


class EATEmbeddings(nn.Module):
    """Word + position (+ token type) embeddings, LayerNorm, dropout. Token types are absent when
    ``type_vocab_size == 0`` (DistilBERT)."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size > 0 else None)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        """input_ids, token_type_ids: (B, n) -> (B, n, d)."""
        n = input_ids.shape[1]
        limit = self.position_embeddings.num_embeddings
        if n > limit:
            raise ValueError(f"input of {n} tokens is longer than the model's position limit ({limit}); "
                             "truncate it (the tokenizer's max_length) first")
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings.weight[:n]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                embeddings = embeddings + self.token_type_embeddings.weight[0]
            else:
                embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


_FUSED_QKV_MAX_ROWS = 256  # B * n above which separate Q/K/V projections are faster on CPU (measured)


def _linear(module: nn.Module, x):
    """``module(x)`` for a linear layer, without the module call's overhead when it is a plain ``nn.Linear``; a
    replaced linear (e.g. an int8 one from :mod:`eat.deploy.quantize`, whose ``weight`` is a method) is called."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)


class EATSelfAttention(nn.Module):
    """Q, K, V projections (names `query`, `key`, `value` as in BERT) and the attention kernel.

    Modifications: at inference the three projections run as one fused matmul whose weight is cached and rebuilt
    when any projection weight changes (tracked by tensor version counters); the kernel is dense SDPA or the
    blocked sliding window.
    """

    def __init__(self, config: EATConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
                             f"({config.num_attention_heads})")
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self._fused = None  # (key, weight (3d, d), bias (3d,))
        # A replacement d -> 3d projection (Q, K, V concatenated), used at every size when set: the int8 model of
        # eat.deploy.quantize puts one quantized matmul here (a quantized linear has no weight tensor to fuse).
        self.fused_qkv: nn.Module | None = None

    def _fused_weights(self):
        params = (self.query.weight, self.key.weight, self.value.weight, self.query.bias, self.key.bias, self.value.bias)
        if torch.is_grad_enabled() and params[0].requires_grad:
            return torch.cat(params[:3]), torch.cat(params[3:])  # differentiable, rebuilt every step
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                self._fused = (key, torch.cat(params[:3]), torch.cat(params[3:]))
        return self._fused[1], self._fused[2]

    def forward(self, hidden, ctx: "_AttentionContext"):
        """hidden: (B, n, d) -> context (B, n, d), q and k (B, H, n, dh) for importance scores, scores computed."""
        B, n, _ = hidden.shape
        if self.fused_qkv is not None:
            qkv = self.fused_qkv(hidden).view(B, n, 3, self.num_heads, self.head_size)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, dh), strided views
        elif B * n <= _FUSED_QKV_MAX_ROWS:
            # few rows: reading the weights dominates, one fused matmul saves two calls
            weight, bias = self._fused_weights()
            qkv = F.linear(hidden, weight, bias).view(B, n, 3, self.num_heads, self.head_size)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, dh), strided views
        else:
            # many rows: separate projections give SDPA tensors whose rows are contiguous, which it reads faster
            q, k, v = (F.linear(hidden, proj.weight, proj.bias).view(B, n, self.num_heads, self.head_size)
                       .transpose(1, 2) for proj in (self.query, self.key, self.value))
        dropout_p = self.dropout_p if self.training else 0.0
        if ctx.radius is None:
            out = dense_attention(q, k, v, ctx.dense_mask, dropout_p)
            scores = B * n * n
        elif ctx.flex_mask is not None:
            out, scores = flex_window_attention(q, k, v, ctx.flex_mask)
        else:
            out, scores = sliding_window_attention(q, k, v, ctx.radius, ctx.num_global, ctx.block, ctx.key_mask,
                                                   ctx.key_bias, dropout_p, ctx.window_mask, ctx.window_index)
        return out.transpose(1, 2).reshape(B, n, -1), q, k, scores


class EATSelfOutput(nn.Module):
    """Attention output projection, dropout, residual and LayerNorm (BERT's `attention.output`)."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context, residual):
        """(B, n, d), (B, n, d) -> (B, n, d)."""
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class EATAttention(nn.Module):
    """BERT's `attention` block: `self` (projections + kernel) and `output`."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.self = EATSelfAttention(config)
        self.output = EATSelfOutput(config)


class EATIntermediate(nn.Module):
    """FFN up-projection and activation."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden):
        """(B, n, d) -> (B, n, intermediate)."""
        return self.intermediate_act_fn(self.dense(hidden))


class EATOutput(nn.Module):
    """FFN down-projection, dropout, residual, LayerNorm."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        """(B, n, intermediate), (B, n, d) -> (B, n, d)."""
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class EATLayer(nn.Module):
    """One post-LN transformer layer, same function as `BertLayer`."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.attention = EATAttention(config)
        self.intermediate = EATIntermediate(config)
        self.output = EATOutput(config)
        # Hugging Face's setting: the feed-forward runs on this many tokens at a time (0 = all at once). Same
        # result; for long inputs its (n, 4d) intermediate stays cache-sized instead of 50 MB at 8,192 tokens.
        self.chunk_size_feed_forward = config.chunk_size_feed_forward

    def forward(self, hidden, ctx: "_AttentionContext"):
        """hidden (B, n, d) -> (B, n, d), plus q, k (B, H, n, dh) and the number of attention scores computed."""
        context, q, k, scores = self.attention.self.forward(hidden, ctx)
        chunk = self.chunk_size_feed_forward
        if self.training:
            hidden = self.attention.output(context, hidden)
            if chunk and hidden.shape[1] > chunk:
                return torch.cat([self.output(self.intermediate(part), part) for part in hidden.split(chunk, 1)],
                                 dim=1), q, k, scores
            return self.output(self.intermediate(hidden), hidden), q, k, scores
        # Inference: the same function without dropout and without a module call per linear (at batch 1 on CPU
        # the per-call overhead of ~8 submodule calls per layer is a few percent of the layer).
        attn_out = self.attention.output
        hidden = F.layer_norm(_linear(attn_out.dense, context) + hidden,
                              attn_out.LayerNorm.normalized_shape, attn_out.LayerNorm.weight, attn_out.LayerNorm.bias,
                              attn_out.LayerNorm.eps)
        if not chunk or hidden.shape[1] <= chunk:
            return self._feed_forward(hidden), q, k, scores
        out = torch.empty_like(hidden)
        for start in range(0, hidden.shape[1], chunk):
            out[:, start:start + chunk] = self._feed_forward(hidden[:, start:start + chunk])
        return out, q, k, scores

    def _feed_forward(self, hidden):
        """Inference feed-forward with its residual and LayerNorm: (B, m, d) -> (B, m, d)."""
        ffn_in, ffn_out = self.intermediate, self.output
        inner = ffn_in.intermediate_act_fn(_linear(ffn_in.dense, hidden))
        return F.layer_norm(_linear(ffn_out.dense, inner) + hidden,
                            ffn_out.LayerNorm.normalized_shape, ffn_out.LayerNorm.weight, ffn_out.LayerNorm.bias,
                            ffn_out.LayerNorm.eps)

    def forward_queries(self, queries, keys_values, mask=None):
        """The same layer for a subset of tokens: only ``queries`` (B, m, d) are updated, attending to
        ``keys_values`` (B, nk, d) (which include the queries themselves). mask: bool (B, 1, 1 or m, nk), True =
        attend, or None. Returns (B, m, d). Used by token-level exits: exited tokens are no longer queries."""
        attention = self.attention.self
        B, m, _ = queries.shape
        heads, size = attention.num_heads, attention.head_size
        q = _linear(attention.query, queries).view(B, m, heads, size).transpose(1, 2)
        k, v = (_linear(proj, keys_values).view(B, -1, heads, size).transpose(1, 2)
                for proj in (attention.key, attention.value))
        dropout_p = attention.dropout_p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, m, dh)
        hidden = self.attention.output(context.transpose(1, 2).reshape(B, m, -1), queries)
        return self.output(self.intermediate(hidden), hidden)


class EATEncoder(nn.Module):
    """The stack of layers (`encoder.layer.N`)."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.layer = nn.ModuleList(EATLayer(config) for _ in range(config.num_hidden_layers))


class EATPooler(nn.Module):
    """Dense + activation on the `[CLS]` vector: tanh for BERT, ReLU for DistilBERT's `pre_classifier`."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh() if config.classifier_activation == "tanh" else nn.ReLU()

    def forward(self, cls_hidden):
        """(B, d) -> (B, d)."""
        return self.activation(self.dense(cls_hidden))


class EATExitHead(nn.Module):
    """An intermediate exit: the same shape as the final head (pooler dense + activation + classifier). With
    ``exit_pooling="pair"`` its dense layer reads the four pair features of :func:`exit_head_input` (4 d wide)."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.dense = nn.Linear(exit_head_width(config), config.hidden_size)
        self.activation = nn.Tanh() if config.classifier_activation == "tanh" else nn.ReLU()
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled):
        """(B, d) (or (B, 4 d) for pair features) -> logits (B, C)."""
        return self.classifier(self.dropout(self.activation(self.dense(pooled))))

    @torch.no_grad()
    def copy_final_head(self, pooler_dense: nn.Linear, classifier: nn.Linear) -> None:
        """Start as the final head (a better start than random). Pair features: the pooler reads the average of
        the two segment means, i.e. its weight split over the first two d-wide blocks, the other two at zero."""
        self.classifier.load_state_dict(classifier.state_dict())
        if self.dense.in_features == pooler_dense.in_features:
            self.dense.load_state_dict(pooler_dense.state_dict())
            return
        d = pooler_dense.in_features
        self.dense.weight.zero_()
        self.dense.weight[:, :d] = pooler_dense.weight / 2
        self.dense.weight[:, d:2 * d] = pooler_dense.weight / 2
        self.dense.bias.copy_(pooler_dense.bias)


def exit_head_width(config: EATConfig) -> int:
    """How many features an exit head reads: hidden, or 4 x hidden for pair features."""
    return config.hidden_size * (4 if config.exit_pooling == "pair" else 1)


def _token_weights(hidden, key_mask, sizes):
    """(B, n) weight of every token in a mean: 1 for real tokens (key_mask; None = all real), times its size."""
    weight = key_mask.to(hidden.dtype) if key_mask is not None else hidden.new_ones(hidden.shape[:2])
    return weight * sizes.to(hidden.dtype) if sizes is not None else weight


def pair_pooling_weights(hidden, key_mask=None, sizes=None, segments=None):
    """(B, 2, n) weights whose product with hidden (B, n, d) gives each row's two segment means (B, 2, d): row 0
    averages the first segment's real tokens, row 1 the second's (segments (B, n): token type ids, 0 or 1; None =
    one segment); a row without a second segment averages the first again (``b = a``). Token weights as in a
    mean (real tokens times their size). They depend only on the batch's bookkeeping, not on the layer, so the
    model builds them once per batch shape and every pair head reuses them: one batched product per head instead of
    a dozen small ops, which at batch 1 on a CPU cost more than the head's own matrix product."""
    weight = _token_weights(hidden, key_mask, sizes)  # (B, n)
    second = segments.to(hidden.dtype) if segments is not None else torch.zeros_like(weight)
    both = torch.stack([weight * (1 - second), weight * second], dim=1)  # (B, 2, n)
    total = both.sum(-1, keepdim=True)  # (B, 2, 1)
    both = both / total.clamp_min(1e-6)
    return torch.where(total[:, 1:] > 0, both, both[:, :1].expand_as(both))


def exit_head_input(hidden, pooling: str, key_mask=None, sizes=None, segments=None, pair_weights=None):
    """What an intermediate exit head reads. hidden (B, n, d) -> (B, d): the `[CLS]` vector ("cls"), or the mean
    over the real tokens ("mean"; key_mask (B, n) bool marks them, None = all real), each token weighted by its
    size (B, n) when tokens were merged, so a merged token counts for the tokens it stands for. Early layers'
    `[CLS]` has gathered little yet; the mean of the tokens is what a shallow head can read best.

    "pair" (sentence pairs) -> (B, 4 d): the means ``a`` and ``b`` of the first and second segment's real tokens
    (segments (B, n): token type ids, 0 or 1; None = one segment), then ``|a - b|`` and ``a * b``, the features
    sentence-embedding models feed an NLI classifier (InferSent). After one or two layers the segments have
    exchanged little, so a head comparing their summaries reads more than one mean over both. A row without a
    second segment uses ``b = a``. pair_weights: :func:`pair_pooling_weights` of these arguments, when the caller
    has them already (then key_mask, sizes and segments are not read)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pair":
        if pair_weights is None:
            pair_weights = pair_pooling_weights(hidden, key_mask, sizes, segments)
        a, b = torch.bmm(pair_weights, hidden).unbind(1)  # (B, d) each
        return torch.cat([a, b, (a - b).abs(), a * b], dim=-1)
    if key_mask is None and sizes is None:
        return hidden.mean(1)
    weight = _token_weights(hidden, key_mask, sizes)
    return (hidden * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)  # (B, d)


def _classifier_dropout(config: EATConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


# ---------------------------------------------------------------------------------------------------------------
# 3. Batch bookkeeping and the layer loop
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class WorkCounters:
    """Work done by one forward pass, counted from tensor shapes (not timed).

    layers_run: sum over samples of layers executed. token_layers: sum over samples and layers of the real tokens
    each layer processed. padded_token_layers: the same including padding rows (what the matmuls really saw).
    attention_scores: query-key scores computed per head, padding included. exit_head_rows: rows (token tasks:
    tokens) fed to exit heads. kv_token_layers (token tasks): exited tokens still projected to keys/values.
    """

    layers_run: int = 0
    token_layers: int = 0
    padded_token_layers: int = 0
    attention_scores: int = 0
    exit_head_rows: int = 0
    kv_token_layers: int = 0

    def add(self, other: "WorkCounters") -> None:
        """Accumulate another pass's counters into this one."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def count_layer(self, padded_tokens: int, scores: int) -> None:
        """One layer ran on ``padded_tokens`` token slots (rows x length, padding included) and computed
        ``scores`` attention scores."""
        self.padded_token_layers += padded_tokens
        self.attention_scores += scores

    def finish(self, tokens_per_layer, exit_layer) -> None:
        """Totals at the end of a pass: tokens_per_layer (B, L) real (token models: query) tokens per layer,
        exit_layer (B,) layers each sample ran."""
        self.token_layers = int(tokens_per_layer.sum())
        self.layers_run = int(exit_layer.sum())


@dataclass
class _AttentionContext:
    """What the attention kernel needs about the current batch (rebuilt only when the batch changes)."""

    dense_mask: torch.Tensor | None
    key_mask: torch.Tensor | None
    key_bias: torch.Tensor | None
    radius: int | None
    num_global: int
    block: int | None
    flex_mask: object | None = None  # FlexAttention BlockMask, built once per batch shape
    window_mask: torch.Tensor | None = None  # blocked-kernel mask, built once per batch shape
    window_index: torch.Tensor | None = None  # blocked-kernel key positions, built once per batch shape


@dataclass
class _TokenState:
    """Bookkeeping for the rows still running. Real tokens are always packed to the front of each row.

    rows: (B,) original batch index; lengths: (B,) real tokens; key_mask: (B, n) bool or None when no row has
    padding; positions: (B, n) original token index; protected: (B, n) tokens that are never pruned or merged;
    sizes: (B, n) float token sizes (merge mode) or None; segments: (B, n) token type ids, kept only for pair
    exit heads (else None); streak/previous: patience-policy state.
    """

    rows: torch.Tensor
    lengths: torch.Tensor
    key_mask: torch.Tensor | None
    positions: torch.Tensor
    protected: torch.Tensor
    sizes: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    streak: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    context: _AttentionContext | None = None
    pair_weights: torch.Tensor | None = None  # (B, 2, n) pair heads' pooling weights, cached like `context`

    def select_rows(self, keep, hidden):
        """Keep rows where `keep` (B,) is True; trim padding columns nobody needs. Returns the new hidden."""
        index = keep.nonzero().squeeze(1)
        self.rows, self.lengths = self.rows[index], self.lengths[index]
        hidden = hidden[index]
        width = int(self.lengths.max())
        self.positions, self.protected = self.positions[index, :width], self.protected[index, :width]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[index, :width]
            if bool(self.key_mask.all()):
                self.key_mask = None
        if self.sizes is not None:
            self.sizes = self.sizes[index, :width]
        if self.segments is not None:
            self.segments = self.segments[index, :width]
        if self.streak is not None:
            self.streak, self.previous = self.streak[index], self.previous[index]
        self.context = self.pair_weights = None
        return hidden[:, :width]

    def gather_tokens(self, hidden, index, valid, new_lengths):
        """Gather tokens `index` (B, k) of every row (valid (B, k) marks real ones). Returns the new hidden."""
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        self.positions, self.protected = self.positions.gather(1, index), self.protected.gather(1, index) & valid
        if self.sizes is not None:
            self.sizes = self.sizes.gather(1, index).masked_fill(~valid, 1.0)
        if self.segments is not None:
            self.segments = self.segments.gather(1, index)
        self.lengths = new_lengths
        self.key_mask = None if bool(valid.all()) else valid
        self.context = self.pair_weights = None
        return hidden

    def attention_context(self, config: EATConfig) -> _AttentionContext:
        """Mask and kernel choice for the current shapes (cached until the batch changes)."""
        if self.context is None:
            n = self.positions.shape[1]
            key_bias = None if self.sizes is None else self.sizes.log()
            radius = None
            if config.attention_window is not None:
                radius = config.attention_window // 2
                if radius >= n - 1:  # the window covers the whole sequence: dense attention is the same function
                    radius = None
            flex_mask = window_mask = window_index = None
            if radius is not None and config.attention_backend == "flex":
                lengths = None if self.key_mask is None else self.lengths
                flex_mask = flex_window_block_mask(n, radius, config.num_global_tokens, lengths,
                                                   self.positions.device)
            elif radius is not None:
                window_mask = window_attention_mask(self.positions.shape[0], n, radius, config.num_global_tokens,
                                                    config.attention_block_size, self.key_mask, key_bias,
                                                    self.positions.device)
                window_index = window_key_index(n, radius, config.num_global_tokens, config.attention_block_size,
                                                self.positions.device)
            self.context = _AttentionContext(
                dense_mask=_dense_mask(self.key_mask, key_bias) if radius is None else None,
                key_mask=self.key_mask, key_bias=key_bias, radius=radius,
                num_global=config.num_global_tokens, block=config.attention_block_size, flex_mask=flex_mask,
                window_mask=window_mask, window_index=window_index)
        return self.context


def _early_exit_enabled(config: EATConfig, training: bool, disable_exit: bool) -> bool:
    """Whether anything (a row, or a token of a token model) may leave before the last layer. Never in training
    or with ``disable_exit``, and never under a rule nothing can pass: no policy, a confidence threshold above 1,
    a negative entropy threshold (then the heads before the last are not even evaluated)."""
    return (not training and not disable_exit and config.exit_policy != "none"
            and not (config.exit_policy == "confidence" and config.exit_threshold > 1.0)
            and not (config.exit_policy == "entropy" and config.entropy_threshold < 0.0))


def pass_depth(config: EATConfig, *, training: bool = False, disable_exit: bool = False) -> int:
    """The layers a pass of a model with exit heads runs under ``config``: ``exit_depth`` at inference when set
    (the head after it answers every row still running), every layer in training, with ``disable_exit`` (every
    head cached, the cache a sweep replays any cap from) or without the cap. Shared by the layer loop and the ONNX
    Runtime runner and cascade, which must stop where it stops."""
    if training or disable_exit or config.exit_depth is None:
        return config.num_hidden_layers
    return config.exit_depth


@dataclass(frozen=True)
class _ExitPlan:
    """Which heads one forward pass evaluates, shared by the sentence and the token layer loop.

    layers: the head positions (1-based, the last layer's included; empty without heads); early_exit: anything
    may leave early (:func:`_early_exit_enabled`); evaluate_all: every head on everything still running
    (training, or every head's logits asked for)."""

    layers: tuple[int, ...]
    early_exit: bool
    evaluate_all: bool

    @classmethod
    def of(cls, config: EATConfig, layers, training: bool, disable_exit: bool,
           output_exit_logits: bool) -> "_ExitPlan":
        """The plan of a pass over ``config`` with heads after ``layers``."""
        return cls(tuple(layers), _early_exit_enabled(config, training, disable_exit), training or output_exit_logits)

    def runs_head(self, layer_number: int, last: bool) -> bool:
        """Whether the head after ``layer_number`` is evaluated: the last layer's always (it gives the final
        output), the others when something may leave there or every head's logits are wanted."""
        return layer_number in self.layers and (last or self.early_exit or self.evaluate_all)


def _put_nan_filled(target, shape, index, values):
    """``target.index_put(index, values)``; when target is None, a NaN-filled tensor of ``shape`` (values' dtype
    and device) is made first. NaN marks what no head wrote (rows or tokens that were not evaluated there)."""
    if target is None:
        target = values.new_full(shape, float("nan"))
    return target.index_put(index, values)


def _prune_target(lengths, real, protected, ratio: float):
    """(B,) tokens each row keeps when pruned to ``ratio``: ceil(ratio * lengths), never fewer than its real
    protected tokens. lengths: (B,) real tokens; real, protected: (B, n) bool."""
    target = torch.ceil(lengths.to(torch.float32) * ratio).long()
    return torch.maximum(target, (protected & real).sum(1))


def _keep_most_important(importance, real, protected, target):
    """(B, n) bool: each row's ``target`` (B,) most important real tokens, protected ones first (target never
    exceeds a row's real tokens). importance: (B, n); real, protected: (B, n) bool. Ties go to the earlier
    position (a stable sort), so a row's choice depends neither on its padding nor on the rows beside it."""
    importance = importance.masked_fill(protected, float("inf")).masked_fill(~real, float("-inf"))
    order = importance.argsort(dim=1, descending=True, stable=True)[:, :int(target.max())]  # (B, k) best first
    ranks = torch.arange(order.shape[1], device=order.device)[None, :]
    return torch.zeros_like(real).scatter_(1, order, ranks < target[:, None])


@dataclass
class _RowRun:
    """What one pass of :meth:`EATModel.forward` has decided so far, in the input batch's order.

    exit_layer: (B,) layers each row ran; results: (B, C) logits of the head each row left at (made at the first
    answer); exit_logits: (B, E, C) every evaluated head's logits (when the plan evaluates them all);
    tokens_per_layer: (B, L) real tokens entering each layer; finished_hidden: (rows, hidden, mask, positions)
    of each group of rows that stopped, for :meth:`EATModel._scatter_finished`."""

    batch: int
    plan: _ExitPlan
    exit_head: object
    on_exit: object
    return_hidden: bool
    exit_layer: torch.Tensor
    tokens_per_layer: torch.Tensor
    work: WorkCounters = field(default_factory=WorkCounters)
    results: torch.Tensor | None = None
    exit_logits: torch.Tensor | None = None
    finished_hidden: list = field(default_factory=list)

    @classmethod
    def start(cls, input_ids, num_layers: int, plan: _ExitPlan, exit_head, on_exit, return_hidden: bool) -> "_RowRun":
        """A fresh pass over a batch input_ids (B, n): every row runs every layer until it leaves."""
        B, device = input_ids.shape[0], input_ids.device
        return cls(batch=B, plan=plan, exit_head=exit_head, on_exit=on_exit, return_hidden=return_hidden,
                   exit_layer=torch.full((B,), num_layers, dtype=torch.long, device=device),
                   tokens_per_layer=torch.zeros(B, num_layers, dtype=torch.long, device=device))

    def answer(self, layer_number: int, rows, logits, lengths, early: bool) -> None:
        """Rows ``rows`` (k,) have their final ``logits`` (k, C) from the head after ``layer_number`` (``early``:
        before the last layer); lengths (k,): their real tokens in that layer. Records them and tells on_exit."""
        self.results = _put_nan_filled(self.results, (self.batch, logits.shape[-1]), (rows,), logits)
        if early:
            self.exit_layer = self.exit_layer.index_put((rows,), torch.full_like(rows, layer_number))
        if self.on_exit is not None:
            self.on_exit(layer_number, rows, logits, lengths)


@dataclass
class EATEncoderOutput(ModelOutput):
    """Output of `EATModel`.

    last_hidden_state: (B, n_out, d) every sample's hidden states where it stopped (its exit layer), real tokens
    first; attention_mask: (B, n_out) which of them are real; token_positions: (B, n_out) their index in the input
    (-1 for filler); pooler_output: (B, d); exit_layer: (B,) layers run; tokens_per_layer: (B, L) real tokens that
    entered each layer (0 where the sample had exited); exit_logits: (B, E, C) logits of every evaluated exit head
    (NaN where not evaluated) when asked; exit_outputs: (B, C) logits of the head each sample left at (None
    without exit heads); work: WorkCounters.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None
    exit_layer: torch.Tensor | None = None
    tokens_per_layer: torch.Tensor | None = None
    exit_logits: torch.Tensor | None = None
    exit_outputs: torch.Tensor | None = None
    work: WorkCounters | None = None


class EATPreTrainedModel(PreTrainedModel):
    """Weight init and loading glue shared by every EAT model (`PreTrainedModel` subclass)."""

    config_class = EATConfig
    config: EATConfig
    base_model_prefix = "bert"
    _keys_to_ignore_on_load_unexpected = [r"position_ids", r"cls\.predictions", r"cls\.seq_relationship"]
    _supports_sdpa = True


class EATModel(EATPreTrainedModel):
    """The adaptive encoder (BERT's `BertModel` with `embeddings`, `encoder`, `pooler`).

    With every knob off its `last_hidden_state` and `pooler_output` equal `BertModel`'s. Exit heads belong to
    task models, which pass them to :meth:`forward` as ``exit_head``.
    """

    def __init__(self, config: EATConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = EATEmbeddings(config)
        self.encoder = EATEncoder(config)
        self.pooler = EATPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        """The word embeddings (Hugging Face's accessor)."""
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        """Replace the word embeddings (Hugging Face's accessor)."""
        self.embeddings.word_embeddings = value

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, exit_head=None,
                output_exit_logits: bool = False, disable_exit: bool = False, return_hidden: bool = True,
                on_exit=None, **unused) -> EATEncoderOutput:
        """Run the adaptive encoder.

        input_ids, attention_mask, token_type_ids: (B, n), right-padded. exit_head: callable
        ``(layer, hidden (B, n, d), state) -> (B, C) logits`` evaluated after every layer in ``config.exit_layers``
        (the last layer's head gives the final output). output_exit_logits: also return every evaluated head's
        logits. disable_exit: evaluate heads but never leave early (the cache a threshold sweep reads). In training
        mode no sample exits early and every head is evaluated. return_hidden: collect each sample's hidden
        states where it stopped (needed by token tasks; skip it for speed when only the heads matter).
        on_exit: optional callable ``(layer, rows (k,), logits (k, C), tokens (k,))``, called the moment rows'
        outputs are final (when they exit early, and for the rest at the last layer); ``rows`` index the input batch,
        ``tokens`` are the real tokens each row had in its last layer (after pruning). A server uses it
        to answer a row that left at layer 1 before the batch's slowest row is done. Observation only: it changes
        nothing in the computation.
        """
        config = self.config
        schedule = config.keep_schedule
        state = self._initial_state(input_ids, attention_mask, schedule, token_type_ids)
        hidden = self.embeddings(input_ids, token_type_ids)  # (B, n, d)
        plan = _ExitPlan.of(config, config.exit_layer_list if exit_head is not None else (), self.training,
                            disable_exit, output_exit_logits)
        run = _RowRun.start(input_ids, config.num_hidden_layers, plan, exit_head, on_exit, return_hidden)
        depth = self._depth(plan, disable_exit)

        for index, layer in enumerate(self.encoder.layer[:depth]):
            layer_number = index + 1
            last = layer_number == depth  # its head answers every row still running
            run.tokens_per_layer[state.rows, index] = state.lengths  # real tokens entering this layer
            hidden, q, k, scores = layer(hidden, state.attention_context(config))  # hidden (R, n, d)
            run.work.count_layer(hidden.shape[0] * hidden.shape[1], scores)
            if plan.runs_head(layer_number, last):
                hidden, q, k, state = self._exit_step(run, layer_number, last, hidden, state, q, k,
                                                      keep_qk=schedule[index] < 1.0)
                if state is None:  # every row has left
                    break
            # --- token pruning / merging after this layer ---------------------------------------------------------
            if schedule[index] < 1.0 and not last:
                hidden = self._reduce_tokens(hidden, state, schedule[index], q, k)

        if state is not None and return_hidden:
            run.finished_hidden.append(self._finished(hidden, state, None))
        return self._encoder_output(run, hidden.shape[-1])

    # --- helpers of the loop ----------------------------------------------------------------------------------
    def _depth(self, plan: _ExitPlan, disable_exit: bool) -> int:
        """The layers this pass runs: :func:`pass_depth` when a head can answer there, every layer for a bare
        encoder (no exit head)."""
        if not plan.layers:
            return self.config.num_hidden_layers
        return pass_depth(self.config, training=self.training, disable_exit=disable_exit)

    def _exit_step(self, run: "_RowRun", layer_number: int, last: bool, hidden, state: _TokenState, q, k,
                   keep_qk: bool):
        """Early exit after ``layer_number``: evaluate its head on the rows still running (hidden (R, n, d)),
        record what is final and let the rows the exit rule passes leave the batch. keep_qk: pruning after this
        layer reads its q, k (B, H, n, dh), so they follow the rows that stay. Returns (hidden, q, k, state) of
        the rows that stay; state is None when every row has left."""
        config, plan = self.config, run.plan
        logits = run.exit_head(layer_number, hidden, state)  # (R, C)
        run.work.exit_head_rows += logits.shape[0]
        if plan.evaluate_all:
            slot = torch.full_like(state.rows, plan.layers.index(layer_number))
            run.exit_logits = _put_nan_filled(run.exit_logits, (run.batch, len(plan.layers), logits.shape[-1]),
                                              (state.rows, slot), logits)
        if last:  # the last head run answers every row still running (early when exit_depth stopped the pass)
            run.answer(layer_number, state.rows, logits, state.lengths,
                       early=layer_number < config.num_hidden_layers)
            return hidden, q, k, state
        if not plan.early_exit:
            return hidden, q, k, state
        leave, state.streak, state.previous = exit_decision(
            logits, config.exit_policy, config.exit_threshold, config.entropy_threshold, config.exit_patience,
            state.streak, state.previous)  # leave: (R,) bool
        if not bool(leave.any()):
            return hidden, q, k, state
        run.answer(layer_number, state.rows[leave], logits[leave], state.lengths[leave], early=True)
        if run.return_hidden:
            run.finished_hidden.append(self._finished(hidden, state, leave))
        if bool(leave.all()):
            return hidden, q, k, None
        hidden = state.select_rows(~leave, hidden)
        if keep_qk:
            width = hidden.shape[1]  # select_rows trimmed the padding columns nobody needs
            q, k = q[~leave][:, :, :width], k[~leave][:, :, :width]
        return hidden, q, k, state

    def _encoder_output(self, run: "_RowRun", d: int) -> EATEncoderOutput:
        """The pass's output: counters totalled, and (return_hidden) every row's hidden states where it stopped,
        back in input order, with the pooler on their `[CLS]`."""
        run.work.finish(run.tokens_per_layer, run.exit_layer)
        output = EATEncoderOutput(exit_layer=run.exit_layer, tokens_per_layer=run.tokens_per_layer,
                                  exit_logits=run.exit_logits, exit_outputs=run.results, work=run.work)
        if run.return_hidden:
            last_hidden, mask, positions = self._scatter_finished(run.finished_hidden, run.batch, d)
            output.last_hidden_state, output.attention_mask, output.token_positions = last_hidden, mask, positions
            if self.pooler is not None:
                output.pooler_output = self.pooler(last_hidden[:, 0])
        return output

    def _initial_state(self, input_ids, attention_mask, schedule: tuple[float, ...],
                       token_type_ids=None) -> _TokenState:
        """Bookkeeping for a fresh batch; checks that padding is on the right."""
        B, n = input_ids.shape
        device = input_ids.device
        positions = torch.arange(n, device=device).expand(B, n)
        if attention_mask is None or bool(attention_mask.all()):
            lengths = torch.full((B,), n, dtype=torch.long, device=device)
            key_mask = None
        else:
            key_mask = attention_mask.bool()
            lengths = key_mask.sum(1)
            if not torch.equal(key_mask, positions < lengths[:, None]):
                raise ValueError(NOT_RIGHT_PADDED)
            if bool((lengths == 0).any()):
                raise ValueError(EMPTY_ROW)
        config = self.config
        protected = positions < config.num_global_tokens
        if config.keep_sep:
            sep_id = getattr(config, "sep_token_id", None)
            protected = protected | (input_ids == (_DEFAULT_SEP_ID if sep_id is None else sep_id))
        sizes = torch.ones(B, n, device=device) if config.prune_mode == "merge" and min(schedule) < 1.0 else None
        segments = None
        if config.exit_pooling == "pair":  # pair exit heads read each segment's mean: carry the token types along
            segments = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        return _TokenState(rows=torch.arange(B, device=device), lengths=lengths, key_mask=key_mask,
                           positions=positions, protected=protected, sizes=sizes, segments=segments)

    def _reduce_tokens(self, hidden, state: _TokenState, ratio: float, q, k):
        """Shorten every row to ``ceil(ratio * its real length)`` tokens (never below its protected tokens) by
        dropping the least important ones or merging them (ToMe). hidden (B, n, d) -> (B, k, d)."""
        config = self.config
        real = state.key_mask if state.key_mask is not None else torch.ones_like(state.protected)
        target = _prune_target(state.lengths, real, state.protected, ratio)  # (B,)
        if bool((target >= state.lengths).all()):
            return hidden
        if config.prune_mode == "drop":
            if config.prune_importance == "cls_attention":
                importance = cls_attention_importance(q, k, state.key_mask)
            elif config.prune_importance == "mean_attention":
                importance = mean_attention_importance(q, k, state.key_mask)
            else:
                importance = hidden.norm(dim=-1)
            keep = _keep_most_important(importance, real, state.protected, target)  # (B, n)
            index, valid = compaction_index(keep, target)
            return state.gather_tokens(hidden, index, valid, target)
        # merge: keys of this layer (B, n, H * dh) are the similarity metric, as in ToMe
        metric = k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)
        mergeable = real & ~state.protected
        src, dst = bipartite_merge_plan(metric, state.lengths - target, mergeable)
        sizes = state.sizes
        size_a, size_b = sizes[:, ::2], sizes[:, 1::2]  # (B, na), (B, nb)
        weight_a = (size_a * src)[..., None]  # only merged tokens contribute
        hidden_b = hidden[:, 1::2] * size_b[..., None]
        hidden_b = hidden_b.scatter_add(1, dst[..., None].expand_as(hidden[:, ::2]), hidden[:, ::2] * weight_a)
        size_b = size_b.scatter_add(1, dst, size_a * src)
        hidden = hidden.clone()
        hidden[:, 1::2] = hidden_b / size_b[..., None]
        new_sizes = sizes.clone()
        new_sizes[:, 1::2] = size_b
        state.sizes = new_sizes
        keep = real.clone()
        keep[:, ::2] &= ~src
        kept = keep.sum(1)
        index, valid = compaction_index(keep, kept)
        return state.gather_tokens(hidden, index, valid, kept)

    @staticmethod
    def _finished(hidden, state: _TokenState, leave):
        """A group of rows stops here: keep (rows, hidden, real-token mask, positions) for the output."""
        mask = state.key_mask if state.key_mask is not None else torch.ones_like(state.protected)
        if leave is None:
            return state.rows, hidden, mask, state.positions
        return state.rows[leave], hidden[leave], mask[leave], state.positions[leave]

    @staticmethod
    def _scatter_finished(groups, B, d):
        """Put every group's rows back in the original batch order, padded to the longest. -> (B, n, d), masks."""
        if len(groups) == 1 and groups[0][0].shape[0] == B and bool(groups[0][2].all()):
            rows, hidden, mask, positions = groups[0]
            if torch.equal(rows, torch.arange(B, device=rows.device)):
                return hidden, mask, positions
        width = max(group[1].shape[1] for group in groups)
        first = groups[0][1]
        hidden = first.new_zeros(B, width, d)
        mask = torch.zeros(B, width, dtype=torch.bool, device=first.device)
        positions = torch.full((B, width), -1, dtype=torch.long, device=first.device)
        for rows, group_hidden, group_mask, group_positions in groups:
            w = group_hidden.shape[1]
            hidden[rows, :w] = group_hidden
            mask[rows, :w] = group_mask
            positions[rows, :w] = group_positions.masked_fill(~group_mask, -1)
        return hidden, mask, positions


_DEFAULT_SEP_ID = 102  # `[SEP]` in the uncased BERT vocabulary, used when the config does not name one


# ---------------------------------------------------------------------------------------------------------------
# 4. Sequence classification with exit heads
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EATSequenceClassifierOutput(ModelOutput):
    """Output of `EATForSequenceClassification`.

    loss: cross-entropy of the final logits when labels are given; logits: (B, C) of the head each sample left
    at; exit_layer: (B,) layers run (1-based); tokens_per_layer: (B, L) real tokens entering each layer;
    exit_logits: (B, E, C) every evaluated head's logits (NaN where not evaluated), when asked or in training;
    exit_layers: the E head positions; work: WorkCounters.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_layer: torch.Tensor | None = None
    tokens_per_layer: torch.Tensor | None = None
    exit_logits: torch.Tensor | None = None
    exit_layers: tuple[int, ...] | None = None
    work: WorkCounters | None = None


class _ExitHeads:
    """Exit-head management shared by both task models. ``exit_heads`` (an ``nn.ModuleDict`` keyed by layer
    number) holds a head after every layer of ``config.exit_layers`` but the last, whose head is the final one.
    A task model names its head class (``_exit_head_class``) and how a head starts as the final head
    (``_start_from_final``)."""

    _exit_head_class: type

    def _start_from_final(self, head: nn.Module) -> None:
        raise NotImplementedError

    def init_exit_heads_from_final(self) -> None:
        """Start every exit head as a copy of the final head: a better start than random."""
        for head in self.exit_heads.values():
            self._start_from_final(head)

    def add_exit_heads(self, layers) -> None:
        """Add (untrained, copied from the final head) exit heads after ``layers`` and set ``exit_layers``."""
        self.config.set_knobs(exit_layers=list(layers) if not isinstance(layers, str) else layers)
        for layer in self.config.exit_layer_list[:-1]:
            if str(layer) not in self.exit_heads:
                head = self._exit_head_class(self.config).to(self.classifier.weight.device,
                                                             self.classifier.weight.dtype)
                self._start_from_final(head)
                self.exit_heads[str(layer)] = head

    def _check_exit_heads(self) -> None:
        """ValueError when ``exit_layers`` names a layer that has no exit head in this model."""
        missing = [layer for layer in self.config.exit_layer_list[:-1] if str(layer) not in self.exit_heads]
        if missing:
            raise ValueError(f"exit_layers names layers {missing} that have no exit head in this model; "
                             "add heads with add_exit_heads() (and train them) or change exit_layers")


class EATForSequenceClassification(_ExitHeads, EATPreTrainedModel):
    """EAT encoder + a classification head after the last layer (`bert.pooler` + `classifier`, BERT's names) and
    an exit head (`exit_heads.<layer>`) after every other layer of ``config.exit_layers``."""

    def __init__(self, config: EATConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = EATModel(config)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.exit_heads = nn.ModuleDict({str(layer): EATExitHead(config) for layer in config.exit_layer_list
                                         if layer != config.num_hidden_layers})
        self.post_init()

    _exit_head_class = EATExitHead

    def _start_from_final(self, head: EATExitHead) -> None:
        """Make ``head`` a copy of the final head (pooler dense + classifier, :meth:`EATExitHead.copy_final_head`)."""
        head.copy_final_head(self.bert.pooler.dense, self.classifier)

    def _head(self, layer: int, hidden, state):
        """Logits (B, C) of the head after ``layer`` from hidden (B, n, d): the final head reads the `[CLS]`
        vectors (as BERT's), an exit head what ``config.exit_pooling`` names (see :func:`exit_head_input`)."""
        if layer == self.config.num_hidden_layers:
            return self.classifier(self.dropout(self.bert.pooler(hidden[:, 0])))
        pooling = self.config.exit_pooling
        if pooling == "pair" and state.pair_weights is None:  # once per batch shape, reused by every pair head
            state.pair_weights = pair_pooling_weights(hidden, state.key_mask, state.sizes, state.segments)
        pooled = exit_head_input(hidden, pooling, state.key_mask, state.sizes, state.segments, state.pair_weights)
        return self.exit_heads[str(layer)](pooled)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *,
                output_exit_logits: bool = False, disable_exit: bool = False, on_exit=None, **unused):
        """Classify a batch with per-sample early exit. input_ids etc.: (B, n). ``on_exit(layer, rows, logits, tokens)``
        is called as rows' final logits become known (see `EATModel.forward`)."""
        self._check_exit_heads()
        width = exit_head_width(self.config)
        if any(head.dense.in_features != width for head in self.exit_heads.values()):
            raise ValueError(f"exit_pooling {self.config.exit_pooling!r} reads {width} features, but this model's exit "
                             "heads were built for another pooling ('pair' heads are 4 x hidden wide); keep the "
                             "pooling the heads were trained with")
        encoded = self.bert(input_ids, attention_mask, token_type_ids, exit_head=self._head,
                            output_exit_logits=output_exit_logits, disable_exit=disable_exit, return_hidden=False,
                            on_exit=on_exit)
        logits = encoded.exit_outputs
        loss = None
        if labels is not None:  # one output is a regression head (as Hugging Face's num_labels == 1): MSE
            loss = (F.mse_loss(logits[:, 0], labels.to(logits.dtype)) if self.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return EATSequenceClassifierOutput(loss=loss, logits=logits, exit_layer=encoded.exit_layer,
                                           tokens_per_layer=encoded.tokens_per_layer,
                                           exit_logits=encoded.exit_logits, exit_layers=self.config.exit_layer_list,
                                           work=encoded.work)


# ---------------------------------------------------------------------------------------------------------------
# 5. Token classification with token-level exits (sequence labelling, e.g. NER)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EATTokenClassifierOutput(ModelOutput):
    """Output of `EATForTokenClassification`.

    loss: cross-entropy of the final per-token logits when labels are given (IGNORE = -100 skipped); logits:
    (B, n, C) of the head each token left at; token_exit_layer: (B, n) the layer after which each token's label
    was read (0 for padding and pruned tokens); exit_layer: (B,) layers a sentence ran (its last token's exit);
    tokens_per_layer: (B, L) tokens updated (queries) in each layer; exit_logits: (B, E, n, C) every head's logits
    (NaN where a token had already left), in training or when asked; exit_layers: the E head positions;
    work: WorkCounters (``token_layers`` counts query tokens; ``kv_token_layers`` the extra key/value-only tokens).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_exit_layer: torch.Tensor | None = None
    exit_layer: torch.Tensor | None = None
    tokens_per_layer: torch.Tensor | None = None
    exit_logits: torch.Tensor | None = None
    exit_layers: tuple[int, ...] | None = None
    work: WorkCounters | None = None


class EATTokenExitHead(nn.Module):
    """A per-token intermediate exit: dropout + linear, the shape of the final head of `BertForTokenClassification`."""

    def __init__(self, config: EATConfig):
        super().__init__()
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden):
        """(..., d) -> (..., C)."""
        return self.classifier(self.dropout(hidden))


def token_exit_owner(labelled):
    """For every token, the labelled token whose exit it follows: a continuation subword follows the first
    subword of its word, `[CLS]` the first word, `[SEP]` and padding the last. labelled: (B, n) bool -> (B, n)."""
    B, n = labelled.shape
    positions = torch.arange(n, device=labelled.device).expand(B, n)
    owner = torch.where(labelled, positions, -1).cummax(dim=1).values
    first = torch.where(labelled, positions, n).amin(dim=1, keepdim=True).clamp(max=n - 1)
    return torch.where(owner < 0, first, owner)


def token_exit_decision(logits, labelled, active, policy: str, tau: float, entropy_threshold: float, window: int,
                        patience: int = 2, streak=None, previous=None):
    """Which labelled tokens leave at this head. logits: (B, n, C); labelled, active: (B, n) bool; streak,
    previous: (B, n) per-token patience state of the earlier heads (None at the first head).

    A token is confident when the exit policy (:func:`exit_decision`, applied per token) says so for its own
    predictions; with ``window`` > 0 it leaves only when every labelled token within ``window`` positions is
    confident too (or has already left) -- the window-based criterion of TOKEE. Returns (leave (B, n) bool, True
    only for active labelled tokens that leave now, streak, previous).
    """
    B, n, C = logits.shape
    if policy not in ("confidence", "entropy", "patience", "agreement"):
        raise ValueError(f"exit_policy {policy!r} has no token-level form (use confidence, entropy, patience or agreement)")
    flat_streak = None if streak is None else streak.reshape(-1)
    flat_previous = None if previous is None else previous.reshape(-1)
    confident, flat_streak, flat_previous = exit_decision(logits.reshape(B * n, C), policy, tau, entropy_threshold,
                                                          patience, flat_streak, flat_previous)
    if flat_streak is not None:
        streak, previous = flat_streak.view(B, n), flat_previous.view(B, n)
    confident = confident.view(B, n) | ~(labelled & active)  # unlabelled or finished tokens never hold others back
    if window > 0:
        doubtful = (~confident).float()[:, None]  # (B, 1, n)
        doubtful = F.max_pool1d(doubtful, kernel_size=2 * window + 1, stride=1, padding=window)[:, 0]
        confident = doubtful == 0
    return confident & labelled & active, streak, previous


@dataclass
class _RunningRows:
    """The rows of a token batch that still have queries in this layer, and their slices of the (B, n) masks.

    rows: (R,) their batch index; all_rows: every row runs (the slices are then the full tensors, no copy);
    active, alive, real: (R, n) their query, key/value and real-token masks at input positions."""

    rows: torch.Tensor
    all_rows: bool
    active: torch.Tensor
    alive: torch.Tensor
    real: torch.Tensor

    def pick(self, tensor):
        """``tensor`` (B, ...) restricted to the running rows (the tensor itself when every row runs)."""
        return tensor if self.all_rows else tensor[self.rows]


@dataclass
class _LayerStep:
    """One layer of the token loop on the running rows: row_hidden (R, n, d) their states at input positions;
    updated (R, m, d) the query states the layer computed; query_index, query_valid (R, m) those queries' input
    positions and which are real (filler slots are not); scores: attention scores computed."""

    row_hidden: torch.Tensor
    updated: torch.Tensor
    query_index: torch.Tensor
    query_valid: torch.Tensor
    scores: int


@dataclass
class _TokenRun:
    """State of one pass of the token-level layer loop. Tokens never move: every (B, n) tensor is at input
    positions.

    hidden: (B, n, d); real: real tokens; labelled: tokens whose label is read; owner: the labelled token whose
    exit each token follows (:func:`token_exit_owner`); protected: never pruned; alive: tokens others attend to
    (keys/values); active: tokens still updated (queries); token_exit_layer: the layer each token's label was
    read after (0: not yet, padding, pruned); tokens_per_layer: (B, L) queries per layer; logits: (B, n, C) the
    labels read so far (NaN elsewhere); head_logits: every evaluated head's (B, n, C), when the plan evaluates
    them all; streak, previous: per-token patience state (None until a patience rule has run)."""

    hidden: torch.Tensor
    real: torch.Tensor
    labelled: torch.Tensor
    owner: torch.Tensor
    protected: torch.Tensor
    alive: torch.Tensor
    active: torch.Tensor
    token_exit_layer: torch.Tensor
    tokens_per_layer: torch.Tensor
    work: WorkCounters = field(default_factory=WorkCounters)
    logits: torch.Tensor | None = None
    head_logits: list = field(default_factory=list)
    streak: torch.Tensor | None = None
    previous: torch.Tensor | None = None

    def running_rows(self) -> _RunningRows | None:
        """The rows that still have a query (None when every token has left)."""
        running = self.active.any(dim=1)  # (B,)
        if not bool(running.any()):
            return None
        rows = running.nonzero().squeeze(1)  # (R,)
        if bool(running.all()):
            return _RunningRows(rows, True, self.active, self.alive, self.real)
        return _RunningRows(rows, False, self.active[rows], self.alive[rows], self.real[rows])

    def keep_patience(self, view: _RunningRows, streak, previous) -> None:
        """Store the running rows' per-token patience state streak, previous (R, n) at their batch rows."""
        if self.streak is None:
            self.streak = torch.zeros_like(self.token_exit_layer)
            self.previous = torch.full_like(self.token_exit_layer, -1)
        self.streak = streak if view.all_rows else self.streak.index_copy(0, view.rows, streak)
        self.previous = previous if view.all_rows else self.previous.index_copy(0, view.rows, previous)

    def prune(self, ratio: float) -> None:
        """Token pruning after a layer: each row keeps ``ceil(ratio * its alive tokens)``, never a protected one
        (labelled tokens, `[CLS]`, `[SEP]`), chosen by hidden-state norm (`[CLS]` may have stopped updating, so
        its attention is no guide); the others stop being keys and queries."""
        counts = self.alive.sum(1)  # (B,)
        target = _prune_target(counts, self.alive, self.protected, ratio)
        if bool((target < counts).any()):
            keep = _keep_most_important(self.hidden.norm(dim=-1), self.alive, self.protected, target)  # (B, n)
            self.alive, self.active = keep, self.active & keep


class EATForTokenClassification(_ExitHeads, EATPreTrainedModel):
    """EAT encoder + a per-token head after the last layer (`classifier`, as `BertForTokenClassification`) and
    a token exit head (`exit_heads.<layer>`) after every other layer of ``config.exit_layers``.

    Token-level exit: after each exit layer, a labelled token whose prediction satisfies the exit policy
    (``exit_threshold`` = tau on the max probability, or entropy; optionally over a window of neighbours) stops
    being updated. Its hidden state is frozen and its label is read from that head. Later layers take it out of
    their queries, so their projections, attention rows and FFN run on fewer tokens; ``token_exit_kv`` decides
    whether it stays as a key/value ("keep": its frozen state is projected to keys/values by later layers) or
    leaves attention altogether ("drop"). Tokens without a label of their own (``word_mask`` False: continuation
    subwords, `[CLS]`, `[SEP]`) follow the labelled token they belong to (:func:`token_exit_owner`). A sentence
    leaves the batch when all its tokens have left. Token pruning (``keep_ratio``) only ever removes unlabelled
    tokens other than `[CLS]`/`[SEP]` (importance: hidden-state norm, since `[CLS]` may have stopped updating);
    sliding-window attention runs the blocked kernel while every token is still a query and a positional band
    mask on the reduced query/key sets afterwards.
    """

    def __init__(self, config: EATConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = EATModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.exit_heads = nn.ModuleDict({str(layer): EATTokenExitHead(config) for layer in config.exit_layer_list
                                         if layer != config.num_hidden_layers})
        self.post_init()

    _exit_head_class = EATTokenExitHead

    def _start_from_final(self, head: EATTokenExitHead) -> None:
        """Make ``head`` a copy of the final classifier."""
        with torch.no_grad():
            head.classifier.load_state_dict(self.classifier.state_dict())

    def _head(self, layer: int, hidden):
        """Per-token logits (..., C) of the head after ``layer`` from hidden (..., d)."""
        if layer == self.config.num_hidden_layers:
            return self.classifier(self.dropout(hidden))
        return self.exit_heads[str(layer)](hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, word_mask=None, *,
                output_exit_logits: bool = False, disable_exit: bool = False, **unused) -> EATTokenClassifierOutput:
        """Label every token with per-token early exit. input_ids, attention_mask, token_type_ids, labels,
        word_mask: (B, n), right-padded; word_mask marks the tokens whose label is read (first subwords; all real
        tokens when None). disable_exit: evaluate every head on every token but never stop a token early.
        ``exit_depth`` is refused: a token leaves by its own head's confidence, so a depth cap is not built here."""
        self._check_exit_heads()
        config = self.config
        if config.exit_depth is not None and config.exit_depth != config.num_hidden_layers:
            raise KnobError(f"exit_depth: {config.exit_depth} is for sequence models; a token model runs every "
                            "layer a token needs (set exit_depth=None)")
        schedule = config.keep_schedule
        plan = _ExitPlan.of(config, config.exit_layer_list, self.training, disable_exit, output_exit_logits)
        run = self._start_run(input_ids, attention_mask, token_type_ids, word_mask)

        for index, layer in enumerate(self.bert.encoder.layer):
            layer_number = index + 1
            last = layer_number == config.num_hidden_layers
            view = run.running_rows()
            if view is None:  # every token has left
                break
            run.tokens_per_layer[view.rows, index] = view.active.sum(1)
            row_hidden = view.pick(run.hidden)  # (R, n, d)
            if torch.equal(view.active, view.real):
                step = self._dense_rows_step(layer, row_hidden, view, run.protected)
            else:
                step = self._compacted_queries_step(layer, row_hidden, view)
                run.work.kv_token_layers += int((view.alive.sum(1) - view.active.sum(1)).sum())
            run.hidden = step.row_hidden if view.all_rows else run.hidden.index_copy(0, view.rows, step.row_hidden)
            run.work.count_layer(step.updated.shape[0] * step.updated.shape[1], step.scores)
            if plan.runs_head(layer_number, last):
                self._token_exit_step(run, plan, layer_number, last, view, step)
            # --- pruning: only unlabelled, unprotected tokens may go ------------------------------------------------
            if schedule[index] < 1.0 and not last:
                run.prune(schedule[index])
        return self._token_output(run, labels)

    # --- helpers of the token loop ----------------------------------------------------------------------------
    def _start_run(self, input_ids, attention_mask, token_type_ids, word_mask) -> _TokenRun:
        """A fresh pass over a batch (B, n): every real token is a query and a key, the labelled ones (and
        `[CLS]`, `[SEP]`) protected from pruning; hidden from the embeddings, at input positions."""
        encoder = self.bert
        B, n = input_ids.shape
        device = input_ids.device
        initial = encoder._initial_state(input_ids, attention_mask, (1.0,))  # validates the padding
        real = torch.ones(B, n, dtype=torch.bool, device=device) if initial.key_mask is None else initial.key_mask
        labelled = real if word_mask is None else word_mask.bool() & real
        return _TokenRun(hidden=encoder.embeddings(input_ids, token_type_ids), real=real, labelled=labelled,
                         owner=token_exit_owner(labelled), protected=initial.protected | labelled,
                         alive=real, active=real, token_exit_layer=torch.zeros(B, n, dtype=torch.long, device=device),
                         tokens_per_layer=torch.zeros(B, self.config.num_hidden_layers, dtype=torch.long,
                                                      device=device))

    def _dense_rows_step(self, layer, row_hidden, view: _RunningRows, protected) -> _LayerStep:
        """Every token of the running rows is still a query: the ordinary layer (``layer(hidden, ctx)``, the
        blocked window kernel included) on the rows' longest real length w. row_hidden: (R, n, d);
        protected: (B, n). The step's updated states are (R, w, d)."""
        R, n = view.real.shape
        lengths = view.real.sum(1)  # (R,)
        width = int(lengths.max())
        real = view.real[:, :width]  # (R, w)
        positions = torch.arange(width, device=real.device).expand(R, width)
        state = _TokenState(rows=view.rows, lengths=lengths, key_mask=None if bool(real.all()) else real,
                            positions=positions, protected=protected[view.rows, :width])
        updated, _, _, scores = layer(row_hidden[:, :width], state.attention_context(self.config))  # (R, w, d)
        row_hidden = updated if width == n else torch.cat([updated, row_hidden[:, width:]], dim=1)
        return _LayerStep(row_hidden, updated, positions, real, scores)

    def _compacted_queries_step(self, layer, row_hidden, view: _RunningRows) -> _LayerStep:
        """Exited (and pruned) tokens are no longer queries: the active tokens are gathered to the front as
        queries (R, m, d) and attend to the alive ones (R, nk, d) (``layer.forward_queries``); the others keep
        their states. row_hidden: (R, n, d)."""
        config = self.config
        act, ali = view.active, view.alive
        query_index, query_valid = compaction_index(act, act.sum(1))  # (R, m)
        key_index, key_valid = compaction_index(ali, ali.sum(1))  # (R, nk)
        d = row_hidden.shape[-1]
        queries = row_hidden.gather(1, query_index[..., None].expand(-1, -1, d))  # (R, m, d)
        keys_values = row_hidden.gather(1, key_index[..., None].expand(-1, -1, d))  # (R, nk, d)
        mask = None if bool(key_valid.all()) else key_valid[:, None, None, :]  # (R, 1, 1, nk)
        if config.attention_window is not None:  # the window as a band on the input positions
            radius, glob = config.attention_window // 2, config.num_global_tokens
            band = ((query_index[:, :, None] - key_index[:, None, :]).abs() <= radius) \
                | (query_index[:, :, None] < glob) | (key_index[:, None, :] < glob)  # (R, m, nk)
            mask = band[:, None] if mask is None else band[:, None] & mask
        updated = layer.forward_queries(queries, keys_values, mask)  # (R, m, d)
        # filler slots point at distinct inactive positions and write back their unchanged states
        updated = torch.where(query_valid[..., None], updated, queries)
        row_hidden = row_hidden.scatter(1, query_index[..., None].expand(-1, -1, d), updated)
        scores = query_index.shape[0] * query_index.shape[1] * key_index.shape[1]
        return _LayerStep(row_hidden, updated, query_index, query_valid, scores)

    def _token_exit_step(self, run: _TokenRun, plan: _ExitPlan, layer_number: int, last: bool,
                         view: _RunningRows, step: _LayerStep) -> None:
        """Token exits: the head after ``layer_number`` labels the tokens this layer updated; those the exit rule
        lets go (every one at the last layer) take their label from it and stop being queries."""
        logits = self._head(layer_number, step.updated)  # (R, m, C)
        run.work.exit_head_rows += int(step.query_valid.sum())
        B, n = run.real.shape
        shape = (B, n, logits.shape[-1])
        valid, positions = step.query_valid, step.query_index  # (R, m)
        rows = view.rows[:, None].expand_as(positions)  # (R, m) batch row of every slot
        if plan.evaluate_all:
            if view.all_rows and logits.shape[1] == n and bool(valid.all()):
                run.head_logits.append(logits)  # training: every row and token (keeps the graph simple)
            else:
                run.head_logits.append(_put_nan_filled(None, shape, (rows[valid], positions[valid]), logits[valid]))
        if last:
            leave = view.active
        else:
            leave = self._token_leave(run, view, step, logits) if plan.early_exit else None
        if leave is None:
            return
        leaving = valid & leave.gather(1, positions)  # (R, m) slots whose token leaves now: read their labels
        run.logits = _put_nan_filled(run.logits, shape, (rows[leaving], positions[leaving]), logits[leaving])
        leave_full = leave if view.all_rows else torch.zeros_like(run.active).index_copy(0, view.rows, leave)
        run.token_exit_layer = run.token_exit_layer.masked_fill(leave_full, layer_number)
        run.active = run.active & ~leave_full
        if self.config.token_exit_kv == "drop":
            run.alive = run.alive & ~leave_full

    def _token_leave(self, run: _TokenRun, view: _RunningRows, step: _LayerStep, logits):
        """(R, n) bool: the active tokens of the running rows that leave at this head (None when none does): the
        exit rule per labelled token (:func:`token_exit_decision`), followers leaving with their word.
        logits: (R, m, C) of the step's queries."""
        config = self.config
        R, n = view.active.shape
        valid, positions = step.query_valid, step.query_index  # (R, m)
        slot_rows = torch.arange(R, device=logits.device)[:, None].expand_as(positions)
        grid = logits.new_zeros(R, n, logits.shape[-1]).index_put(
            (slot_rows[valid], positions[valid]), logits[valid])  # (R, n, C) at input positions
        streak = None if run.streak is None else view.pick(run.streak)
        previous = None if run.previous is None else view.pick(run.previous)
        words, streak, previous = token_exit_decision(
            grid, view.pick(run.labelled), view.active, config.exit_policy, config.exit_threshold,
            config.entropy_threshold, config.token_exit_window, config.exit_patience, streak, previous)
        if streak is not None:
            run.keep_patience(view, streak, previous)
        leave = words.gather(1, view.pick(run.owner)) & view.active  # followers leave with their word
        return leave if bool(leave.any()) else None

    def _token_output(self, run: _TokenRun, labels) -> EATTokenClassifierOutput:
        """The pass's output: counters totalled, a sentence's exit layer its last token's, and the loss when
        labels (B, n) are given (tokens that never got logits, padding and pruned ones, carry IGNORE labels)."""
        exit_layer = run.token_exit_layer.amax(dim=1)  # (B,)
        run.work.finish(run.tokens_per_layer, exit_layer)
        logits = run.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.nan_to_num(0.0).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100)
        exit_logits = torch.stack(run.head_logits, dim=1) if run.head_logits else None  # (B, E, n, C)
        return EATTokenClassifierOutput(loss=loss, logits=logits, token_exit_layer=run.token_exit_layer,
                                        exit_layer=exit_layer, tokens_per_layer=run.tokens_per_layer,
                                        exit_logits=exit_logits, exit_layers=self.config.exit_layer_list,
                                        work=run.work)


def keep_layers(model: EATForSequenceClassification, layers) -> EATForSequenceClassification:
    """A static model made of the given 0-based layers of ``model`` (weights copied), e.g. ``[0, 2, 4]``.

    The half-depth stand-in for DistilBERT, which is initialised from every other BERT layer. Exit heads and
    adaptive knobs are dropped: the result is a plain static model with the same final head.
    """
    layers = list(layers)
    if not layers or any(not 0 <= layer < model.config.num_hidden_layers for layer in layers):
        raise ValueError(f"layers {layers} must be a non-empty list within 0..{model.config.num_hidden_layers - 1}")
    config = EATConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": len(layers), "keep_ratio": 1.0,
                                  "exit_layers": None, "exit_policy": "none", "attention_window": None})
    small = type(model)(config)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("exit_heads."):
            continue
        if key.startswith("bert.encoder.layer."):
            parts = key.split(".")
            old = int(parts[3])
            if old not in layers:
                continue
            parts[3] = str(layers.index(old))
            key = ".".join(parts)
        state[key] = value
    small.load_state_dict(state, strict=True)
    return small.to(next(model.parameters()).device)


def half_depth_layers(num_layers: int) -> list[int]:
    """Every other layer starting from the first: [0, 2, 4] of 6 (how DistilBERT was initialised from BERT)."""
    return list(range(0, num_layers, 2))


__all__ = ["EATModel", "EATForSequenceClassification", "EATForTokenClassification", "EATTokenClassifierOutput",
           "token_exit_decision", "token_exit_owner", "EATPreTrainedModel", "EATEncoderOutput",
           "EATSequenceClassifierOutput", "WorkCounters", "keep_layers", "half_depth_layers",
           "sliding_window_attention", "dense_attention", "bipartite_merge_plan", "compaction_index",
           "exit_decision", "pass_depth", "exit_head_input", "pair_pooling_weights", "cls_attention_importance",
           "mean_attention_importance"]
