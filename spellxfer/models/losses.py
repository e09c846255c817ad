"""Completion-only cross-entropy for causal LMs, without full-vocabulary logits for prompt tokens.

Label convention (Hugging Face's, and :class:`~spellxfer.training.datamodule.SpellingCollator`'s):
``labels`` has the shape of ``input_ids``; ``labels[b, t]`` is the token *at* position ``t``, or
``-100`` where nothing is supervised (prompt, padding). Every function here shifts inside — the
prediction made at position ``t`` is scored against ``labels[b, t + 1]`` — so a collated batch goes
in as is and the result equals ``model(input_ids, attention_mask=…, labels=labels).loss``.

Why not just take the model's logits: they are ``batch × length × vocabulary`` and Qwen3's vocabulary
is 151,936 tokens. At batch 8 × 256 tokens that is 2,048 × 151,936 ≈ 311M numbers: 0.6 GB in bf16,
1.2 GB more for the float32 upcast the loss needs, and as much again for the log-softmax kept for
backward and its gradient: gigabytes for numbers that are mostly thrown away. In the demo
spelling rows 70% of real tokens are prompt (Qwen3 tokenizer, mean 40 tokens a row), and padding
adds more; the loss ignores the predictions at all of them.
:func:`completion_loss_from_hidden` keeps only the hidden states of supervised positions, multiplies
them by the (tied) output embedding ``chunk_size`` rows at a time, and recomputes each chunk in
backward instead of storing it, so the peak is one chunk of float32 logits whatever the batch.

Measured on one H100 80GB (torch 2.11, bf16, Qwen3-4B's hidden size 2560, batch 8 × 256 tokens
with 420 supervised positions, loss forward + backward only, an inline script calling the two
functions): full logits 3.5 GiB above the inputs and 11.0 ms; this path with chunks of 256 0.42
GiB and 4.8 ms; with chunks of 64 0.09 GiB but 9.9 ms (more, smaller kernels and recomputation).

Public functions
    :func:`completion_only_loss` — the training entry point: model + batch tensors → loss.
    :func:`completion_loss_from_hidden` — the memory-lean computation from final hidden states.
    :func:`completion_loss_from_logits` — the plain reference, for tests and for heads that are
    not a bias-free linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# 256 supervised positions × 151,936 vocabulary × 4 bytes ≈ 156 MB of float32 logits per chunk
# (plus the same for their gradient in backward). A spelling batch of 8 has ~100 supervised
# positions, so this is usually one chunk; larger chunks save nothing but a few kernel launches.
DEFAULT_CHUNK_SIZE = 256


def completion_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over supervised next-token predictions, from full logits (the reference).

    Args:
        logits: ``[batch, length, vocab]`` in any float dtype; upcast to float32 here.
        labels: ``[batch, length]`` token ids, ``-100`` where not supervised; *not* shifted (see the
            module docstring: position ``t``'s logits are scored against ``labels[:, t + 1]``).

    Returns:
        A float32 scalar: the mean over every supervised token of the batch (not a mean of
        per-sequence means, so a long answer weighs more than a short one).

    Raises:
        ValueError: on mismatched shapes, or when no token is supervised (the mean would be 0/0).
    """
    _check_shapes(logits, labels)
    targets = labels[:, 1:]
    _count_supervised(targets)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="mean"
    )


def completion_loss_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The same loss as :func:`completion_loss_from_logits`, computed from final hidden states.

    Only positions whose next label is supervised are projected onto the vocabulary, ``chunk_size``
    at a time; each chunk's logits are recomputed during backward rather than kept (activation
    checkpointing), so memory is bounded by one chunk. The projection runs in the weight's dtype
    and the cross-entropy in float32, the order Hugging Face's own loss uses: in float32 the two
    agree to rounding (tests: ≤ 1e-5); in bf16 to bf16 rounding of the logits, since a matrix
    product of other shape may round differently (H100: 12.4672 against 12.4710).

    Args:
        hidden_states: ``[batch, length, hidden]``, the decoder's output after its final norm.
        lm_head_weight: ``[vocab, hidden]``, the output projection (for Qwen3 and SmolLM2 the tied
            input embedding). A bias or logit soft-capping is not supported; use the reference.
        labels: ``[batch, length]``, unshifted, ``-100`` where not supervised.
        chunk_size: supervised positions projected at once; bounds peak memory at about
            ``chunk_size × vocab × 8`` bytes (float32 logits and their gradient).

    Returns:
        A float32 scalar, the mean over supervised tokens.

    Raises:
        ValueError: on mismatched shapes, a non-positive ``chunk_size``, or no supervised token.
    """
    _check_shapes(hidden_states, labels)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [vocab, {hidden_states.shape[-1]}], got {list(lm_head_weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = _count_supervised(targets)
    # Boolean indexing copies only the kept rows ([n, hidden]); its backward scatters their
    # gradient back, leaving exact zeros at unsupervised positions.
    hidden = hidden_states[:, :-1][keep]
    targets = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, lm_head_weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, lm_head_weight, t)
    return total / n


def completion_only_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Forward a Hugging Face causal LM (plain or PEFT-wrapped) and return its completion loss.

    Runs the decoder body only (``model.get_decoder()``, which reaches through PEFT wrappers to
    the LoRA-injected layers), then :func:`completion_loss_from_hidden` with the output embedding,
    so full-vocabulary logits never exist. Equals ``model(..., labels=labels).loss``.

    Args:
        model: a ``*ForCausalLM`` whose output layer is a bias-free ``nn.Linear`` (Qwen3, SmolLM2,
            Llama). LoRA on the output layer itself is refused: its adapter would be skipped.
        input_ids: ``[batch, length]``.
        attention_mask: ``[batch, length]``, 1 on real tokens (training pads on the right), or None.
        labels: ``[batch, length]``, unshifted, ``-100`` on prompt and padding. The argument order
            is the model's own ``forward`` order (input ids, mask, labels).
        chunk_size: see :func:`completion_loss_from_hidden`.

    Raises:
        ValueError: for an output layer this path cannot reproduce, or a batch with no supervised token.
    """
    decoder, head = decoder_and_head(model)
    # use_cache=False: a training forward has no use for a KV cache, and with activation
    # checkpointing a cache would grow again during recomputation (keys of twice the length).
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return completion_loss_from_hidden(hidden, head.weight, labels, chunk_size)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The decoder body and the output layer of a causal LM (plain or PEFT-wrapped), refusing an
    output layer that :func:`completion_loss_from_hidden` cannot reproduce from its ``weight``.

    Raises:
        ValueError: for an output layer that is not a bias-free ``nn.Linear``, or logit soft-capping.
    """
    head = model.get_output_embeddings()
    # type(), not isinstance(): a wrapper (peft's LoRA layer, a subclass overriding forward) adds
    # something to `x @ weight.T` that using `.weight` alone would silently drop.
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(
            f"completion_only_loss needs a bias-free nn.Linear output layer, got {type(head).__name__}; "
            "use completion_loss_from_logits with the model's logits instead"
        )
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(
            "completion_only_loss cannot apply final_logit_softcapping; use completion_loss_from_logits"
        )
    return model.get_decoder(), head


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _check_shapes(values: torch.Tensor, labels: torch.Tensor) -> None:
    if values.dim() != 3 or labels.shape != values.shape[:2]:
        raise ValueError(
            f"expected [batch, length, features] and labels [batch, length], got {list(values.shape)} "
            f"and {list(labels.shape)}"
        )


def _count_supervised(targets: torch.Tensor) -> int:
    n = int((targets != IGNORE_INDEX).sum())
    if n == 0:
        raise ValueError(
            "no supervised token in the batch (every label after the first position is -100): the mean "
            "cross-entropy is undefined. Check that completions survived truncation and were not masked."
        )
    return n
