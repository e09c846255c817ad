"""Completion-only loss: the memory-lean hidden-state path is the same function as the plain one.

Everything runs on ``tiny-qwen3`` (real Qwen3 tokenizer, the full 151,936-row vocabulary, random
weights) with real spelling rows from the demo build, tokenized and collated by the training code.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_jsonl

from spellxfer.models.losses import (
    completion_loss_from_hidden,
    completion_loss_from_logits,
    completion_only_loss,
)
from spellxfer.models.registry import load_model, load_tokenizer
from spellxfer.training.datamodule import SpellingCollator, tokenize_examples


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-qwen3", seed=0)


@pytest.fixture(scope="module")
def batch(demo_data):
    tok = load_tokenizer("tiny-qwen3")
    rows = read_jsonl(demo_data / "spelling_train.jsonl")[:5]
    examples = tokenize_examples(tok, [r["question"] for r in rows], [r["answer"] for r in rows])
    b = SpellingCollator(tok.pad_token_id)(examples)
    # The rows differ in length, so the batch really holds padding as well as prompts.
    assert (b["attention_mask"] == 0).any()
    return b


def hidden_and_head(model, batch):
    """Final hidden states and the tied output weight, both detached leaves that collect gradients."""
    with torch.no_grad():
        h = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    return h.clone().requires_grad_(), model.lm_head.weight.detach().clone().requires_grad_()


def param_grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_size", [1, 7, 256])
def test_hidden_path_equals_logits_reference_in_value_and_every_parameter_gradient(tiny, batch, chunk_size):
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    reference = completion_loss_from_logits(tiny(**args).logits, batch["labels"])
    ref_grads = param_grads(tiny, reference)
    lean = completion_only_loss(
        tiny, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size
    )
    lean_grads = param_grads(tiny, lean)

    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=0)
    assert lean_grads.keys() == ref_grads.keys() and "model.embed_tokens.weight" in ref_grads
    for name in ref_grads:
        torch.testing.assert_close(lean_grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)
    # Random weights predict uniformly: the loss sits near ln(151,936) ≈ 11.93, so it is a real CE.
    assert 11.0 < reference.item() < 13.0


def test_equals_hugging_face_loss_so_the_label_shift_is_the_same(tiny, batch):
    hf = tiny(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    ours = completion_only_loss(tiny, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)


def test_only_supervised_positions_count(tiny, batch):
    labels = batch["labels"]
    h, w = hidden_and_head(tiny, batch)
    loss = completion_loss_from_hidden(h, w, labels, chunk_size=4)
    loss.backward()

    # Position t predicts labels[t + 1]; the last position predicts nothing.
    predicts_supervised = torch.zeros_like(labels, dtype=torch.bool)
    predicts_supervised[:, :-1] = labels[:, 1:] != -100
    assert predicts_supervised.sum() < 0.5 * batch["attention_mask"].sum()  # mostly prompt + padding
    assert (h.grad[~predicts_supervised] == 0).all()
    assert (h.grad[predicts_supervised].abs().sum(-1) > 0).all()

    # An independent spelling-out of the definition: −log p(next completion token), averaged.
    b, t = predicts_supervised.nonzero(as_tuple=True)
    log_probs = torch.log_softmax((h[b, t] @ w.T).double(), dim=-1)
    by_hand = -log_probs[torch.arange(len(b)), labels[b, t + 1]].mean()
    torch.testing.assert_close(loss.double(), by_hand, atol=1e-5, rtol=0)

    # Whatever sits at prompt and padding positions does not change the loss, in either function.
    with torch.no_grad():
        noisy = h.detach().clone()
        noisy[~predicts_supervised] = torch.randn_like(noisy[~predicts_supervised]) * 100
        assert completion_loss_from_hidden(noisy, w, labels) == completion_loss_from_hidden(h, w, labels)
        logits, noisy_logits = h @ w.T, noisy @ w.T
        torch.testing.assert_close(
            completion_loss_from_logits(noisy_logits, labels), completion_loss_from_logits(logits, labels)
        )


def test_a_batch_without_supervised_tokens_is_an_error_not_nan(tiny, batch):
    h, w = hidden_and_head(tiny, batch)
    # All -100, and the subtler case: only position 0 supervised, which no prediction targets.
    nothing = torch.full_like(batch["labels"], -100)
    first_only = nothing.clone()
    first_only[:, 0] = batch["input_ids"][:, 0]
    for labels in (nothing, first_only):
        with pytest.raises(ValueError, match="no supervised token"):
            completion_loss_from_hidden(h, w, labels)
        with pytest.raises(ValueError, match="no supervised token"):
            completion_loss_from_logits(h @ w.T, labels)


def test_bfloat16_model_agrees_with_its_own_logits(tiny, batch):
    model = load_model("tiny-qwen3", dtype=torch.bfloat16, seed=0)
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        reference = completion_loss_from_logits(model(**args).logits, batch["labels"])
        lean = completion_only_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert lean.dtype == torch.float32  # cross-entropy ran in float32, not bf16
    torch.testing.assert_close(lean, reference, atol=1e-3, rtol=0)


def test_lora_model_matches_its_own_loss_and_trains_only_adapters(batch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_model("tiny-qwen3", seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # non-zero B so the adapters change the output and the check means something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    hf = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    ours = completion_only_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)
    with model.disable_adapter(), torch.no_grad():
        base = completion_only_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert abs(base.item() - ours.item()) > 1e-4  # the adapters were in the forward pass

    ours.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)


# peft warns that the tied embedding is adapted too; that is the configuration being refused.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_refuses_an_output_layer_it_would_silently_skip(batch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model("tiny-qwen3", seed=0), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        completion_only_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def test_length_grouped_batch_without_mask_equals_each_example_alone(tiny, demo_data):
    """The training fast path: a length-grouped, right-padded batch run *without* an attention
    mask (so SDPA may use its fused causal kernel) gives the loss and gradients of running every
    example alone, unpadded — the pads after a row cannot reach its real tokens."""
    from spellxfer.training.datamodule import LengthGroupedBatchSampler

    tok = load_tokenizer("tiny-qwen3")
    rows = read_jsonl(demo_data / "spelling_train.jsonl")[:64]
    examples = tokenize_examples(tok, [r["question"] for r in rows], [r["answer"] for r in rows])
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], batch_size=16, seed=0)
    idx = next(iter(sampler))
    group = [examples[i] for i in idx]
    b = SpellingCollator(tok.pad_token_id)(group)
    assert (b["attention_mask"] == 0).any(), "the group should still hold some padding"
    batched = completion_only_loss(tiny, b["input_ids"], None, b["labels"])
    batched_grads = param_grads(tiny, batched)

    total, n_supervised = 0.0, 0
    for e in group:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total = total + completion_only_loss(tiny, ids, None, labels) * n
        n_supervised += n
    alone = total / n_supervised
    alone_grads = param_grads(tiny, alone)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    for name, g in alone_grads.items():
        torch.testing.assert_close(batched_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_decoder_layers_give_the_plain_loss_and_gradients(batch):
    """``model.compile_layers``: the regionally compiled training forward (dynamic shapes, so two
    sequence lengths share one graph) computes the plain model's loss and LoRA gradients; in eval
    mode the layers run their plain forward (generation never enters compiled code)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from spellxfer.models.registry import compile_decoder_layers

    plain = get_peft_model(
        load_model("tiny-qwen3", seed=1),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    compiled = copy.deepcopy(plain)
    assert compile_decoder_layers(compiled) == "compiled"
    plain.train(), compiled.train()
    ids, labels = batch["input_ids"], batch["labels"]
    for cut in (ids.shape[1], ids.shape[1] - 3):  # a second length: no recompilation needed to be right
        want = completion_only_loss(plain, ids[:, :cut], None, labels[:, :cut])
        got = completion_only_loss(compiled, ids[:, :cut], None, labels[:, :cut])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        want_g, got_g = param_grads(plain, want), param_grads(compiled, got)
        assert want_g.keys() == got_g.keys() and any("lora_B" in n for n in want_g)
        for name, g in want_g.items():
            torch.testing.assert_close(got_g[name], g, atol=1e-5, rtol=1e-4, msg=name)
    compiled.eval()
    layer = next(m for m in compiled.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = []
    handle = layer.register_forward_pre_hook(lambda m, a: calls.append(torch.compiler.is_compiling()))
    with torch.no_grad():
        compiled(input_ids=ids[:, :4])
    handle.remove()
    assert calls == [False]
