"""Decode-step attention for grouped-query models without copying the KV cache.

Qwen3-4B has 32 query heads sharing 8 key/value heads. transformers' SDPA path can only pass
that grouping to PyTorch when there is no attention mask; generation over left-padded batches
always has one, so every layer first *copies* keys and values four times (``repeat_kv``) —
at batch 1,024 and ~48 cached positions that is 0.8 GB written per layer per generated token,
the largest item after the matrix products in the H100 profile (docs/performance.md).

The grouping can be expressed as a plain batched product instead: the 4 query heads of a
group (times the query positions: 1 per decode step, the prompt length at prefill) form the
rows of one matrix multiplied by that group's keys, ``[batch, kv_heads, 4·T, dim] @ [batch,
kv_heads, dim, L]``, reading the cache once. Prompts are short (~35 tokens), so the explicit
``T × L`` scores cost less than the copies they replace. Registered under the name
``spellxfer_gqa`` with transformers' attention and mask registries;
:func:`grouped_decode_attention` switches a model to it for a block.

The static-cache decoder (:mod:`spellxfer.models.static_decode`) uses the same function under
a second name, ``spellxfer_static``, registered for attention only: transformers builds no mask
for an implementation its mask registry does not know, so a right-padded prefill reaches SDPA's
fused causal kernel with no mask at all, and a decode step passes its own ready-made 4-D mask
(which transformers hands through unchanged).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "spellxfer_gqa"
STATIC_NAME = "spellxfer_static"


def gqa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers attention function: ``query [B, H, T, D]``, ``key``/``value [B, Hkv, L, D]``
    → ``([B, T, H, D], None)``.

    With a mask (left-padded batches: every decode step, and prefill), each group's query heads
    are stacked as rows of one matrix against that group's keys; without one (no padding), the
    prompt goes to SDPA's fused causal kernel, which handles the grouping itself.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads == kv_heads or dropout or (attention_mask is None and q_len > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(batch, kv_heads, groups * q_len, dim)  # head h = group h // G, row h % G
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale
    scores = scores.view(batch, kv_heads, groups, q_len, kv_len)
    if attention_mask is not None:  # [B, 1, T, L]: bool (True = attend) or additive float
        mask = attention_mask[:, :, -q_len:, -kv_len:].unsqueeze(2)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # A left-pad query position may see no key at all: its softmax is 0/0. Zero it, so the pad's
    # hidden state stays finite (a NaN there would leak into real rows as 0 × NaN in the next
    # layer's value product); real tokens never attend to pads, whatever their values.
    probs = scores.softmax(-1).nan_to_num_(0.0).to(value.dtype).view(batch, kv_heads, groups * q_len, kv_len)
    out = torch.matmul(probs, value)  # [B, Hkv, G·T, D]
    return out.view(batch, heads, q_len, dim).transpose(1, 2), None


AttentionInterface.register(NAME, gqa_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
AttentionInterface.register(STATIC_NAME, gqa_attention_forward)  # no mask function, on purpose (see above)


@contextmanager
def attention_implementation(model, name: str):
    """Run the model with the registered attention implementation ``name`` inside the block
    (``model.config`` is shared by every layer), restoring the previous one after."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextmanager
def grouped_decode_attention(model):
    """Use :func:`gqa_attention_forward` inside the block when the model runs SDPA attention
    (eager or other implementations are left alone); restores the previous setting after."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        yield
        return
    with attention_implementation(model, NAME):
        yield
