"""``spellxfer bench eval``: questions per second of the generation engine, beside ``generate``.

Both variants run :class:`~spellxfer.evaluation.generation.GenerationEngine` on the same
position and count questions (the data build's test files, interleaved), with the same sampling
settings (the user's defaults unless ``--decoding greedy``) and the same reply cap:

* ``reference`` — ``reference=True``: transformers' ``model.generate``, batch ``reference_batch_size``;
* ``spellxfer`` — the engine's own decode loop (top-k before top-p, last-position logits only,
  a host sync every few steps), batch ``batch_size``.

A variant may carry ``:batch_size=N``. Random-weight models never end a turn, so every reply
runs to ``max_new_tokens`` (12 by default: a letter or number, the end-of-turn token, and room
for a short sentence) — the work a trained model does at most. MFU counts ``2 × N_body`` FLOPs
per prompt and generated token plus ``2 × vocab × hidden`` per generated token.
"""

from __future__ import annotations

import functools
import gc
import json
import time
from pathlib import Path

import torch

from spellxfer.errors import SpellxferError
from spellxfer.training.speed import (
    H100_BF16_PEAK,
    _device_name,
    _print_table,
    _sync,
    flops_per_token,
    matmul_rate,
    profile_table,
)


def _variant(spec: str) -> tuple[str, int | None]:
    name, _, rest = spec.partition(":")
    key, _, value = rest.partition("=")
    if name not in ("reference", "spellxfer") or (rest and (key != "batch_size" or not value.isdigit())):
        raise SpellxferError(f"--variants: {spec!r} is not reference or spellxfer, optionally :batch_size=N")
    return name, int(value) if rest else None


def bench_eval(
    model: str = "tiny-qwen3",
    data_dir: str = "results/data/full",
    variants: list[str] = ["reference", "spellxfer"],  # noqa: B006  (jsonargparse needs a literal default)
    n_questions: int = 2048,
    batch_size: int = 1024,
    reference_batch_size: int = 256,
    max_new_tokens: int = 12,
    decoding: str = "sampled",
    profile: bool = False,
    out: str | None = None,
) -> int:
    """Evaluation throughput: transformers' generate beside spellxfer's decode loop, one card, one run.

    Prints questions/s, generated tokens/s, MFU, peak GPU memory and each variant's ratio to the
    first; writes JSON (default results/bench/eval-<model>.json). Position and count questions only.

    Args:
        model: qwen3-4b-shape on a GPU, tiny-qwen3 or smollm2-135m on a CPU.
        data_dir: A ``data build`` directory (its position_test / count_test files; built with
            ``--profile full`` if absent).
        variants: ``reference`` / ``spellxfer``, optionally ``:batch_size=N``.
        n_questions: Questions per variant (position and count alternating).
        batch_size: Prompts per batch for spellxfer variants.
        reference_batch_size: Prompts per batch for the reference.
        max_new_tokens: Reply cap in tokens.
        decoding: sampled (T 0.6, top-p 0.95, top-k 20, min-p 0) or greedy.
        profile: Also profile one batch of each variant and print its costliest operations.
        out: JSON output path.
    """
    from spellxfer.data.build import build
    from spellxfer.evaluation.generation import GenerationEngine, default_sampling
    from spellxfer.models.registry import check_model_name
    from spellxfer.outputs import atomic_file, git_commit, package_versions
    from spellxfer.training.qwen3_utils import format_prompt

    check_model_name(model)
    specs = [(v, *_variant(v)) for v in variants]
    if n_questions < 1 or batch_size < 1 or reference_batch_size < 1 or max_new_tokens < 1:
        raise SpellxferError("bench eval: --n_questions, --batch_size, --reference_batch_size, --max_new_tokens must be ≥ 1")
    sampling = default_sampling(decoding=decoding, max_new_tokens=max_new_tokens)
    data = Path(data_dir)
    if not (data / "position_test.jsonl").is_file():
        build(str(data), profile="full", seed=0)
    rows = [[json.loads(line) for line in open(data / f"{t}_test.jsonl", encoding="utf-8")] for t in ("position", "count")]
    qs = [r["question"] for pair in zip(*rows) for r in pair][:n_questions]
    if len(qs) < n_questions:
        raise SpellxferError(f"bench eval: {data} holds only {len(qs)} questions; lower --n_questions")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from spellxfer.models.registry import apply_fused_kernels, load_model, load_tokenizer

    # Plain weights first: the reference runs unpatched; spellxfer variants get the fused kernels
    # `evaluate` applies (Liger patches classes for good, so list the reference first).
    lm = load_model(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=str(device))
    tok = load_tokenizer(model)
    kernels = "none"
    prompt_tokens = sum(len(ids) for ids in tok([format_prompt(tok, q) for q in qs], add_special_tokens=False)["input_ids"])
    rate = matmul_rate(device)
    cfg = lm.config
    body = flops_per_token(cfg, 0.0) / 2  # 2 × N_body: forward only
    results = []
    for spec, name, bs in specs:
        bs = bs or (reference_batch_size if name == "reference" else batch_size)
        if name == "spellxfer" and kernels == "none":
            kernels = apply_fused_kernels(lm)
        engine = GenerationEngine(lm, tok, sampling, batch_size=bs, reference=name == "reference")
        engine.generate(qs[: min(bs, 64)])  # warm-up: CUDA context, kernels, allocator
        engine.new_tokens = 0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"bench eval: {spec} …", flush=True)
        _sync(device)
        t0 = time.perf_counter()
        engine.generate(qs)
        _sync(device)
        seconds = time.perf_counter() - t0
        # again, split into phases (each boundary syncs the GPU, so only the split is reported)
        new_tokens, engine.new_tokens, engine.timings = engine.new_tokens, 0, {}
        engine.generate(qs[:bs])
        phases = {k: round(v, 4) for k, v in engine.timings.items()}
        engine.timings = None
        if profile:
            table = profile_table(functools.partial(engine.generate, qs[:bs]))
            print(f"--- profile of one batch of {spec}\n{table}", flush=True)
        engine.new_tokens = new_tokens
        useful = body * (prompt_tokens + new_tokens) + 2 * cfg.vocab_size * cfg.hidden_size * new_tokens
        results.append({
            "variant": spec, "batch_size": bs, "questions": len(qs), "seconds": seconds,
            "questions_per_second": len(qs) / seconds, "new_tokens": engine.new_tokens,
            "new_tokens_per_second": engine.new_tokens / seconds, "prompt_tokens": prompt_tokens,
            "mfu_vs_matmul": useful / seconds / rate,
            "mfu_vs_peak": useful / seconds / H100_BF16_PEAK if device.type == "cuda" else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "one_batch_phases_seconds": phases, "kernels": kernels,
        })  # fmt: skip
    base = results[0]["questions_per_second"]
    for r in results:
        r["ratio_to_first"] = r["questions_per_second"] / base
    report = {"kind": "eval", "model": model, "device": _device_name(device), "date": time.strftime("%Y-%m-%d"),
              "sampling": vars(sampling), "matmul_flops_per_second": rate, "results": results,
              "versions": package_versions(), "git_commit": git_commit()}  # fmt: skip
    _print_table(report, "questions/s", "questions_per_second")
    out_path = Path(out or f"results/bench/eval-{model}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {out_path}")
    return 0
