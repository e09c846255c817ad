"""Model names: what each one loads, checked on the real objects.

``tiny-qwen3`` and a saved local directory are built and run here; ``qwen3-4b-shape`` is only
materialised on the ``meta`` device (4B parameters would take 16 GB of CPU memory); ``smollm2-135m``
is the real pretrained model, converted once from the embedded GGUF into the shared cache.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from spellxfer.core.errors import SpellxferError
from spellxfer.models.registry import (
    EMBEDDED,
    QWEN3_4B_SHAPE,
    TINY_QWEN3,
    _is_converted,
    _smollm2_dir,
    check_model_name,
    load_model,
    load_tokenizer,
)
from spellxfer.tasks.chat import end_of_turn_ids, format_prompt, is_qwen3


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*EMBEDDED, "Qwen/Qwen3-4B", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_embedded_names_and_hub_ids_are_accepted(name):
    check_model_name(name)


def test_an_existing_directory_is_accepted(tmp_path):
    check_model_name(str(tmp_path))
    check_model_name(str(tmp_path / ".."))


@pytest.mark.parametrize("name", ["nonsense", "a/b/c", "Qwen/", "/Qwen3-4B", ""])
def test_other_names_are_refused_with_the_valid_ones(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so no relative name happens to exist
    with pytest.raises(SpellxferError) as e:
        check_model_name(name)
    msg = str(e.value)
    assert f"unknown model {name!r}" in msg
    assert all(n in msg for n in EMBEDDED) and "Qwen/Qwen3-4B" in msg and "local directory" in msg


def test_names_are_checked_before_anything_loads(monkeypatch):
    # The error comes from the name alone, not from a failed download or a missing file.
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("tried to load")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    for load in (load_tokenizer, load_model):
        with pytest.raises(SpellxferError, match="unknown model 'a/b/c'"):
            load("a/b/c")


# --- tiny-qwen3 --------------------------------------------------------------------------------


def test_tiny_qwen3_is_a_small_qwen3_with_the_real_vocabulary():
    model = load_model("tiny-qwen3")
    assert type(model) is Qwen3ForCausalLM and not model.training
    assert model.config.vocab_size == 151_936
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert 1_000_000 < n_params(model) < 10_000_000  # 151,936 × 32 embedding ≈ 4.9M of it
    assert model.generation_config.pad_token_id == 151_643


def test_tiny_qwen3_weights_depend_only_on_the_seed():
    rng = torch.random.get_rng_state()
    a, b, c = (load_model("tiny-qwen3", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random stream is untouched


def test_tiny_qwen3_runs_on_a_tokenized_prompt():
    model, tok = load_model("tiny-qwen3"), load_tokenizer("tiny-qwen3")
    assert is_qwen3(tok) and tok.padding_side == "left"
    enc = tok(
        format_prompt(tok, "How many r's are in 'strawberry'?"), return_tensors="pt", add_special_tokens=False
    )
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, n, 151_936) and torch.isfinite(logits).all()


def test_dtype_is_applied():
    model = load_model("tiny-qwen3", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- qwen3-4b-shape ----------------------------------------------------------------------------


def test_qwen3_4b_shape_is_qwen3_4bs_configuration():
    cfg = Qwen3Config(**QWEN3_4B_SHAPE)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (2560, 36, 9728)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert cfg.vocab_size == 151_936 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == 1_000_000.0
    assert (cfg.bos_token_id, cfg.eos_token_id) == (151_643, 151_645)
    # tiny-qwen3 is the same family: only the sizes differ.
    changed = {k for k in QWEN3_4B_SHAPE if TINY_QWEN3[k] != QWEN3_4B_SHAPE[k]}
    assert changed == {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings"}


def test_qwen3_4b_shape_has_4_02b_parameters():
    model = load_model("qwen3-4b-shape", dtype=torch.bfloat16, device="meta")  # shapes only, no memory
    assert type(model) is Qwen3ForCausalLM and model.device.type == "meta"
    n = n_params(model)
    # The same count by hand, per layer: q (2560→32×128), k and v (2560→8×128), o (32×128→2560),
    # q/k norms (128 each), gate and up (2560→9728), down (9728→2560), two RMSNorms (2560 each).
    h, i, d, layers, vocab = 2560, 9728, 128, 36, 151_936
    per_layer = h * 32 * d + 2 * h * 8 * d + 32 * d * h + 2 * d + 3 * h * i + 2 * h
    assert n == vocab * h + layers * per_layer + h  # + the final norm; lm_head is the embedding
    assert 4.0e9 < n < 4.1e9


# --- smollm2-135m ------------------------------------------------------------------------------


def test_smollm2_is_converted_once_to_plain_safetensors(smollm2):
    d = _smollm2_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    assert not list(d.glob("*.gguf"))
    config = json.loads((d / "config.json").read_text())
    assert config.get("quantization_config") is None  # dequantised: not a GGUF checkpoint any more
    model, _ = smollm2
    assert getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_smollm2_is_a_135m_llama(smollm2):
    model, _ = smollm2
    assert type(model) is LlamaForCausalLM and not model.training
    assert 130e6 < n_params(model) < 140e6
    assert model.config.vocab_size == 49_152 and model.config.tie_word_embeddings


def test_smollm2_tokenizer_ends_turns_with_im_end_and_pads_on_the_left(smollm2):
    model, tok = smollm2
    assert tok.padding_side == "left" and tok.pad_token is not None
    # The GGUF says eos = pad = <|im_end|> (id 2); transformers' GGUF converter wrote <|im_start|>.
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", model.config.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert end_of_turn_ids(tok) == [2]
    batch = tok(["Hi", "Hello there, how are you?"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == tok.pad_token_id


def test_a_cached_conversion_with_the_converters_wrong_eos_is_redone(tmp_path, smollm2):
    # Caches written before the eos fix hold eos <|im_start|> (id 1); they must not be reused.
    d = _smollm2_dir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).symlink_to(d / f)
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert _is_converted(tmp_path)
    stale = tok_config | {"eos_token": "<|im_start|>", "eos_token_id": 1}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(stale))
    assert not _is_converted(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert not _is_converted(tmp_path)  # an interrupted conversion is redone too


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tok = smollm2
    enc = tok(
        format_prompt(tok, "What is the capital of France?"), return_tensors="pt", add_special_tokens=False
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=end_of_turn_ids(tok),
                             pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply  # real pretrained weights, not a random init


# --- a local directory -------------------------------------------------------------------------


def test_a_saved_directory_loads_back_to_the_same_logits(tmp_path):
    model, tok = load_model("tiny-qwen3", seed=3), load_tokenizer("tiny-qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    check_model_name(str(tmp_path))
    loaded, loaded_tok = load_model(str(tmp_path)), load_tokenizer(str(tmp_path))
    assert type(loaded) is Qwen3ForCausalLM and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert is_qwen3(loaded_tok) and loaded_tok.padding_side == "left"
    prompts = [
        format_prompt(tok, "Spell 'cat'."),
        format_prompt(loaded_tok, "How many r's are in 'strawberry'?"),
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(
        loaded_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"],
        enc["input_ids"],
    )
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, model(**enc).logits)


def test_random_weight_models_are_built_in_the_asked_dtype_not_cast_from_float32(monkeypatch):
    # qwen3-4b-shape built in float32 and then cast needed 16 GB on the card at once, and a pack's
    # scoring process (13 GiB share on an H100) failed every trial on it; each layer's weights must
    # come into being in bf16, and the default dtype must be float32 again afterwards
    created = []
    init = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: (created.append(self.weight.dtype),
                                                                           init(self))[1])
    model = load_model("tiny-qwen3", dtype=torch.bfloat16)
    assert created and set(created) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    created.clear()
    assert {p.dtype for p in load_model("tiny-qwen3").parameters()} == {torch.float32}
    assert set(created) == {torch.float32}
