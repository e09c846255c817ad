"""``python -m spellxfer evaluate``: position / count accuracy with 95% intervals, by generation
and by the likelihood probe, beside trivial baselines and answer diagnostics.

Lifecycle: validate inputs (question files, output dir, model name, few-shot pool) → load model
(+ adapter) → generate replies with the shared engine → parse and score every reply → rank the
candidate answers with the likelihood probe (:mod:`~spellxfer.evaluation.likelihood`) →
aggregate with the same torchmetrics metric Lightning validation uses → intervals, trivial
baselines (:mod:`~spellxfer.evaluation.baselines`), diagnostics
(:mod:`~spellxfer.evaluation.diagnostics`) and breakdowns → write ``predictions.jsonl`` and
``metrics.json`` atomically → summary table (→ optional paired comparison against another run).

Evaluation is position and count only; the model was (at most) trained on spelling.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel, get_peft_model_state_dict
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import (
    atomic_output_dir,
    check_output_dir,
    package_versions,
    read_json,
    snippet,
    write_json,
    write_jsonl,
)
from spellxfer.core.tables import print_table
from spellxfer.evaluation import fewshot
from spellxfer.evaluation.baselines import baseline_fields, beats
from spellxfer.evaluation.compare import (
    compare_predictions,
    comparison_markdown,
    print_comparison,
    read_predictions,
)
from spellxfer.evaluation.diagnostics import answer_diagnostics
from spellxfer.evaluation.likelihood import ProbeResult, probe_items, probe_summary, too_large_answer
from spellxfer.evaluation.metrics import TransferAccuracy
from spellxfer.evaluation.stats import accuracy_summary
from spellxfer.models.generation import (
    GenerationEngine,
    apply_memory_fraction,
    default_sampling,
    timed_generate,
)
from spellxfer.models.registry import (
    EMBEDDED,
    apply_fused_kernels,
    check_model_name,
    load_model,
    load_tokenizer,
)
from spellxfer.models.static_decode import release_static_decoder
from spellxfer.tasks.buckets import length_bucket, token_bucket
from spellxfer.tasks.chat import format_chat
from spellxfer.tasks.names import TASKS
from spellxfer.tasks.parsing import score
from spellxfer.tasks.questions import Item, load_questions

console = Console()
MAX_SEED = 2**32 - 1  # the engine derives per-batch torch seeds from it; this keeps them in range
Scoring = Literal["generation", "likelihood", "both"]


def evaluate(
    model: str,
    questions: list[str],
    out: str,
    adapter: str | None = None,
    limit: int | None = None,
    decoding: Literal["sampled", "greedy"] | None = None,
    samples: int | None = None,
    batch_size: int | None = None,
    task: Literal["position", "count"] | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    seed: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    device: str = "auto",
    compare_to: str | None = None,
    overwrite: bool = False,
    scoring: Scoring | None = None,
    shots: int = 0,
    shot_pool: str | None = None,
) -> int:
    """Score a model on position / count questions by generation and answer parsing, and by the
    likelihood probe (which answer the model finds most likely in a fixed answer frame).

    Writes DIR/predictions.jsonl (one row per item and sample, with the prompt, the raw reply and
    the probe's answer) and DIR/metrics.json (accuracies with 95% intervals, per subtask, per
    file, breakdowns, trivial baselines, answer diagnostics). The project's sampling defaults are
    defined once, by ``Sampling`` (spellxfer/models/generation.py): T 0.6, top-p 0.95, top-k 20, min-p 0;
    Qwen's non-thinking recommendation 0.7 / 0.8 / 20 / 0 is ``--temperature 0.7 --top_p 0.8``.

    Args:
        model: smollm2-135m, tiny-qwen3, qwen3-4b-shape, a hub id or a local model directory.
        questions: JSONL / CSV / TSV question files (ours, or any with question and answer columns).
        out: Output directory (must be empty or absent unless --overwrite true).
        adapter: A PEFT LoRA adapter directory to apply on top of the model.
        limit: Use at most this many items from each file.
        decoding: ``sampled`` (the configured defaults) or ``greedy``.
        samples: Replies per question (K); K > 1 gives item-level bootstrap intervals.
        batch_size: Prompts per generation batch (and per likelihood-probe batch); default: sized
            from free GPU memory (at most 2,048 for generation, 512 for the probe,
            docs/performance.md), 32 on a CPU. The size used is recorded in metrics.json; pass it
            to repeat a sampled run exactly (each batch has its own seed).
        task: Task for files without a task column (position or count).
        question_field: Name of the question column in the files.
        answer_field: Name of the answer column in the files.
        seed: Sampling seed (same seed, inputs and batch size → same replies).
        max_new_tokens: Cap on reply length in tokens.
        temperature: Override the configured temperature.
        top_p: Override the configured top-p.
        top_k: Override the configured top-k.
        min_p: Override the configured min-p.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda[:N]``.
        compare_to: Another evaluate output directory; writes DIR/compare.json and DIR/compare.md
            with paired differences (this run − that run).
        overwrite: Replace a non-empty output directory.
        scoring: ``generation`` (parse generated replies), ``likelihood`` (the probe only) or
            ``both``. Default: both, or generation alone when an integer answer is above the
            probe's limit (1,000; it scores every integer up to the answer).
        shots: Solved examples of the same subtask put before each question as earlier chat
            turns (0 to 16; default 0, zero-shot).
        shot_pool: The few-shot examples' question file; default: fewshot_pool.jsonl beside the
            first question file (``data build`` writes it, disjoint from every split).
    """
    t_start = time.perf_counter()
    # Everything a user can get wrong is checked before the model loads.
    check_output_dir(out, overwrite)
    items = load_questions(questions, task=task, question_field=question_field, answer_field=answer_field,
                           limit=limit)
    sampling = default_sampling(decoding=decoding, samples=samples, seed=seed, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    if not 0 <= sampling.seed <= MAX_SEED:
        raise SpellxferError(f"--seed must be an integer from 0 to {MAX_SEED}, got {sampling.seed}")
    check_model_name(model)
    if adapter is not None:
        check_adapter_dir(Path(adapter))
    if compare_to is not None:
        read_predictions(Path(compare_to))  # fail now, not after an hour of generation
    if batch_size is not None and batch_size < 1:
        raise SpellxferError(f"--batch_size must be ≥ 1, got {batch_size}")
    scoring = resolve_scoring(scoring, items)
    pool, pool_path = None, None
    if shots:
        pool_path = fewshot.resolve_pool(shot_pool, list(questions))
        pool = fewshot.load_pool(pool_path, items, shots)
    elif shot_pool is not None:
        raise SpellxferError("--shot_pool is only read with --shots K (K ≥ 1)")
    conversations = [fewshot.conversation(it, pool, shots) for it in items]
    device = resolve_device(device)

    t_load = time.perf_counter()
    with loaded_for_generation(model, adapter, device) as (lm, tokenizer, kept_base):
        load_seconds = time.perf_counter() - t_load
        replies, seconds, engine = None, 0.0, None
        if scoring != "likelihood":
            engine = GenerationEngine(lm, tokenizer, sampling, batch_size=batch_size or "auto")
            replies, seconds = timed_generate(engine, [it.question for it in items],
                                              label=f"evaluating {model}", conversations=conversations)
        probe, probe_prompts, probe_seconds, scorer = None, None, 0.0, None
        if scoring != "generation":
            probe, probe_prompts, probe_seconds, scorer = probe_items(lm, tokenizer, items, conversations,
                                                                      batch_size=batch_size or "auto",
                                                                      label=f"probing {model}")

        prompts = [format_chat(tokenizer, c) for c in conversations]
        predictions = list(score_items(items, replies, prompts, probe, probe_prompts))
        metrics = summarise(items, predictions, probe)
        metrics["scoring"] = scoring
        metrics["run"] = {
            "model": model,
            "adapter": adapter,
            "scoring": scoring,
            "shots": shots,
            "shot_pool": pool_path,
            "sampling": sampling.record(),
            "batch_size": engine.last_batch_size if engine else None,
            "decoder": engine.resolve_path(next(lm.parameters()).device) if engine else None,
            "questions": list(questions),
            "limit": limit,
            "n_items": len(items),
            "seconds": round(seconds, 2),
            "items_per_second": round(len(items) / seconds, 2) if seconds else None,
            # where a run's time goes beside generation (the probe's is under "likelihood"): the
            # tokenizer and model (adapter included), and the whole call up to writing its files
            "load_seconds": round(load_seconds, 2),
            "kept_base_model": kept_base,  # the base came loaded from an earlier call (keeping_base_models)
            "likelihood": {
                "path": scorer.path,
                "batch_size": scorer.last_batch_size,
                "seconds": round(probe_seconds, 2),
                "items_per_second": round(len(items) / probe_seconds, 2) if probe_seconds else None,
            } if scorer else None,
            "device": str(next(lm.parameters()).device),
            "versions": package_versions(),
            "policy": "trained on spelling only; evaluated on position and count only",
        }
    comparison = None
    if compare_to is not None:
        comparison = compare_predictions(read_predictions(Path(compare_to)), predictions,
                                         base_name=str(compare_to), other_name=str(out))
    metrics["run"]["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    with atomic_output_dir(out, overwrite) as tmp:
        write_jsonl(tmp / "predictions.jsonl", predictions)
        write_json(tmp / "metrics.json", metrics)
        if comparison is not None:
            write_json(tmp / "compare.json", comparison)
            (tmp / "compare.md").write_text(comparison_markdown(comparison), encoding="utf-8")
    print_summary(metrics, Path(out))
    if comparison is not None:
        print_comparison(comparison)
    return 0


def resolve_scoring(scoring: str | None, items: list[Item]) -> str:
    """``--scoring`` checked against the items: the default is ``both``, or ``generation`` where
    an answer is beyond the probe's candidate limit (an explicit likelihood / both is then an error)."""
    if scoring is not None and scoring not in ("generation", "likelihood", "both"):
        raise SpellxferError(f"--scoring must be generation, likelihood or both, got {scoring!r}")
    problem = too_large_answer(items) if scoring != "generation" else None
    if problem is None:
        return scoring or "both"
    if scoring is None:
        console.print(f"[yellow]scoring by generation only:[/] {problem}")
        return "generation"
    raise SpellxferError(f"{problem}; use --scoring generation")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cpu`` / ``cuda[:N]`` are checked against
    this machine, so a missing GPU is one error line before anything loads."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SpellxferError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise SpellxferError(
                f"--device {device}: no CUDA device on this machine; use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= n:
            raise SpellxferError(
                f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
            )
    return device


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_dir(adapter: Path) -> dict:
    """The adapter directory's parsed ``adapter_config.json``, checked before the model loads: a
    LoRA config (a JSON object) beside ``adapter_model.safetensors``. Only safetensors weights are
    read (a pickled ``adapter_model.bin`` could run code when loaded)."""
    if not (adapter / "adapter_config.json").is_file():
        raise SpellxferError(f"--adapter {adapter}: no adapter_config.json there "
                             "(expected a PEFT adapter directory)")
    config = read_json(adapter / "adapter_config.json")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = f"peft_type {snippet(config.get('peft_type'))}" if isinstance(config, dict) else snippet(config)
        raise SpellxferError(f"{adapter / 'adapter_config.json'}: expected a PEFT LoRA config "
                             f'(an object with "peft_type": "LORA"), got {got}')
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        if (adapter / "adapter_model.bin").exists():
            found = "adapter_model.bin (a pickle, not read)"
        else:
            found = "no weights"
        raise SpellxferError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS} there ({found})")
    return config


def load_adapter(lm, adapter: Path, model: str):
    """``PeftModel.from_pretrained``, refusing an adapter that does not fit the model exactly.

    PEFT only warns when the weights file lacks some of the LoRA tensors its config creates (they
    stay at their initial values, so the "fine-tuned" model is partly or wholly the base model);
    here the file must hold exactly the tensors the config asks for, with matching shapes."""
    try:
        with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
            saved = set(f.keys())
        with warnings.catch_warnings():
            # missing keys are checked below, as an error; the deprecation is PEFT calling transformers
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")
            peft_model = PeftModel.from_pretrained(lm, str(adapter))
    # Whatever PEFT, safetensors or torch raise here comes from the adapter's files (a truncated
    # tensor file, a config value of the wrong type, shapes for another model): the user's input.
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise SpellxferError(f"--adapter {adapter}: cannot load onto {model} "
                             f"({type(e).__name__}: {msg[:300]})") from None
    expected = set(get_peft_model_state_dict(peft_model))
    if saved != expected:
        missing, extra = sorted(expected - saved), sorted(saved - expected)
        detail = "; ".join(p for p in (f"missing {len(missing)}, e.g. {missing[0]}" if missing else "",
                                       f"{len(extra)} unknown, e.g. {extra[0]}" if extra else "") if p)
        raise SpellxferError(f"--adapter {adapter}: {ADAPTER_WEIGHTS} holds {len(saved & expected)} of the "
                             f"{len(expected)} LoRA tensors its config gives {model} ({detail})")
    return peft_model.eval()


_KEPT = threading.local()
"""``models``, while :func:`keeping_base_models` is open in this thread (a sweep's workers are
threads, each its own pack): loaded base models and their tokenizers by (model, device)."""


def _kept() -> dict | None:
    return getattr(_KEPT, "models", None)


@contextmanager
def keeping_base_models() -> Iterator[None]:
    """Within this block, ``evaluate`` calls in this process load each base model once and keep
    it (on its device) for the next call, which puts its own adapter on it and takes it off again
    when it returns: a pack scores trial after trial this way instead of building the model for
    each. The numbers are those of a fresh load (tests/test_evaluate.py checks predictions and
    probe scores against separate loads); the cost is the kept model's memory between calls."""
    outer, _KEPT.models = _kept(), {}
    try:
        yield
    finally:
        _KEPT.models = outer


def load_for_generation(model: str, adapter: str | None, device: str = "auto"):
    """Model (+ optional LoRA adapter) and tokenizer, on the requested device, ready to generate."""
    device = resolve_device(device)
    apply_memory_fraction(device)  # a pack's scorer: the share of the card the pack left it
    with console.status(f"loading {model}" + (f" + adapter {adapter}" if adapter else "")):
        lm, tokenizer = _load_base(model, device)
        if adapter is not None:
            lm = load_adapter(lm, Path(adapter), model)
        apply_fused_kernels(lm)  # Liger's RMSNorm / SwiGLU / RoPE on CUDA when installed
    return lm, tokenizer


@contextmanager
def loaded_for_generation(model: str, adapter: str | None, device: str = "auto"):
    """:func:`load_for_generation` for one ``evaluate`` call: the model, the tokenizer, and whether
    the base model was kept from an earlier call. Inside :func:`keeping_base_models` the base model
    is the kept one, and the adapter comes off it on the way out; a call that fails
    (here or in its caller) drops the kept model instead, since PEFT may have left it half-wrapped."""
    device = resolve_device(device)
    kept = _kept() is not None and (model, device) in _kept()
    try:
        lm, tokenizer = load_for_generation(model, adapter, device)
        yield lm, tokenizer, kept
    except BaseException:
        if _kept() is not None:
            _kept().pop((model, device), None)
        raise
    if _kept() is not None:
        # only the weights stay: the decoder's cache and graphs (captured through this call's
        # adapter layers, if any) would hold card memory between calls
        release_static_decoder(lm)
        if adapter is not None:
            with warnings.catch_warnings():  # PEFT calling transformers' deprecated name
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")
                lm.unload()  # PEFT's: every LoRA layer back to its base layer, nothing merged


def _load_base(model: str, device: str):
    """The base model and tokenizer (the kept ones inside :func:`keeping_base_models`)."""
    kept = _kept()
    if kept is not None and (model, device) in kept:
        return kept[(model, device)]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        tokenizer = load_tokenizer(model)
        lm = load_model(model, dtype=dtype, device=device)
    except (OSError, ValueError) as e:
        if model in EMBEDDED:
            raise  # our own models: a failure here is a bug, not the user's input
        msg = " ".join(str(e).split())
        raise SpellxferError(f"--model {model}: cannot load a model there "
                             f"({type(e).__name__}: {msg[:300]})") from None
    if kept is not None:
        kept[(model, device)] = lm, tokenizer
    return lm, tokenizer


def score_items(items: list[Item], replies: list[list[str]] | None, prompts: list[str] | None = None,
                probe: list[ProbeResult] | None = None, probe_prompts: list[str] | None = None):
    """One prediction row per item and sample: the prompt, the raw reply, what it parses to, whether
    it's right, and the probe's verdict (the same on every sample of an item). Without replies
    (``--scoring likelihood``) one row per item whose ``output``, ``parsed`` and ``correct`` are null."""
    for i, it in enumerate(items):
        outs = replies[i] if replies is not None else [None]
        for k, output in enumerate(outs):
            parsed, correct = score(output, it.answer) if output is not None else (None, None)
            row = {
                "id": it.id,
                "file": it.file,
                "sample": k,
                "task": it.task,
                "subtask": it.subtask,
                "question": it.question,
                "answer": it.answer,
                "output": output,
                "parsed": parsed,
                "correct": correct,
                **{k2: it.meta[k2] for k2 in ("word", "letter", "position", "word_kind", "n_tokens")
                   if k2 in it.meta},
            }
            if prompts is not None:
                row["prompt"] = prompts[i]
            if probe is not None:
                row |= {"likelihood_prompt": probe_prompts[i], "likelihood_answer": probe[i].answer,
                        "likelihood_correct": probe[i].correct, "gold_logprob": probe[i].gold_logprob,
                        "gold_rank": probe[i].gold_rank}
            yield row


def summarise(items: list[Item], predictions: list[dict], probe: list[ProbeResult] | None = None) -> dict:
    """metrics.json from scored predictions (and the probe's verdicts, one per item).

    Generation point estimates come from the same torchmetrics metric the Lightning validation
    step logs; intervals are Wilson (K = 1) or an item bootstrap. Every group (task, subtask,
    file × task) also gets its trivial baselines, the probe's accuracy and the reply diagnostics.
    """
    generated = bool(predictions) and predictions[0]["correct"] is not None
    metrics: dict = {}
    by_item: dict[tuple[str, str], list[bool]] = defaultdict(list)
    rows_of: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for p in predictions:
        by_item[(p["file"], p["id"])].append(p["correct"])
        rows_of[(p["file"], p["id"])].append(p)
    verdict = {(it.file, it.id): r for it, r in zip(items, probe)} if probe is not None else {}
    if generated:
        subtasks = sorted({it.subtask for it in items if it.subtask})
        pos_subs = tuple(s for s in subtasks if any(i.subtask == s and i.task == "position" for i in items))
        cnt_subs = tuple(s for s in subtasks if any(i.subtask == s and i.task == "count" for i in items))
        metric = TransferAccuracy(position_subtasks=pos_subs or ("nth_letter",),
                                  count_subtasks=cnt_subs or ("word_length",))
        metric.update([p["task"] for p in predictions], [p["subtask"] for p in predictions],
                      [p["correct"] for p in predictions])
        # exact fractions from the metric's counts (its compute() is float32, for Lightning's loggers)
        point = {k: correct / total for k, (correct, total) in metric.counts().items()}
        if "position_accuracy" in point and "count_accuracy" in point:
            point["transfer_score"] = (point["position_accuracy"] + point["count_accuracy"]) / 2
        k_max = max((len(v) for v in by_item.values()), default=1)
        metrics |= {"ci_method": "wilson" if k_max == 1 else "item_bootstrap", "confidence": 0.95}

    def summary(selected: list[Item]) -> dict:
        s = accuracy_summary([by_item[(it.file, it.id)] for it in selected])
        return {"accuracy": s["accuracy"], "ci_low": s["ci_low"], "ci_high": s["ci_high"], "n": s["n"]}

    def group(selected: list[Item]) -> dict:
        """Generation accuracy, trivial baselines, probe and diagnostics of one group of items."""
        entry = summary(selected) if generated else {}
        entry |= baseline_fields({"answer": it.answer, "subtask": it.subtask, "word": it.meta.get("word")}
                                 for it in selected)
        if generated:
            entry["beats_trivial"] = beats(entry["ci_low"], entry["best_trivial"])
        if verdict:
            results = [verdict[(it.file, it.id)] for it in selected]
            entry["likelihood"] = probe_summary(results, entry["best_trivial"])
        if generated:
            entry["diagnostics"] = answer_diagnostics(p for it in selected for p in rows_of[(it.file, it.id)])
        return entry

    for t in TASKS:
        sel = [it for it in items if it.task == t]
        if not sel:
            continue
        if generated:
            s = summary(sel)
            metrics[f"{t}_accuracy"] = point[f"{t}_accuracy"]
            metrics[f"{t}_accuracy_ci_low"] = s["ci_low"]
            metrics[f"{t}_accuracy_ci_high"] = s["ci_high"]
            metrics[f"{t}_accuracy_n"] = s["n"]
        if verdict:
            lk = probe_summary([verdict[(it.file, it.id)] for it in sel])
            metrics[f"{t}_likelihood_accuracy"] = lk["accuracy"]
            metrics[f"{t}_likelihood_accuracy_ci_low"] = lk["ci_low"]
            metrics[f"{t}_likelihood_accuracy_ci_high"] = lk["ci_high"]
            metrics[f"{t}_likelihood_accuracy_n"] = lk["n"]
    if generated and "transfer_score" in point:
        metrics["transfer_score"] = point["transfer_score"]

    metrics["subtasks"] = {}
    for t in TASKS:
        for sub in sorted({it.subtask for it in items if it.task == t and it.subtask}):
            sel = [it for it in items if it.task == t and it.subtask == sub]
            answer, n_major = Counter(it.answer for it in sel).most_common(1)[0]
            metrics["subtasks"][f"{t}/{sub}"] = group(sel) | {
                "majority_answer": answer,
                "majority_baseline": n_major / len(sel),
            }
    metrics["files"] = {
        f: {t: group(sel) for t in TASKS if (sel := [it for it in items if it.file == f and it.task == t])}
        for f in dict.fromkeys(it.file for it in items)
    }
    metrics["breakdowns"] = _breakdowns(items, summary) if generated else {}
    return metrics


def _position_bucket(p: int) -> str:
    if p < 0:
        return {-1: "last", -2: "2nd-to-last"}.get(p, "3rd-to-last")
    return str(p) if p <= 3 else ("4-6" if p <= 6 else "7+")


BREAKDOWNS = {
    "word_length": lambda m: length_bucket(len(m["word"])) if m.get("word") else None,
    "n_tokens": lambda m: token_bucket(int(m["n_tokens"])) if m.get("n_tokens") not in (None, "") else None,
    "word_kind": lambda m: m.get("word_kind") or None,
    "letter_position": lambda m: (_position_bucket(int(m["position"]))
                                  if m.get("position") not in (None, "") else None),
}


def _breakdowns(items: list[Item], summary) -> dict:
    """Accuracy per task within each bucket, for every breakdown the rows carry."""
    out: dict = {}
    for name, key in BREAKDOWNS.items():
        groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
        for it in items:
            b = key(it.meta)
            if b is not None:
                groups[(it.task, b)].append(it)
        if groups:
            out[name] = {t: {b: summary(g) for (tt, b), g in sorted(groups.items()) if tt == t}
                         for t in TASKS}
            out[name] = {t: v for t, v in out[name].items() if v}
    return out


def print_summary(metrics: dict, out: Path) -> None:
    """The run as a table: per task and subtask, each scorer's accuracy and 95% interval beside the
    best trivial baseline; an accuracy whose interval does not lie above it is marked ``✗``."""
    run = metrics["run"]
    s = run["sampling"]
    scoring = metrics.get("scoring", "generation")
    if s["decoding"] == "greedy":
        dec = "greedy"
    else:
        dec = f"sampled T={s['temperature']} p={s['top_p']} k={s['top_k']}"
    timing = []
    if scoring != "likelihood":
        timing.append(f"{dec} {run['seconds']:.0f} s ({run['items_per_second']} items/s)")
    if run.get("likelihood"):
        timing.append(f"probe {run['likelihood']['seconds']:.0f} s")
    shots = f" · {run['shots']}-shot" if run.get("shots") else ""
    adapter = " + " + run["adapter"] if run["adapter"] else ""
    table = Table(title=f"{run['model']}{adapter}{shots} · {run['n_items']} items · " + " · ".join(timing))
    columns = ["metric"] + (["generation [95% CI]"] if scoring != "likelihood" else [])
    columns += ["probe [95% CI]", "gold rank"] if scoring != "generation" else []
    columns += ["n", "best trivial"]
    for col in columns:
        table.add_column(col, justify="right" if col != "metric" else "left")

    def acc(v: dict | None) -> str:
        if not v:
            return ""
        flag = " [red]✗[/]" if v.get("beats_trivial") is False else ""
        return f"{v['accuracy']:.3f} {_ci(v['ci_low'], v['ci_high'])}{flag}"

    def cells(gen: dict | None, lk: dict | None, n, best: dict | None) -> list[str]:
        row = [acc(gen)] if scoring != "likelihood" else []
        if scoring != "generation":
            row += [acc(lk), f"{lk['gold_mean_rank']:.1f}" if lk and "gold_mean_rank" in lk else ""]
        return row + [str(n), f"{best['accuracy']:.3f} {best['name']}" if best else ""]

    def top(t: str, kind: str) -> dict | None:
        key = f"{t}_{kind}accuracy"
        if key not in metrics:
            return None
        return {"accuracy": metrics[key], "ci_low": metrics[f"{key}_ci_low"],
                "ci_high": metrics[f"{key}_ci_high"]}

    for t in TASKS:
        gen, lk = top(t, ""), top(t, "likelihood_")
        if not gen and not lk:
            continue
        n = metrics.get(f"{t}_accuracy_n", metrics.get(f"{t}_likelihood_accuracy_n"))
        table.add_row(f"[bold]{t}", *cells(gen, lk, n, None))
        for name, v in metrics["subtasks"].items():
            if name.startswith(t + "/"):
                n = v.get("n", v.get("likelihood", {}).get("n"))
                table.add_row(f"  {name.split('/', 1)[1]}", *cells(v if "accuracy" in v else None,
                                                                   v.get("likelihood"), n,
                                                                   v.get("best_trivial")))
    if "transfer_score" in metrics:
        table.add_row("[bold]transfer_score", f"{metrics['transfer_score']:.3f}", *[""] * (len(columns) - 2))
    print_table(table, console)
    console.print("✗: the 95% interval does not lie above the best trivial baseline "
                  "(docs/evaluation.md#trivial-baselines)")
    for scorer, block in (("replies", "diagnostics"), ("probe answers", "likelihood")):
        constant = [f"{name} ({v[block]['top_answers'][0][0]!r})" for name, v in metrics["subtasks"].items()
                    if v.get(block, {}).get("constant_answer")]
        if constant:
            console.print(f"[yellow]constant answer[/] (one answer in > 50% of {scorer}): "
                          f"{', '.join(constant)}")
    how = f" ({metrics['ci_method']} intervals)" if "ci_method" in metrics else ""
    console.print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}{how}")


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:.3f}, {hi:.3f}]"
