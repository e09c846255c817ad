"""``python -m spellxfer export`` on a real checkpoint from a short tiny-qwen3 ``fit``.

What an export promises: ``OUT/adapter`` is a PEFT adapter; ``OUT/merged`` loads with plain
transformers (no PEFT) and gives the logits of base + adapter; its chat template is non-thinking
by default and its ``generation_config.json`` carries the configured sampling defaults; a bad
checkpoint is one ``error:`` line and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from spellxfer.models.generation import default_sampling
from spellxfer.tasks.chat import GENERATION_PROMPT_SUFFIX


def spellxfer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spellxfer", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, demo_data):
    """A real checkpoint: 10 LoRA steps of configs/tiny.yaml (lr 1e-3, so B is far from its zero init)."""
    root = tmp_path_factory.mktemp("fit")
    p = spellxfer("fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(root),
                  "--data.data_dir", str(demo_data), "--trainer.max_steps", "10")
    assert p.returncode == 0, p.stderr
    return root / "last.ckpt"


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    p = spellxfer("export", "--ckpt", str(ckpt), "--out", str(out), "--merge", "--dtype", "fp32")
    assert p.returncode == 0, p.stderr
    return out


def test_export_writes_adapter_merged_model_and_provenance(exported, ckpt):
    assert {p.name for p in exported.iterdir()} == {"adapter", "merged", "export.json"}
    assert (exported / "adapter" / "adapter_config.json").is_file()
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()
    assert (exported / "merged" / "model.safetensors").is_file()
    assert not list((exported / "merged").glob("adapter_*"))  # merged: no PEFT files
    info = json.loads((exported / "export.json").read_text())
    assert info["checkpoint"] == str(ckpt.resolve()) and info["base_model"] == "tiny-qwen3"
    assert info["merged"] is True and info["dtype"] == "fp32"


def test_merged_model_matches_base_plus_adapter_logits(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from spellxfer.models.registry import load_model, load_tokenizer

    tok = load_tokenizer("tiny-qwen3")
    ids = tok(["What is the 3rd letter of the word 'strawberry'?"], return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(exported / "merged").eval()
    base = load_model("tiny-qwen3")
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, exported / "adapter").eval()
        expected = adapted(ids).logits
        actual = merged(ids).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_merged_tokenizer_is_non_thinking_and_generation_config_has_the_sampling_defaults(exported):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(exported / "merged")
    messages = [{"role": "user", "content": "How many r's are in 'strawberry'?"}]
    # No kwargs: whatever a server renders by default must be the non-thinking prompt.
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(GENERATION_PROMPT_SUFFIX)

    gc = GenerationConfig.from_pretrained(exported / "merged")
    s = default_sampling()
    assert (gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.min_p) == (
        True,
        s.temperature,
        s.top_p,
        s.top_k,
        s.min_p,
    )
    assert gc.temperature == 0.6 and gc.top_p == 0.95 and gc.top_k == 20
    assert tok.convert_tokens_to_ids("<|im_end|>") in gc.eos_token_id


def test_bf16_export_stores_bf16_weights(ckpt, tmp_path):
    from safetensors import safe_open

    p = spellxfer("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "bf16"), "--merge")
    assert p.returncode == 0, p.stderr
    with safe_open(tmp_path / "bf16" / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_a_file_that_is_not_a_checkpoint_is_one_error_line_and_nothing_written(tmp_path):
    bogus = tmp_path / "model.ckpt"
    bogus.write_text("not a checkpoint")
    for ckpt in (bogus, tmp_path / "missing.ckpt"):
        p = spellxfer("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"))
        assert p.returncode == 2 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1, p.stderr
        assert str(ckpt) in p.stderr
    assert not (tmp_path / "out").exists()


def test_model_cards_carry_base_data_training_and_the_evaluated_results(ckpt, demo_data, tmp_path):
    """The fit's best_adapter/, the exported adapter and the merged model each get a real card
    (not PEFT's empty template); with --eval, the position / count results with intervals."""
    fit_card = (ckpt.parent / "best_adapter" / "README.md").read_text()
    assert "base_model:" in fit_card and "library_name: peft" in fit_card
    assert "trained on spelling only" in fit_card and "position and count questions only" in fit_card
    assert "`spelling_train.jsonl`" in fit_card and "| lora_r | 4 |" in fit_card and "best-step" in fit_card
    assert (
        "| max_steps | 10 |" in fit_card
        and "| steps_trained | 10 |" in fit_card
        and "| batch_size |" in fit_card
    )
    assert "non-thinking" in fit_card and "Not evaluated" in fit_card

    ev = tmp_path / "eval"
    p = spellxfer(
        "evaluate",
        "--model",
        "tiny-qwen3",
        "--adapter",
        str(ckpt.parent / "best_adapter"),
        "--questions",
        str(demo_data / "position_test.jsonl"),
        str(demo_data / "count_test.jsonl"),
        "--limit",
        "8",
        "--decoding",
        "greedy",
        "--out",
        str(ev),
    )
    assert p.returncode == 0, p.stderr
    out = tmp_path / "export"
    p = spellxfer(
        "export", "--ckpt", str(ckpt), "--out", str(out), "--merge", "--dtype", "fp32", "--eval", str(ev)
    )
    assert p.returncode == 0, p.stderr
    metrics = json.loads((ev / "metrics.json").read_text())
    for kind, library in (("adapter", "peft"), ("merged", "transformers")):
        card = (out / kind / "README.md").read_text()
        assert f"library_name: {library}" in card and "trained on spelling only" in card
        for key, v in metrics["subtasks"].items():  # every subtask's accuracy with its interval and baseline
            row = next(line for line in card.splitlines() if line.startswith(f"| {key} |"))
            assert f"{v['accuracy']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" in row
            assert f"{v['best_trivial']['accuracy']:.3f}" in row
        assert "spell" not in " ".join(metrics["subtasks"])  # only position and count results


def test_export_eval_that_is_not_an_evaluate_output_is_one_error_line(ckpt, tmp_path):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "metrics.json").write_text("{}")
    p = spellxfer("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--eval", str(tmp_path / "ev"))
    assert (
        p.returncode == 2
        and p.stderr.strip().startswith("error:")
        and len(p.stderr.strip().splitlines()) == 1
    )
    assert "metrics.json" in p.stderr and not (tmp_path / "x").exists()
