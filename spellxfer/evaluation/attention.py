"""Decode-step attention for grouped-query models without copying the KV cache.

Qwen3-4B has 32 query heads sharing 8 key/value heads. transformers' SDPA path can only pass
that grouping to PyTorch when there is no attention mask; generation over left-padded batches
always has one, so every layer first *copies* keys and values four times (``repeat_kv``) —
at batch 1,024 and ~48 cached positions that is 0.8 GB written per layer per generated token,
the largest item after the matrix products in the H100 profile (docs/performance.md).

A decode step has one query position, so the grouping can be expressed as a plain batched
product instead: the 4 query heads of a group form the rows of one small matrix multiplied by
that group's keys ``[batch, kv_heads, 4, dim] @ [batch, kv_heads, dim, L]``, reading the cache
once. Prefill (several query positions) keeps transformers' SDPA path, whose fused kernels win
there. Registered under the name ``spellxfer_gqa`` with transformers' attention and mask
registries; :func:`grouped_decode_attention` switches a model to it for a block.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "spellxfer_gqa"


def gqa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):  # fmt: skip
    """transformers attention function: ``query [B, H, T, D]``, ``key``/``value [B, Hkv, L, D]``
    → ``([B, T, H, D], None)``; the grouped product for T = 1, SDPA otherwise."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    if attention_mask is not None:  # [B, 1, 1, L]: bool (True = attend) or additive float
        mask = attention_mask[:, :, -1:, -key.shape[2] :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [B, Hkv, G, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(NAME, gqa_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def grouped_decode_attention(model):
    """Use :func:`gqa_attention_forward` inside the block when the model runs SDPA attention
    (eager or other implementations are left alone); restores the previous setting after."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous != "sdpa":
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
