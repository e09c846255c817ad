"""The fast decode loop against transformers' ``generate``: same greedy replies, same sampling law.

The fast path (``GenerationEngine(reference=False)``, the default) is what ``evaluate``,
validation and serving use; ``generate`` is the reference it must reproduce.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_jsonl
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from spellxfer.models.generation import (
    GenerationEngine,
    Sampling,
    default_sampling,
    next_token_probs,
    pick_next_tokens,
)
from spellxfer.models.registry import load_model, load_tokenizer

SETTINGS = [
    Sampling(),  # the defaults (the dataclass): 0.6 / 0.95 / 20 / 0
    Sampling(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0),  # Qwen3's recommendation
    Sampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),  # plain softmax over the vocabulary
    Sampling(temperature=1.3, top_p=0.5, top_k=50, min_p=0.05),
    Sampling(temperature=0.9, top_p=0.99, top_k=5, min_p=0.2),
]


def transformers_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution ``generate`` samples from: its warpers, in its order, then softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(s.temperature)])
    if s.top_k:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
        warpers.append(TopPLogitsWarper(s.top_p))
    if s.min_p:
        warpers.append(MinPLogitsWarper(s.min_p))
    return warpers(None, logits.clone()).softmax(-1)


def dense(probs: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(probs.shape[0], vocab).scatter_(1, ids, probs)


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"T{s.temperature}-p{s.top_p}-k{s.top_k}-m{s.min_p}")
def test_candidate_distribution_equals_transformers_warpers(s):
    torch.manual_seed(0)
    vocab = 151_936
    # peaked and flat rows, as a trained model's next-token logits are one or the other
    logits = torch.randn(8, vocab) * torch.tensor([0.5, 1, 2, 4, 6, 8, 10, 12])[:, None]
    probs, ids = next_token_probs(logits, s)
    torch.testing.assert_close(dense(probs, ids, vocab), transformers_probs(logits, s), atol=1e-6, rtol=1e-5)
    # float32 sum of 151,936 terms
    torch.testing.assert_close(probs.sum(-1), torch.ones(8), atol=1e-4, rtol=0)
    if s.top_k:
        assert probs.shape == (8, s.top_k)


def test_draws_follow_the_reference_distribution():
    """200,000 draws from one row: frequencies match transformers' probabilities (chi-square
    p > 0.001, and every frequency within 0.005 of its probability)."""
    torch.manual_seed(1)
    s = Sampling()
    logits = torch.randn(1, 4_096) * 6  # the law does not depend on the vocabulary size; draws are cheaper
    expected = transformers_probs(logits, s)[0]
    support = expected.nonzero().squeeze(-1)
    assert 2 <= len(support) <= 20
    draws = pick_next_tokens(logits.expand(200_000, -1), s)
    assert set(draws.unique().tolist()) <= set(support.tolist())
    observed = torch.bincount(draws, minlength=4_096)[support].double()
    expected_counts = expected[support].double()
    expected_counts = expected_counts / expected_counts.sum() * 200_000
    p = chisquare(observed.numpy(), expected_counts.numpy()).pvalue
    assert p > 1e-3, p
    assert (observed / 200_000 - expected[support]).abs().max() < 0.005


def test_greedy_picks_the_argmax():
    logits = torch.randn(4, 1000)
    assert torch.equal(pick_next_tokens(logits, Sampling(decoding="greedy")), logits.argmax(-1))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-qwen3", dtype=torch.float32, device="cpu"), load_tokenizer("tiny-qwen3")


def _questions(demo_data, n=12):
    return [
        r["question"]
        for f in ("position_val.jsonl", "count_val.jsonl")
        for r in read_jsonl(demo_data / f)[:n]
    ]


@pytest.mark.parametrize("batch_size", [1, 5, 24])
def test_greedy_replies_identical_to_generate_tiny(tiny, demo_data, batch_size):
    model, tok = tiny
    qs = _questions(demo_data)
    greedy = default_sampling(decoding="greedy", max_new_tokens=10)
    fast = GenerationEngine(model, tok, greedy, batch_size=batch_size).generate(qs)
    ref = GenerationEngine(model, tok, greedy, batch_size=batch_size, reference=True).generate(qs)
    assert fast == ref
    assert len(fast) == len(qs) and all(len(r) == 1 for r in fast)


@pytest.mark.slow
def test_greedy_replies_identical_to_generate_smollm2(demo_data):
    """The real model ends its turns, so this also covers rows that stop at different steps."""
    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu"), load_tokenizer("smollm2-135m")
    qs = _questions(demo_data, n=16)
    greedy = default_sampling(decoding="greedy", max_new_tokens=24)
    engine = GenerationEngine(model, tok, greedy, batch_size=16)
    fast = engine.generate(qs)
    assert fast == GenerationEngine(model, tok, greedy, batch_size=16, reference=True).generate(qs)
    ended = [r[0] for r in fast if r[0].endswith("<|im_end|>")]
    assert ended, "expected some replies to end their turn within 24 tokens"
    # new_tokens counts up to and including each row's end of turn, no padding after it
    assert engine.new_tokens == sum(len(tok(r[0], add_special_tokens=False)["input_ids"]) for r in fast)


def test_k_samples_per_question_and_seeded(tiny, demo_data):
    model, tok = tiny
    qs = _questions(demo_data, n=3)
    s = default_sampling(decoding="sampled", max_new_tokens=6, samples=3, seed=5)
    a = GenerationEngine(model, tok, s, batch_size=4).generate(qs)
    b = GenerationEngine(model, tok, s, batch_size=4).generate(qs)
    assert a == b and all(len(r) == 3 for r in a)
    assert any(len(set(r)) > 1 for r in a), "three draws of a random model should differ somewhere"
    greedy = default_sampling(decoding="greedy", max_new_tokens=6, samples=3)
    g = GenerationEngine(model, tok, greedy, batch_size=4).generate(qs)
    assert all(len(set(r)) == 1 for r in g)


@pytest.mark.parametrize("path", ["static", "eager", "reference"])
def test_on_step_hands_over_every_token_as_it_is_drawn_and_changes_nothing(tiny, demo_data, path):
    """The API server streams replies from ``on_step``: each step's tokens, row by row under the
    batch's input indices, spell exactly the replies' token ids (pad after a row's end), and the
    replies are the ones generated without the hook (same RNG stream)."""
    model, tok = tiny
    qs = _questions(demo_data, n=3)
    s = default_sampling(decoding="sampled", max_new_tokens=6, seed=3)

    def engine():
        decoder = "eager" if path == "eager" else "static"
        return GenerationEngine(model, tok, s, batch_size=4, decoder=decoder, reference=path == "reference")

    plain = engine().generate(qs)
    hooked, seen = engine(), {}
    hooked.on_step = lambda idx, tokens: [seen.setdefault(i, []).append(t) for i, t in zip(idx, tokens)]
    assert hooked.generate(qs) == plain
    assert sorted(seen) == list(range(len(qs)))
    for i, (ids,) in enumerate(hooked.last_reply_ids):
        assert seen[i][: len(ids)] == ids and set(seen[i][len(ids):]) <= {hooked.pad_id}
