"""``python -m spellxfer export``: a training checkpoint → a PEFT adapter, and optionally a merged model.

Lifecycle: read the checkpoint's hyper-parameters (it holds only the LoRA weights; the frozen base
comes from ``model``) → rebuild the LoRA module on the CPU in fp32 → load the LoRA weights →
write ``OUT/adapter/`` (PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``) → with
``--merge``, fold the adapter into the base weights (in fp32, then cast to ``--dtype``) and write
``OUT/merged/``: safetensors weights, the tokenizer, and

- a chat template that is non-thinking by default: for Qwen3 it is spellxfer's own template, which
  always renders the empty think block (``enable_thinking`` has nothing to switch). A merged
  Qwen3 saved with the hub template would start thinking again in any server that renders
  the template's default — the trap this avoids;
- ``generation_config.json`` with the configured sampling defaults (T 0.6, top-p 0.95, top-k 20,
  min-p 0: the ``Sampling`` defaults of :mod:`spellxfer.models.generation`) and the end-of-turn
  stop tokens, so plain ``model.generate`` and other servers sample the way spellxfer does.

``OUT/export.json`` records where it came from. Everything is written into a hidden sibling and
renamed into place at the end: an interrupted export leaves nothing behind.

GGUF (llama.cpp, Ollama, LM Studio): convert ``OUT/merged`` with llama.cpp's own converter —
``python convert_hf_to_gguf.py OUT/merged --outtype bf16`` from a llama.cpp checkout, then
``llama-quantize`` for Q4_K_M etc. See docs/lightning_deployment.md; there is no maintained PyPI
package that does the conversion, so spellxfer does not wrap it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import (
    atomic_output_dir,
    check_output_dir,
    git_commit,
    package_versions,
    read_json,
    write_json,
)
from spellxfer.models.generation import default_sampling
from spellxfer.models.registry import check_lora_layout, check_lora_state, write_loadable_base
from spellxfer.tasks.chat import NON_THINKING_TEMPLATE, end_of_turn_ids, is_qwen3
from spellxfer.training.cards import write_card
from spellxfer.training.checkpointing import load_fit_checkpoint
from spellxfer.training.module import SpellingLoRAModule

DEFAULT_ROOT = Path("results/deployment/models")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export(
    ckpt: str,
    out: str | None = None,
    merge: bool = False,
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    eval: str | None = None,
    overwrite: bool = False,
) -> int:
    """Export a fine-tuned checkpoint for serving: a PEFT adapter, and with --merge a merged model.

    Writes OUT/adapter (PEFT directory), with --merge OUT/merged (safetensors, tokenizer with a
    non-thinking chat template, generation_config.json with the configured sampling defaults),
    and OUT/export.json (provenance).

    Args:
        ckpt: A checkpoint written by ``fit`` (e.g. checkpoints/<run>/best-step20.ckpt).
        out: Output directory (default results/deployment/models/<run>-<checkpoint name>).
        merge: Also write the base model with the adapter folded in (no PEFT needed to load it).
        dtype: Weight dtype of the merged model: bf16 (GPUs), fp16 or fp32 (CPUs, exact).
        eval: An ``evaluate`` output directory of this checkpoint's adapter (its metrics.json): the
            model cards then carry its position / count results with intervals and baselines.
        overwrite: Replace a non-empty output directory.
    """
    ckpt_path = Path(ckpt)
    out_dir = Path(out) if out else DEFAULT_ROOT / f"{ckpt_path.parent.name}-{ckpt_path.stem}"
    check_output_dir(out_dir, overwrite)
    state, hparams = read_checkpoint(ckpt_path)
    metrics = read_json(Path(eval) / "metrics.json") if eval is not None else None
    if metrics is not None and not isinstance(metrics.get("subtasks"), dict):
        raise SpellxferError(f"--eval {eval}: metrics.json has no 'subtasks' (not written by `evaluate`?)")

    console = Console(stderr=True)
    with console.status(f"exporting {ckpt_path} ({hparams['model']} + LoRA r={hparams.get('lora_r')})"):
        module = _lora_module(hparams, state, ckpt_path)
        with atomic_output_dir(out_dir, overwrite) as tmp:
            module.lm.save_pretrained(tmp / "adapter")
            write_loadable_base(tmp / "adapter", hparams["model"], hparams.get("seed", 0))
            card = {"base_model": hparams["model"], "hparams": hparams, "data_dir": _data_dir(ckpt_path),
                    "selection": f"Exported from `{ckpt_path.name}`.", "metrics": metrics,
                    "metrics_source": str(Path(eval) / "metrics.json") if eval is not None else None}
            write_card(tmp / "adapter", **card)
            if merge:
                save_merged(module.lm, module.tokenizer, tmp / "merged", DTYPES[dtype])
                write_card(tmp / "merged", **card, merged=True)
            write_json(tmp / "export.json", {
                "checkpoint": str(ckpt_path.resolve()),
                "base_model": hparams["model"],
                "hyperparameters": hparams,
                "merged": merge,
                "dtype": dtype if merge else None,
                "sampling": asdict(default_sampling()),
                "policy": "trained on spelling only; evaluated on position and count only; "
                          "Qwen3 non-thinking",
                "git_commit": git_commit(),
                "versions": package_versions(),
            })
    merged_line = f"\nmerged model → {out_dir / 'merged'}" if merge else ""
    console.print(f"adapter → {out_dir / 'adapter'}{merged_line}")
    return 0


def _data_dir(ckpt_path: Path) -> str | None:
    """The data directory of the run that wrote the checkpoint (its manifest.json), if recorded."""
    manifest = ckpt_path.parent / "manifest.json"
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("data_dir")
    except (OSError, ValueError, AttributeError):
        return None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA weights and the module's hyper-parameters of a ``fit`` checkpoint (read with
    ``weights_only=True``: a file that is not one is a one-line error naming it)."""
    ckpt = load_fit_checkpoint(path)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    if not isinstance(hparams.get("model"), str):
        raise SpellxferError(f"checkpoint {path}: hyper_parameters name no model (not written by `fit`?)")
    check_lora_layout(ckpt["state_dict"], hparams.get("lora_r"), hparams.get("target_modules") or (),
                      f"checkpoint {path}")
    return ckpt["state_dict"], hparams


def _lora_module(hparams: dict, state: dict[str, torch.Tensor], path: Path):
    """The LoRA module rebuilt from the checkpoint: transformers + PEFT, CPU, fp32 (exact merge).

    The checkpoint must hold every LoRA tensor its own hyper-parameters call for, in their shapes:
    a partial one would export an adapter that is partly untrained."""
    # Quantised or Unsloth training still exports through plain PEFT: the adapter is the same.
    try:
        module = SpellingLoRAModule(**{**hparams, "backend": "hf", "load_in_4bit": False})
    except TypeError as e:  # hyper-parameters this module does not take
        raise SpellxferError(
            f"checkpoint {path}: hyper_parameters do not fit spellxfer's module ({e})"
        ) from None
    except SpellxferError as e:
        raise SpellxferError(f"checkpoint {path}: hyper_parameters: {e}") from None
    module.configure_model()
    check_lora_state(state, module.trainable_state_dict(), f"checkpoint {path}")
    module.load_state_dict(state, strict=False)
    return module.eval()


def save_merged(peft_model, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """Fold the adapter into the base weights and save model, tokenizer and generation defaults."""
    merged = peft_model.merge_and_unload().to(dtype)
    s = default_sampling()
    gc = merged.generation_config
    gc.do_sample = s.decoding == "sampled"
    gc.temperature, gc.top_p, gc.top_k, gc.min_p = s.temperature, s.top_p, s.top_k, s.min_p
    gc.max_new_tokens = s.max_new_tokens
    gc.eos_token_id = end_of_turn_ids(tokenizer)
    gc.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out, safe_serialization=True)
    if is_qwen3(tokenizer):
        tokenizer.chat_template = NON_THINKING_TEMPLATE
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
