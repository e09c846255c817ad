"""Several trials' LoRA adapters on one base model (spellxfer/training/packed.py), tiny-qwen3, float32.

What packing promises at the level of one forward: each row goes through its own trial's adapter
— whatever its rank, alpha or target modules — so a trial's loss and gradients in a pack are the
ones a PEFT model with that adapter alone gives (every kernel); generation with per-row adapters,
prompts of several adapters mixed in each batch, gives each prompt the reply its own adapter gives
alone; and a trial's checkpoint and adapter directory are a fit's. Trained on spelling, evaluated
on position and count only.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from spellxfer.models.generation import GenerationEngine, Sampling
from spellxfer.models.losses import completion_loss_from_hidden
from spellxfer.models.registry import load_model, load_tokenizer, quiet_peft_wrap
from spellxfer.sweep.pack import generate_packed, probe_packed
from spellxfer.training.module import ALL_LINEAR
from spellxfer.training.packed import KERNELS, PackedLoRA

# (adapter, rank, alpha, target modules, seed): ranks, scales and layer sets all differ
TRIALS = [
    ("t0000", 4, 8, ALL_LINEAR, 0),
    ("t0001", 8, 32, ("q_proj", "v_proj"), 1),
    ("t0002", 2, 4, ALL_LINEAR, 2),
]


def config(r: int, alpha: int, targets) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        bias="none",
    )


def frozen_base():
    base = load_model("tiny-qwen3")
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def packed_model(kernel: str = "loop", scale: float = 0.5) -> PackedLoRA:
    """The three adapters in one pack, each B drawn at random (PEFT starts B at zero, which would
    make every adapter the identity and the test blind to which adapter a row went through)."""
    packed = PackedLoRA(frozen_base(), kernel=kernel)
    for name, r, alpha, targets, seed in TRIALS:
        packed.add(name, config(r, alpha, targets), seed)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for key, p in packed._named(name):
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return packed


def alone(packed: PackedLoRA, name: str, r: int, alpha: int, targets, seed: int):
    """A PEFT model with only this trial's adapter, holding the pack's weights for it."""
    torch.manual_seed(seed)
    with quiet_peft_wrap():
        model = get_peft_model(frozen_base(), config(r, alpha, targets))
    state = {k.removeprefix("lm."): v for k, v in packed.state(name).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return model


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_row_trains_through_its_own_adapter_with_the_gradient_it_gets_alone(kernel):
    torch.manual_seed(0)
    ids = torch.randint(0, 150_000, (7, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt, then a supervised completion
    groups = [("t0000", 3), ("t0001", 2), ("t0002", 2)]
    packed = packed_model(kernel)
    model = packed.model.train()
    with packed.rows(groups):
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        losses, start = [], 0
        for _, n in groups:
            losses.append(
                completion_loss_from_hidden(
                    hidden[start : start + n], model.get_output_embeddings().weight, labels[start : start + n]
                )
            )
            start += n
        sum(losses).backward()  # one backward for all trials: their adapters' parameters are disjoint

    start = 0
    for (name, r, alpha, targets, seed), (_, n), loss in zip(TRIALS, groups, losses):
        ref = alone(packed, name, r, alpha, targets, seed).train()
        hidden = ref.get_decoder()(input_ids=ids[start : start + n], use_cache=False).last_hidden_state
        ref_loss = completion_loss_from_hidden(
            hidden, ref.get_output_embeddings().weight, labels[start : start + n]
        )
        ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
        ref_grads = [p.grad for p in ref.parameters() if p.requires_grad]
        grads = [p.grad for p in packed.parameters(name)]
        assert len(grads) == len(ref_grads) == 2 * len(targets) * 2  # A and B, each target, both layers
        for g, want in zip(grads, ref_grads):
            assert torch.allclose(g, want, atol=1e-5), name
        start += n
    # the adapter's update really reaches its rows: without the pack's plan the loss differs
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids[:3], use_cache=False).last_hidden_state
    assert completion_loss_from_hidden(
        hidden, model.get_output_embeddings().weight, labels[:3]
    ).item() != pytest.approx(losses[0].item(), abs=1e-3)


def test_generation_mixes_adapters_in_a_batch_and_gives_each_prompt_its_own_adapters_reply():
    tok = load_tokenizer("tiny-qwen3")
    questions = [
        "How many letters are in the word 'apple'?",
        "What is the 3rd letter of 'banana'?",
        "How many times does the letter 'r' appear in 'strawberry'?",
        "What is the last letter of 'cat'?",
    ]
    packed = packed_model(scale=2.0)
    sampling = Sampling(decoding="greedy", max_new_tokens=6)
    names = [t[0] for t in TRIALS]
    # batches of 5 rows: every batch holds prompts of two or three adapters, in length order
    replies, engine = generate_packed(packed, tok, names, [questions] * 3, sampling, batch_size=5)
    assert engine.last_batch_size == 5
    own = []
    for name, r, alpha, targets, seed in TRIALS:
        ref = alone(packed, name, r, alpha, targets, seed).eval()
        own.append(GenerationEngine(ref, tok, sampling, batch_size=len(questions)).generate(questions))
    assert replies == own
    assert own[0] != own[1] and own[1] != own[2], (
        "the adapters must answer differently for this test to see mix-ups"
    )


@pytest.mark.parametrize("path", ["static", "eager"])
def test_the_likelihood_probe_mixes_adapters_in_a_batch_and_ranks_each_items_answers_as_its_adapter_alone(
    path, monkeypatch
):
    from spellxfer.evaluation import likelihood
    from spellxfer.evaluation.likelihood import probe_items
    from spellxfer.tasks.questions import Item

    if path == "eager":  # the path of models the static decoder cannot run
        monkeypatch.setattr(
            "spellxfer.models.static_decode.static_decode_unsupported", lambda model: "forced eager"
        )
        monkeypatch.setattr(likelihood, "EAGER_MAX_ROWS", 100)  # two or three items per batch
    tok = load_tokenizer("tiny-qwen3")
    rows = [("position", "nth_letter", "letter", "a", {"word": "banana", "position": 2}),
            ("count", "word_length", "integer", "5", {"word": "apple"}),
            ("count", "letter_count", "integer", "3", {"word": "strawberry", "letter": "r"}),
            ("position", "letter_index", "integer", "1", {"word": "cat", "letter": "c"})]
    items = [
        Item(
            id=str(i),
            file="t.jsonl",
            line=i + 1,
            task=t,
            subtask=sub,
            kind=kind,
            answer=a,
            question=f"q {sub} {m}",
            meta=m,
        )
        for i, (t, sub, kind, a, m) in enumerate(rows)
    ]
    packed = packed_model(scale=2.0)
    names = [t[0] for t in TRIALS]
    # batches of 5 prefixes over 12 (3 adapters × 4 items): each batch mixes two or three adapters
    results, prompts, _, scorer = probe_packed(packed, tok, names, items, batch_size=5)
    assert scorer.path == path and len(results) == 3 and all(len(r) == 4 for r in results)
    own = []
    for name, r, alpha, targets, seed in TRIALS:
        ref = alone(packed, name, r, alpha, targets, seed).eval()
        want, want_prompts, _, _ = probe_items(
            ref,
            tok,
            items,
            [[{"role": "user", "content": it.question}] for it in items],
            batch_size=4,
            label=None,
        )
        own.append(want)
        assert prompts == want_prompts
    for got, want in zip(results, own):
        assert [g.answer for g in got] == [w.answer for w in want] and [g.gold_rank for g in got] == [
            w.gold_rank for w in want
        ]
        assert [g.gold_logprob for g in got] == pytest.approx([w.gold_logprob for w in want], abs=1e-4)
    logprobs = [[w.gold_logprob for w in want] for want in own]
    assert logprobs[0] != pytest.approx(logprobs[1], abs=1e-2), (
        "the adapters must differ for this test to see mix-ups"
    )


def test_a_trials_checkpoint_weights_and_adapter_directory_are_a_fits(tmp_path):
    from safetensors.torch import load_file

    from spellxfer.evaluation.evaluate import load_adapter

    packed = packed_model()
    name, r, alpha, targets, seed = TRIALS[1]
    state = packed.state(name)
    assert all(k.startswith("lm.base_model.model.") and ".default." in k for k in state)
    out = packed.save_adapter(name, tmp_path / "best_adapter")
    saved_config = json.loads((out / "adapter_config.json").read_text())
    assert (saved_config["r"], saved_config["lora_alpha"], sorted(saved_config["target_modules"])) == (
        r,
        alpha,
        sorted(targets),
    )
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = load_adapter(load_model("tiny-qwen3"), out, "tiny-qwen3")  # what evaluate and serve do
    for key, value in state.items():
        assert torch.equal(reloaded.state_dict()[key.removeprefix("lm.")], value)
    # loading it back into another pack slot restores the same weights; a wrong rank is refused
    other = PackedLoRA(frozen_base())
    other.add("t0009", config(r, alpha, targets), seed=5)
    other.load_state("t0009", state, "checkpoint x")
    assert all(torch.equal(a, b) for a, b in zip(other.state("t0009").values(), state.values()))
    other.add("t0010", config(r * 2, alpha, targets), seed=5)
    with pytest.raises(Exception, match="shape"):
        other.load_state("t0010", state, "checkpoint x")


def test_an_adapter_that_leaves_the_pack_takes_its_weights_and_rows_with_it():
    packed = packed_model()
    packed.remove("t0000")  # the adapter the PEFT model was created with
    packed.remove("t0001")
    assert packed.names == ["t0002"]
    assert packed.lm.get_base_model() is packed.base  # PEFT still finds its way (generation needs it)
    assert not [k for k, _ in packed.lm.named_parameters() if ".t0001." in k or ".t0000." in k]
    trainable = {k for k, p in packed.lm.named_parameters() if p.requires_grad}
    assert trainable == {k for k, _ in packed.lm.named_parameters() if ".lora_" in k}
    assert isinstance(packed.lm, PeftModel)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_a_trials_dropout_masks_are_its_own_whatever_its_pack_mates(checkpointing):
    """A micro-batch's dropout masks are drawn at its own width from its own seed (and activation
    checkpointing's recomputation draws them again), so packing it with a trial of longer rows
    changes neither its loss nor its gradient."""
    torch.manual_seed(1)
    own = torch.randint(0, 150_000, (3, 9))
    other = torch.randint(0, 150_000, (2, 14))
    labels = own.clone()
    labels[:, :4] = -100
    dropout = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.3, target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"
    )

    def run(with_mate: bool):
        base = frozen_base().train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        packed = PackedLoRA(base)
        if with_mate:
            packed.add("mate", config(8, 16, ALL_LINEAR), seed=9)
        packed.add("drop", dropout, seed=3)
        ids, lab, groups = own, labels, [("drop", 3, 9, 7)]
        if with_mate:
            pad = torch.nn.functional.pad
            ids = torch.cat([other, pad(own, (0, 5))])
            lab = torch.cat([torch.full((2, 14), -100), pad(labels, (0, 5), value=-100)])
            groups = [("mate", 2, 14, 5), ("drop", 3, 9, 7)]
        model = packed.model
        with packed.rows(groups):
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            start = ids.shape[0] - 3
            loss = completion_loss_from_hidden(
                hidden[start:], model.get_output_embeddings().weight, lab[start:]
            )
            loss.backward()
        return loss.item(), [p.grad for p in packed.parameters("drop")]

    (alone_loss, alone_grads), (packed_loss, packed_grads) = run(False), run(True)
    assert packed_loss == pytest.approx(alone_loss, abs=1e-5)
    assert all(torch.allclose(g, want, atol=1e-5) for g, want in zip(packed_grads, alone_grads))
    assert any(g.abs().sum() > 0 for g in packed_grads)
