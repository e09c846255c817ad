"""The static-cache decoder against the eager loop it replaces: same greedy replies, same draws.

``decoder="auto"`` takes the static path on a CPU (CUDA graphs need a GPU: the last tests run
there only), so these tests pin what ``evaluate``, validation and the server do on a CPU, and the
reusable prefill a likelihood probe builds on.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_jsonl

from spellxfer.models.generation import (
    CPU_BATCH_SIZE,
    GenerationEngine,
    auto_batch_size,
    default_sampling,
    generation_bytes_per_row,
)
from spellxfer.models.registry import load_model, load_tokenizer
from spellxfer.models.static_decode import (
    bucket_rows,
    release_static_decoder,
    static_decode_unsupported,
    static_decoder,
)
from spellxfer.tasks.chat import format_prompt


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-qwen3", dtype=torch.float32, device="cpu"), load_tokenizer("tiny-qwen3")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype=torch.float32, device="cpu"), load_tokenizer("smollm2-135m")


def _questions(demo_data, n):
    # position and count questions interleaved: prompts of different lengths in every batch
    rows = [read_jsonl(demo_data / f) for f in ("position_val.jsonl", "count_val.jsonl")]
    return [r["question"] for pair in zip(*rows) for r in pair][:n]


def _engines(model, tok, sampling, batch_size):
    return {
        d: GenerationEngine(model, tok, sampling, batch_size=batch_size, decoder=d)
        for d in ("eager", "static")
    }


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_greedy_static_equals_eager_tiny(tiny, demo_data, batch_size):
    model, tok = tiny
    qs = _questions(demo_data, 16)
    engines = _engines(model, tok, default_sampling(decoding="greedy", max_new_tokens=10), batch_size)
    replies = {d: e.generate(qs) for d, e in engines.items()}
    assert replies["static"] == replies["eager"]
    n_batches = math.ceil(len(qs) / batch_size)
    assert engines["static"].paths == {"static": n_batches} and engines["eager"].paths == {"eager": n_batches}
    assert engines["static"].new_tokens == engines["eager"].new_tokens
    if batch_size > 1:  # the batches really mix prompt lengths (left padding in the eager loop)
        lengths = sorted(len(tok(format_prompt(tok, q), add_special_tokens=False)["input_ids"]) for q in qs)
        assert any(len(set(lengths[i : i + batch_size])) > 1 for i in range(0, len(qs), batch_size))


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_greedy_static_equals_eager_smollm2(smollm2, demo_data, batch_size):
    """The real model ends its turns at different steps, so rows stop early and pad after."""
    model, tok = smollm2
    qs = _questions(demo_data, 16)
    engines = _engines(model, tok, default_sampling(decoding="greedy", max_new_tokens=24), batch_size)
    replies = {d: e.generate(qs) for d, e in engines.items()}
    assert replies["static"] == replies["eager"]
    assert engines["static"].paths == {"static": math.ceil(len(qs) / batch_size)}
    assert any(r[0].endswith("<|im_end|>") for r in replies["static"]), (
        "expected some turns to end within 24 tokens"
    )
    n_tokens = {len(tok(r[0], add_special_tokens=False)["input_ids"]) for r in replies["static"]}
    assert len(n_tokens) > 1, "expected rows to stop at different steps"
    assert engines["static"].new_tokens == engines["eager"].new_tokens == sum(
        len(tok(r[0], add_special_tokens=False)["input_ids"]) for r in replies["static"])


def test_sampled_static_draws_equal_eager(tiny, demo_data):
    """Same seed, same batches: the static path consumes the RNG stream exactly as the eager loop."""
    model, tok = tiny
    qs = _questions(demo_data, 10)
    s = default_sampling(decoding="sampled", max_new_tokens=6, samples=2, seed=3)
    replies = {d: e.generate(qs) for d, e in _engines(model, tok, s, 4).items()}
    assert replies["static"] == replies["eager"]
    assert all(len(r) == 2 for r in replies["static"])


def test_prefill_and_steps_match_full_forwards(tiny, demo_data):
    """The reusable prefill: each row's logits after its prompt, and after one more token, equal a
    plain forward over that row alone (what a likelihood probe scores with)."""
    model, tok = tiny
    prompts = [
        tok(format_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in _questions(demo_data, 3)
    ]
    assert len({len(p) for p in prompts}) > 1
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    state = static_decoder(model).prefill(ids, lengths, max_new_tokens=4)
    nxt = torch.tensor([11, 22, 33])
    with torch.inference_mode():
        stepped = state.step(nxt).clone()
        for i, p in enumerate(prompts):
            full = model(input_ids=torch.tensor([p + [int(nxt[i])]])).logits[0]
            torch.testing.assert_close(state.logits[i], full[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stepped[i], full[-1], atol=1e-5, rtol=1e-5)


def test_prefill_in_chunks_of_rows_equals_one_call(tiny, demo_data):
    """Long batches are prefilled in runs of rows padded to their own longest prompt: same logits,
    same greedy replies as one prefill over the whole padded batch."""
    model, tok = tiny
    qs = _questions(demo_data, 12)
    greedy = default_sampling(decoding="greedy", max_new_tokens=6)
    decoder = static_decoder(model)
    whole = GenerationEngine(model, tok, greedy, batch_size=12, decoder="static").generate(qs)
    chunks_before = decoder.prefill_chunks
    decoder.prefill_chunk_tokens = 100  # ~3 rows of ~35 tokens per prefill call
    try:
        chunked = GenerationEngine(model, tok, greedy, batch_size=12, decoder="static").generate(qs)
    finally:
        decoder.prefill_chunk_tokens = decoder.PREFILL_CHUNK_TOKENS
    assert decoder.prefill_chunks - chunks_before >= 4
    assert chunked == whole


def test_unsupported_models_fall_back_to_the_eager_loop(tiny, demo_data):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tok = tiny
    torch.manual_seed(0)
    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=151_936,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    assert "qwen2" in static_decode_unsupported(qwen2)
    qs = _questions(demo_data, 6)
    greedy = default_sampling(decoding="greedy", max_new_tokens=6)
    engine = GenerationEngine(qwen2, tok, greedy, batch_size=3)  # decoder="auto"
    assert engine.generate(qs) == GenerationEngine(qwen2, tok, greedy, batch_size=3, reference=True).generate(
        qs
    )
    assert engine.paths == {"eager": 2}


def test_auto_batch_size_on_cpu_and_the_memory_estimate(tiny, demo_data):
    model, tok = tiny
    qs = _questions(demo_data, 40)
    # batch_size="auto"
    engine = GenerationEngine(model, tok, default_sampling(decoding="greedy", max_new_tokens=3))
    engine.generate(qs)
    assert engine.last_batch_size == CPU_BATCH_SIZE and engine.paths == {"static": 2}
    assert auto_batch_size(model, 40, 3, samples=4) == CPU_BATCH_SIZE // 4
    # the estimate covers the cache the decoder really allocated per row
    decoder = static_decoder(model)
    kv_bytes = sum(t.numel() * t.element_size() for t in decoder._store) / decoder.reserved * max(
        b.length for b in decoder._buckets.values())
    longest = max(len(tok(format_prompt(tok, q), add_special_tokens=False)["input_ids"]) for q in qs)
    assert generation_bytes_per_row(model.config, longest, 3, element_bytes=4) > kv_bytes
    release_static_decoder(model)
    assert static_decoder(model)._store is None


def test_bucket_rows():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 16, 17, 256, 257, 500, 2048)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        256,
        512,
        512,
        2048,
    ]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def gpu_questions():
    """Position and count questions of mixed lengths from the templates (no data build needed,
    so the GPU box needs no word-list package)."""
    import random

    from spellxfer.tasks.templates import letter_count_question, nth_letter_question, word_length_question

    rng = random.Random(0)
    words = [
        "cat",
        "banana",
        "strawberry",
        "instrumentalist",
        "dog",
        "polyelectrolyte",
        "techniques",
        "zebra",
    ]
    return [q for w in words for q in (nth_letter_question(rng, w, 2)[0], word_length_question(rng, w)[0],
                                       letter_count_question(rng, w, w[0])[0])][:16]


@cuda
@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_graph_replays_equal_the_static_steps_on_cuda(gpu_questions, batch_size):
    model, tok = load_model("tiny-qwen3", dtype=torch.float32, device="cuda"), load_tokenizer("tiny-qwen3")
    qs = gpu_questions
    greedy = default_sampling(decoding="greedy", max_new_tokens=10)
    graph = GenerationEngine(model, tok, greedy, batch_size=batch_size, decoder="graph")
    static = GenerationEngine(model, tok, greedy, batch_size=batch_size, decoder="static")
    eager = GenerationEngine(model, tok, greedy, batch_size=batch_size, decoder="eager")
    replies = graph.generate(qs)
    assert replies == static.generate(qs) == eager.generate(qs)
    decoder = static_decoder(model)
    assert graph.paths == {"graph": math.ceil(len(qs) / batch_size)} and decoder.captures >= 1
    assert decoder.replays >= 9 * graph.paths["graph"]


@cuda
def test_graphs_with_lora_under_autocast_follow_weight_updates(gpu_questions):
    """Validation's setting: a LoRA model under bf16 autocast. A replayed graph runs the very kernels
    of the op-by-op step (same replies), and reads the adapter weights in place, so an optimizer
    step between two validations changes what the next one generates."""
    from peft import LoraConfig, get_peft_model

    base = load_model("tiny-qwen3", dtype=torch.bfloat16, device="cuda")
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    tok = load_tokenizer("tiny-qwen3")
    qs = gpu_questions
    greedy = default_sampling(decoding="greedy", max_new_tokens=8)
    rounds = []
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            graph = GenerationEngine(lm, tok, greedy, batch_size=16, decoder="graph").generate(qs)
            static = GenerationEngine(lm, tok, greedy, batch_size=16, decoder="static").generate(qs)
        assert graph == static
        rounds.append(graph)
        with torch.no_grad():  # what an optimizer step does: the same tensors, new values
            for n, p in lm.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn_like(p))
    assert rounds[0] != rounds[1]
    assert static_decoder(lm).captures == 1  # the second round replayed the first round's graph
