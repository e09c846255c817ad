"""Model cards (``README.md``) for the adapters and merged models spellxfer writes.

A card says what the weights are and how far to trust them: the base model, the data build
(profile, seed, rows), how the LoRA was trained, the position / count results with their 95%
intervals beside the best trivial baseline (from an ``evaluate`` output, when there is one), and
the non-thinking note. Trained on spelling only; evaluated on position and count only.
"""

from __future__ import annotations

import json
from pathlib import Path

from spellxfer.tasks.names import TASKS

HUB_BASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
TRAINING_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "learning_rate",
    "batch_size",
    "accumulate_grad_batches",
    "max_steps",
    "steps_trained",
    "optimizer",
    "scheduler",
    "warmup_ratio",
    "precision",
    "backend",
    "load_in_4bit",
    "seed",
)


def _data_section(data_dir: str | None) -> list[str]:
    manifest = Path(data_dir) / "manifest.json" if data_dir else None
    if manifest is None or not manifest.is_file():
        return [
            "Spelling rows from a `spellxfer data build` (its manifest was not found beside this card's run)."
        ]
    m = json.loads(manifest.read_text(encoding="utf-8"))
    rows = m.get("rows", {})
    lines = [
        f"`spellxfer data build --profile {m.get('profile')} --seed {m.get('seed')}` "
        f"(spellxfer {m.get('spellxfer_version')}): words from {m.get('sources', {}).get('english_words')}; "
        "validation and test words never appear in training.",
        "",
        "| file | rows | by kind |",
        "|---|---:|---|",
    ]
    for name, r in rows.items():
        kinds = ", ".join(f"{k} {v:,}" for k, v in r.items() if k != "total")
        lines.append(f"| `{name}` | {r.get('total', 0):,} | {kinds} |")
    return lines


def _results_section(metrics: dict | None, source: str | None) -> list[str]:
    if not metrics:
        return [
            "Not evaluated with this card. Score it with `python -m spellxfer evaluate --adapter <this "
            "directory> …` (position and count test questions, generation and the likelihood probe)."
        ]
    run = metrics.get("run", {})
    sampling = run.get("sampling", {})
    lines = [
        f"From `{source}`: {run.get('n_items', '?')} test questions, "
        f"decoding {sampling.get('decoding')}, scoring {metrics.get('scoring', 'generation')}; "
        "accuracies with Wilson 95% intervals beside the best trivial baseline (a constant or "
        "word-derived answer; `✗` where the interval does not lie above it).",
        "",
        "| subtask | generation [95% CI] | likelihood probe [95% CI] | best trivial baseline | n |",
        "|---|---|---|---|---:|",
    ]
    for key, v in metrics.get("subtasks", {}).items():
        if key.split("/")[0] not in TASKS:
            continue
        gen = _with_interval(v) if "accuracy" in v else "—"
        lk = v.get("likelihood")
        probe = _with_interval(lk) if lk else "—"
        best = v.get("best_trivial", {})
        lines.append(
            f"| {key} | {gen} | {probe} | {best.get('accuracy', float('nan')):.3f} ({best.get('name', '?')}) "
            f"| {v.get('n', '?')} |"
        )
    return lines


def _with_interval(m: dict) -> str:
    """An accuracy with its 95% interval, and ``✗`` when the interval does not lie above the
    best trivial baseline."""
    mark = "" if m.get("beats_trivial") else " ✗"
    return f"{m['accuracy']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]{mark}"


def model_card(
    *,
    base_model: str,
    hparams: dict,
    data_dir: str | None = None,
    selection: str | None = None,
    metrics: dict | None = None,
    metrics_source: str | None = None,
    merged: bool = False,
) -> str:
    """The card's Markdown: a Hugging Face YAML header, then the sections named in the module doc."""
    hub = HUB_BASES.get(base_model, base_model)
    header = [
        "---",
        f"base_model: {json.dumps(hub)}",
        f"library_name: {'transformers' if merged else 'peft'}",
        "pipeline_tag: text-generation",
        "tags: [spellxfer, lora, spelling, character-level]",
        "---",
        "",
    ]
    what = "the base model with the LoRA adapter merged in" if merged else "a LoRA adapter (PEFT)"
    use = (
        [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(path)",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
        ]
        if merged
        else [
            "from peft import AutoPeftModelForCausalLM",
            "model = AutoPeftModelForCausalLM.from_pretrained(path)",
        ]
    )
    trained = [
        f"| {k} | {json.dumps(hparams[k]) if isinstance(hparams[k], (list, tuple)) else hparams[k]} |"
        for k in TRAINING_KEYS
        if k in hparams
    ]
    body = [
        f"# spellxfer: {hub}, fine-tuned on spelling",
        "",
        f"This directory holds {what} for `{hub}`. It was **trained on spelling only** (spell a word "
        "letter by letter, also reversed, numbered and the inverse) and is **evaluated on character position "
        'and count questions only** ("what is the 3rd letter of …", "how many r\'s are in …"): the '
        "question spellxfer asks is whether spelling practice transfers to them.",
        "",
        "## Base model",
        "",
        f"`{hub}`"
        + (f" (spellxfer's embedded `{base_model}`)" if hub != base_model else "")
        + ". Qwen3 models are "
        "used in non-thinking mode only: the chat template never opens a thinking block. Sampling defaults: "
        "temperature 0.6, top-p 0.95, top-k 20, min-p 0 (Qwen's published non-thinking recommendation is "
        "0.7 / 0.8 / 20 / 0); greedy decoding is the other scored setting.",
        "",
        "## Training data",
        "",
        *_data_section(data_dir),
        "",
        "## Training",
        "",
        "LoRA fine-tuning with spellxfer's Lightning `fit` (completion-only loss on the spelling "
        "answer)." + (f" {selection}" if selection else ""),
        "",
        "| setting | value |",
        "|---|---|",
        *trained,
        "",
        "## Results (position and count only)",
        "",
        *_results_section(metrics, metrics_source),
        "",
        "## Use",
        "",
        "```python",
        *use,
        "```",
        "",
        "## Limitations",
        "",
        "Results hold for this base model and this data only: a result on SmolLM2-135M is not a result on "
        "Qwen3-4B. Accuracies below the best trivial baseline measure an answer habit, not knowledge.",
    ]
    return "\n".join(header + body) + "\n"


def write_card(directory: Path, **kwargs) -> Path:
    """Write (or replace) ``directory/README.md`` with :func:`model_card`."""
    path = Path(directory) / "README.md"
    path.write_text(model_card(**kwargs), encoding="utf-8")
    return path
